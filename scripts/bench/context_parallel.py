"""Context parallelism measured on one GPU: the work split, the bytes on the wire, and how long a
context each GPU count can train.

For each total length S, group size N and method, `flashlm.parallel.simulate_context_parallel`
runs every rank's share of one attention layer (forward and backward) one rank after another on
this GPU, with no communication, and the report gives:

- compute efficiency = time of the unsplit kernel on the whole sequence / (N x the slowest
  rank's time): 1.0 when the ranks share the work evenly and splitting costs nothing;
- the bytes each rank sends per layer (forward, backward) and the time they take at
  ``--link-gbs`` GB/s per direction (NVLink on the H100/H200 SXM: 450), next to the slowest
  rank's compute time per ring step (ring) or per layer (allgather, ulysses): communication can
  hide behind compute when it is the smaller;
- from the committed memory sweep (results/memory/memory_sweep.json), each preset's memory per
  token and fixed memory, and the longest context per GPU count that fits ``--gpu-gib``.

Shapes: the ``1b`` preset's attention (16 heads, 8 KV heads, head dim 128), bf16, causal, batch 1;
"packed" splits the sequence into documents of random lengths (mean ``--doc-mean`` tokens) and
shards it by the zigzag; "packed-balanced" shards the same documents by their work
(`flashlm.parallel.zigzag.document_layout`, ring and allgather).

    python scripts/bench/context_parallel.py --out results/context_parallel
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from provenance import add_commit_argument, describe, environment, write_report  # noqa: E402
from timing import cuda_median_ms  # noqa: E402

from flashlm import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from flashlm.parallel import simulate_context_parallel  # noqa: E402
from flashlm.parallel.zigzag import document_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
# dense: one document; packed: random documents, zigzag shards; packed-balanced: the same
# documents, shards cut by their work (zigzag.document_layout; ring and allgather only).
LAYOUTS = ("dense", "packed", "packed-balanced")


def documents(seqlen, mean, seed=0):
    """(docs + 1,) int32 offsets of random document lengths (exponential, mean ``mean``)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seqlen:
        n = max(1, int(-mean * math.log(1 - torch.rand((), generator=gen).item())))
        n = min(n, seqlen - total)
        lengths.append(n)
        total += n
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def unsplit_seconds(q, k, v, dout, cu, repeats):
    """Forward + backward of the kernel on the whole sequence."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        if cu is None:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            n = cu[1:] - cu[:-1]
            longest = int(n.max())
            cuda_cu = cu.to(q.device)
            out = flash_attn_varlen_func(q[0], k[0], v[0], cuda_cu, cuda_cu, longest, longest, causal=True)[None]
        torch.autograd.grad(out, (q, k, v), dout)

    return cuda_median_ms(step, repeats) / 1e3


def pretune(seqlen, layouts, doc_mean):
    """Fill the kernel's tuning cache at min(seqlen, 128K): lengths from 128K up share one
    tuning key, so the long runs below find their configurations without a sweep at full size."""
    n = min(seqlen, 131072)
    q = torch.randn(1, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for layout in layouts:
        unsplit_seconds(q, k, v, torch.randn_like(q), documents(n, doc_mean) if layout != "dense" else None, 1)


def memory_model(path):
    """{preset: (fixed GiB, GiB per token)} fitted to the largest two contexts of the sweep's
    default flashlm row (memory is linear in tokens once attention is flash)."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["results"]
    fits = {}
    for preset in sorted({r["preset"] for r in rows}):
        ok = sorted((r["context"], r["peak_gib"]) for r in rows
                    if r["preset"] == preset and r["row"] == "flashlm" and r["status"] == "ok")
        if len(ok) >= 2:
            (s0, m0), (s1, m1) = ok[-2], ok[-1]
            per_token = (m1 - m0) / (s1 - s0)
            fits[preset] = (m1 - per_token * s1, per_token)
    return fits


