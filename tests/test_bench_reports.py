"""Report assembly of the GPU benchmark scripts, checked on CPU with synthetic rows."""

from conftest import load_script


def _cp_row(seqlen, n, impl, layout, gpu, efficiency):
    return {"seqlen": seqlen, "world_size": n, "impl": impl, "layout": layout, "gpu": gpu,
            "efficiency": efficiency, "balance": 1.0, "slowest_rank_s": 0.1, "unsplit_s": 0.1 * n * efficiency,
            "bytes_forward": 2**20, "bytes_backward": 2**21, "comm_per_transfer_s": 1e-3,
            "compute_per_transfer_s": 1e-2}


def test_context_parallel_merge_keeps_unmeasured_cells_and_prefers_new():
    cp = load_script("bench/context_parallel")
    earlier = [_cp_row(131072, 8, "ulysses", "dense", "A", 0.9), _cp_row(131072, 8, "ring", "dense", "A", 0.8),
               _cp_row(524288, 2, "ring", "packed", "A", 0.5), _cp_row(524288, 2, "ring", "packed-balanced", "A", 0.9)]
    new = [_cp_row(131072, 8, "ring", "dense", "B", 0.85), _cp_row(1048576, 8, "allgather", "dense", "B", 0.95),
           _cp_row(131072, 2, "allgather", "dense", "B", 0.9)]
    merged = cp.merge_rows(earlier, new)
    cells = [cp.cell(r) for r in merged]
    assert len(cells) == len(set(cells)) == 6
    assert next(r for r in merged if cp.cell(r) == (131072, "dense", 8, "ring"))["gpu"] == "B"
    # table order: length, dense before packed, group size, method
    assert cells == [(131072, "dense", 2, "allgather"), (131072, "dense", 8, "ring"),
                     (131072, "dense", 8, "ulysses"), (524288, "packed", 2, "ring"),
                     (524288, "packed-balanced", 2, "ring"), (1048576, "dense", 8, "allgather")]
    report = {"environment": {"gpu": "B", "date": "d", "torch": "t", "triton": "x", "git_commit": "c"},
              "link_gbs": 450.0, "gpu_gib": 80.0, "rows": merged, "longest_context": {}, "memory_fit": {}}
    text = cp.markdown(report)
    assert text.count("\n| 128K |") == 3 and "| 1024K | 8 | allgather | dense | **0.950** |" in text
    assert "Rows measured on several cards: A: 128K, 512K; B: 128K, 1024K." in text