def cell(row):
    return row["seqlen"], row["layout"], row["world_size"], row["impl"]


def merge_rows(earlier, new):
    """The rows of both runs, one per cell (the newer where both measured it), in table order."""
    by_cell = {cell(r): r for r in earlier}
    by_cell.update((cell(r), r) for r in new)
    order = {"ring": 0, "allgather": 1, "ulysses": 2}
    layouts = {name: i for i, name in enumerate(LAYOUTS)}
    return sorted(by_cell.values(), key=lambda r: (r["seqlen"], layouts[r["layout"]], r["world_size"],
                                                    order[r["impl"]]))


def write(args, env, rows):
    """Write the report of ``rows`` (merged with ``--merge``'s) to ``args.out``; returns it."""
    rows = [{**row, "gpu": env["gpu"]} for row in rows]
    rows = merge_rows(json.loads(args.merge.read_text())["rows"] if args.merge else [], rows)
    fits = memory_model(REPO / "results" / "memory" / "memory_sweep.json")
    longest = {preset: {n: int(max(0.0, (args.gpu_gib - fixed) / per_token) * n) for n in (1, 2, 4, 8)}
               for preset, (fixed, per_token) in fits.items()}
    report = {"environment": env, "shape": {"heads": HEADS, "kv_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "dtype": "bfloat16", "causal": True}, "link_gbs": args.link_gbs,
              "gpu_gib": args.gpu_gib, "doc_mean": args.doc_mean, "rows": rows,
              "memory_fit": {p: {"fixed_gib": f, "gib_per_token": t} for p, (f, t) in fits.items()},
              "longest_context": longest}
    write_report(args.out, "context_parallel", report, markdown(report))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--impls", nargs="+", default=["ring", "allgather", "ulysses"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--longest-only", nargs="*", default=[],
                        help="at the longest length run only these impl:N pairs (e.g. ring:8 allgather:8)")
    parser.add_argument("--doc-mean", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per rank (median), after one warm-up")
    parser.add_argument("--link-gbs", type=float, default=450.0)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU for the longest-context table")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds; later cells are skipped")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier report (context_parallel.json): its rows for cells not measured "
                             "here are kept, so several runs build one table")
    add_commit_argument(parser)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    env = environment("cuda", commit=args.commit)
    torch.manual_seed(0)
    rows = []
    for seqlen in args.lengths:
        pretune(seqlen, args.layouts, args.doc_mean)
        q = torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, seqlen, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        dout = torch.randn_like(q)
        for layout in args.layouts:
            cu = documents(seqlen, args.doc_mean) if layout != "dense" else None
            base = unsplit_seconds(q, k, v, dout, cu, args.repeats)
            for n in args.world_sizes:
                for impl in args.impls:
                    if seqlen == max(args.lengths) and args.longest_only and f"{impl}:{n}" not in args.longest_only:
                        continue
                    if impl == "ulysses" and (HEADS % n or (KV_HEADS % n and n % KV_HEADS)
                                              or layout == "packed-balanced"):
                        continue
                    if time.perf_counter() - start > args.time_budget:
                        print(f"time budget spent: skipping S={seqlen} N={n} {impl} {layout}", flush=True)
                        continue
                    split = (document_layout(seqlen, n, cu) if layout == "packed-balanced"
                             else None)
                    sim = simulate_context_parallel(q, k, v, n, impl, causal=True, cu_seqlens=cu, dout=dout,
                                                    warmup=1, repeats=args.repeats, assemble=False, layout=split)
                    per_rank = [f + b for f, b in zip(sim.forward_s, sim.backward_s)]
                    slowest = max(per_rank)
                    comm = {p: sim.bytes[p] / (args.link_gbs * 1e9) for p in ("forward", "backward")}
                    hops = n - 1 if impl == "ring" else 1
                    row = {"seqlen": seqlen, "world_size": n, "impl": impl, "layout": layout,
                           "documents": None if cu is None else len(cu) - 1, "unsplit_s": base,
                           "rank_forward_s": sim.forward_s, "rank_backward_s": sim.backward_s,
                           "slowest_rank_s": slowest, "efficiency": base / (n * slowest),
                           "balance": min(per_rank) / slowest, "bytes_forward": sim.bytes["forward"],
                           "bytes_backward": sim.bytes["backward"], "comm_forward_s": comm["forward"],
                           "comm_backward_s": comm["backward"],
                           # Ring: each hop's transfer overlaps one step's compute.
                           "compute_per_transfer_s": slowest / hops, "comm_per_transfer_s":
                               (comm["forward"] + comm["backward"]) / (2 * hops) if impl == "ring"
                               else comm["forward"] + comm["backward"]}
                    rows.append(row)
                    write(args, env, rows)  # a run stopped early keeps what it measured
                    print(f"S={seqlen // 1024}K N={n} {impl:9s} {layout:6s} efficiency {row['efficiency']:.3f} "
                          f"(balance {row['balance']:.3f}), slowest rank {slowest * 1e3:.1f} ms vs unsplit "
                          f"{base * 1e3:.1f} ms; sends {(row['bytes_forward'] + row['bytes_backward']) / 2**20:.0f} MiB "
                          f"per layer", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()

    report = write(args, env, rows)
    print(markdown(report))
    return 0


def markdown(report):
    env = report["environment"]
    lines = [f"# Context parallelism simulated on one GPU ({describe(env, 'triton')})", "",
             "Each rank's share of one attention layer (forward + backward, 1b shape: 16 heads, 8 KV heads, "
             "D=128, bf16, causal) run one rank after another, no communication. Efficiency = unsplit time / "
             "(N x slowest rank); balance = fastest / slowest rank. Bytes: what one rank sends per layer; "
             f"transfer times at {report['link_gbs']:.0f} GB/s per direction, against the compute one transfer "
             "overlaps (a ring step, or a whole layer for allgather and ulysses).", "",
             "| S | N | method | layout | efficiency | balance | slowest rank (ms) | unsplit (ms) | "
             "MiB sent fwd / bwd | transfer vs compute (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    gpus = sorted({r["gpu"] for r in report["rows"]})
    if len(gpus) > 1:
        lines[1:1] = ["", "Rows measured on several cards: " + "; ".join(
            f"{g}: " + ", ".join(f"{s // 1024}K" for s in sorted({r["seqlen"] for r in report["rows"] if r["gpu"] == g}))
            for g in gpus) + "."]
    for r in report["rows"]:
        lines.append(
            f"| {r['seqlen'] // 1024}K | {r['world_size']} | {r['impl']} | {r['layout']} | **{r['efficiency']:.3f}** | "
            f"{r['balance']:.3f} | {r['slowest_rank_s'] * 1e3:.1f} | {r['unsplit_s'] * 1e3:.1f} | "
            f"{r['bytes_forward'] / 2**20:.0f} / {r['bytes_backward'] / 2**20:.0f} | "
            f"{r['comm_per_transfer_s'] * 1e3:.2f} vs {r['compute_per_transfer_s'] * 1e3:.1f} |")
    if report["longest_context"]:
        lines += ["", f"Longest context per GPU count ({report['gpu_gib']:.0f} GiB per GPU), from the memory sweep's "
                  "linear fit (fixed + per-token memory of the default flashlm row, context split evenly):", "",
                  "| preset | fixed GiB | MiB per token | 1 GPU | 2 | 4 | 8 |", "|---|---|---|---|---|---|---|"]
        for preset, by_n in report["longest_context"].items():
            fit = report["memory_fit"][preset]
            lines.append(f"| {preset} | {fit['fixed_gib']:.1f} | {fit['gib_per_token'] * 1024:.3f} | "
                         + " | ".join(f"{by_n[n] / 2**20:.2f}M" for n in (1, 2, 4, 8)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
