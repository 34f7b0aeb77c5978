"""Attention kernel benchmark: flashlm against torch SDPA (FlashAttention-2 and cuDNN backends)
and compiled FlexAttention, all in one run on the same inputs.

FLOPs (printed with the table): forward 4*B*H*S*S*D, halved when causal; backward 2.5x the
forward; forward+backward 3.5x. Shapes are the peers' in docs/peers.md: bf16, hidden 2048
(H = 2048 / D), B*S = 16K tokens up to S = 16K, then B = 1. Times are the median of
``triton.testing.do_bench``; with ``--rounds N`` each cell is measured N times, the providers
taking turns, and each mode keeps its median time. Peak memory is ``max_memory_allocated``
during one forward+backward, above what the inputs already hold.

Writes ``attention.json`` (the provenance block of ``scripts/provenance.py``, every row),
``attention.md`` (tables with ratios to each peer) and ``attention.png`` to ``--out``.

    python scripts/bench/attention.py --out results/attention
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, describe, environment  # noqa: E402

# flashlm_nondet: flash_attn_func(deterministic=False), the fused backward on Hopper.
PROVIDERS = ["flashlm", "flashlm_nondet", "sdpa_flash", "sdpa_cudnn", "flex"]
LABELS = {"flashlm": "flashlm", "flashlm_nondet": "flashlm non-det.", "sdpa_flash": "SDPA FA2",
          "sdpa_cudnn": "SDPA cuDNN", "flex": "FlexAttention"}


def attention_flops(batch, nheads, seqlen, head_dim, causal, mode):
    fwd = 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def make_attention(provider, causal, seqlen, device):
    """A function (q, k, v) -> out on (B, S, H, D) tensors, in the provider's own layout."""
    if provider in ("flashlm", "flashlm_nondet"):
        from flashlm import flash_attn_func
        deterministic = provider == "flashlm"
        return lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
    if provider in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.FLASH_ATTENTION if provider == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def run(q, k, v):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
            return out.transpose(1, 2)
        return run
    from torch import _dynamo
    from torch._functorch import config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # One compiled graph per shape: raise the recompile limit so Dynamo never falls back to the
    # eager (materializing) flex_attention, and allow retain_graph for the backward timing.
    _dynamo.config.cache_size_limit = 256
    functorch_config.donated_buffer = False
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                                       None, None, seqlen, seqlen, device=device)

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)
    return run


def explore_configs():
    """Replace flashlm's short autotune lists by wide ones (for choosing the short lists)."""
    import triton
    from flashlm.kernels.attention import flash_attn as fa
    def grid(kind, ms, ns, ws, ss):
        # The pre-hook sizes the TMA boxes to each configuration's tiles, as in the short lists.
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st,
                              pre_hook=fa._tma_boxes_hook(kind))
                for m in ms for n in ns for w in ws for st in ss]
    fa._fwd_tuned.configs = grid("fwd", [64, 128], [64, 128], [4, 8], [2, 3, 4])
    fa._dkdv_tuned.configs = grid("dkdv", [32, 64], [64, 128], [4, 8], [2, 3, 4])
    fa._dq_tuned.configs = grid("dq", [64, 128], [32, 64, 128], [4, 8], [2, 3, 4])


def best_configs():
    from flashlm.kernels.attention import flash_attn as fa
    out = {}
    for name, tuned in (("fwd", fa._fwd_tuned), ("dkdv", fa._dkdv_tuned), ("dq", fa._dq_tuned)):
        cfg = getattr(tuned, "best_config", None)
        if cfg is not None:
            out[name] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def bench_one(provider, batch, seqlen, nheads, head_dim, causal, dtype, device):
    import triton.testing
    gen = torch.Generator(device=device).manual_seed(seqlen + head_dim)
    shape = (batch, seqlen, nheads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    fn = make_attention(provider, causal, seqlen, device)
    row = {"provider": provider}
    try:
        out = fn(q, k, v)
        out.backward(dout)  # warm-up: compile, autotune
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(q, k, v)
        out.backward(dout)
        torch.cuda.synchronize()
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del out
        q.grad = k.grad = v.grad = None
        ms_fwd = triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=200,
                                         return_mode="median")
        out = fn(q, k, v)
        ms_bwd = triton.testing.do_bench(
            lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
            warmup=50, rep=200, return_mode="median")

        def fwd_bwd():
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        ms_all = triton.testing.do_bench(fwd_bwd, warmup=50, rep=200, return_mode="median")
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    except RuntimeError as exc:  # a backend that does not support the shape
        row["error"] = str(exc).splitlines()[0][:200]
        return row
    finally:
        torch.cuda.empty_cache()
    if provider == "flashlm":
        row["configs"] = best_configs()
    for mode, ms in (("fwd", ms_fwd), ("bwd", ms_bwd), ("fwd_bwd", ms_all)):
        row[f"{mode}_ms"] = ms
        row[f"{mode}_tflops"] = attention_flops(batch, nheads, seqlen, head_dim, causal, mode) / (ms * 1e-3) / 1e12
    return row


def median_row(rounds):
    """One provider's row from its rounds: the median time of each mode (TFLOP/s from it), the
    largest peak memory, and every round's TFLOP/s under ``<mode>_tflops_rounds``. A round that
    failed makes the row that failure."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    if len(rounds) == 1:
        return rounds[0]
    row = dict(rounds[0])
    for mode in ("fwd", "bwd", "fwd_bwd"):
        flops = rounds[0][f"{mode}_tflops"] * rounds[0][f"{mode}_ms"]  # TFLOP/s * ms: constant
        row[f"{mode}_ms"] = statistics.median(r[f"{mode}_ms"] for r in rounds)
        row[f"{mode}_tflops"] = flops / row[f"{mode}_ms"]
        row[f"{mode}_tflops_rounds"] = [r[f"{mode}_tflops"] for r in rounds]
    row["peak_mem_gib"] = max(r["peak_mem_gib"] for r in rounds)
    return row


def document_lengths(total, seed, lo=128, hi=4096):
    """Mixed document lengths that add up to ``total`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def bench_varlen(total, head_dim, nheads, device="cuda"):
    """Packed documents, causal within each: flashlm varlen vs SDPA with a block-diagonal mask
    vs FlexAttention document masking vs flashlm dense over the whole pack (no document mask).
    TFLOP/s counts only the FLOPs inside documents."""
    import triton.testing
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from flashlm import flash_attn_func, flash_attn_varlen_func
    lengths = document_lengths(total, seed=total)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(total, nheads, head_dim, generator=gen, device=device,
                           dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    pos = torch.arange(total, device=device)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(
        lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, total, total,
        device=device)
    bhsd = lambda t: t.transpose(0, 1)[None]
    fns = {
        "flashlm varlen": lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths),
                                                         max(lengths), causal=True),
        "flashlm dense, no document mask": lambda: flash_attn_func(q[None], k[None], v[None],
                                                                   causal=True)[0],
        "SDPA block-diagonal mask": lambda: F.scaled_dot_product_attention(
            bhsd(q), bhsd(k), bhsd(v), attn_mask=mask)[0].transpose(0, 1),
        "FlexAttention document mask": lambda: flex(bhsd(q), bhsd(k), bhsd(v),
                                                    block_mask=block_mask)[0].transpose(0, 1),
    }
    useful = sum(4 * nheads * n * n * head_dim / 2 for n in lengths)
    rows = []
    for name, fn in fns.items():
        row = {"provider": name}
        try:
            torch.autograd.grad(fn(), (q, k, v), dout)
            ms_fwd = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            ms_all = triton.testing.do_bench(
                lambda: torch.autograd.grad(fn(), (q, k, v), dout), warmup=25, rep=100,
                return_mode="median")
            row.update(fwd_ms=ms_fwd, fwd_bwd_ms=ms_all,
                       fwd_tflops=useful / (ms_fwd * 1e-3) / 1e12,
                       fwd_bwd_tflops=3.5 * useful / (ms_all * 1e-3) / 1e12)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            row["error"] = str(exc).splitlines()[0][:200]
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"varlen total={total} docs={len(lengths)} {name}: "
              + (row.get("error") or f"fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms"),
              flush=True)
    return {"total_tokens": total, "documents": len(lengths), "head_dim": head_dim,
            "nheads": nheads, "rows": rows}


def bench_window(seqlen, window, head_dim, nheads, device="cuda"):
    """Causal sliding-window attention: time should grow linearly with seqlen."""
    import triton.testing
    from flashlm import flash_attn_func
    gen = torch.Generator(device=device).manual_seed(seqlen)
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, generator=gen, device=device,
                           dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    fn = lambda: flash_attn_func(q, k, v, causal=True, window_size=(window, -1))
    torch.autograd.grad(fn(), (q, k, v), dout)
    ms_all = triton.testing.do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), dout),
                                     warmup=25, rep=100, return_mode="median")
    print(f"window={window} S={seqlen}: fwd+bwd {ms_all:.2f} ms", flush=True)
    return {"seqlen": seqlen, "window": window, "fwd_bwd_ms": ms_all,
            "ms_per_1k_tokens": ms_all / (seqlen / 1024)}


def varlen_markdown(varlen, window, env):
    lines = [f"Packed documents and sliding windows, bf16, {describe(env, 'triton')}. "
             "Head dim 128, 16 heads, causal.", "",
             "| tokens | documents | kernel | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s (in-document) |",
             "|---|---|---|---|---|---|"]
    for v in varlen:
        for r in v["rows"]:
            if "error" in r:
                lines.append(f"| {v['total_tokens']} | {v['documents']} | {r['provider']} | "
                             f"{r['error'][:60]} | - | - |")
            else:
                lines.append(f"| {v['total_tokens']} | {v['documents']} | {r['provider']} | "
                             f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} |")
    lines += ["", "| sliding window | S | fwd+bwd ms | ms per 1K tokens |", "|---|---|---|---|"]
    for w in window:
        lines.append(f"| {w['window']} | {w['seqlen'] // 1024}K | {w['fwd_bwd_ms']:.2f} | "
                     f"{w['ms_per_1k_tokens']:.3f} |")
    return "\n".join(lines) + "\n"


def markdown(results, env):
    rounds = env.get("rounds", 1)
    lines = [f"Attention TFLOP/s, bf16, {describe(env, 'triton')}"
             + (f"; each cell the median of {rounds} rounds, providers interleaved." if rounds > 1
                else "."),
             "", "FLOPs: forward 4*B*H*S*S*D (halved when causal), backward 2.5x forward, "
             "forward+backward 3.5x. Hidden 2048 (H = 2048/D), B*S = 16K up to S = 16K, then B = 1. "
             "Cells: forward / backward / forward+backward; ratio columns are flashlm's "
             "forward+backward over the peer's (deterministic, then non-deterministic backward).",
             ""]
    header = ["D", "causal", "S"] + [LABELS[p] for p in PROVIDERS] + \
             ["vs FA2", "vs cuDNN", "vs Flex", "non-det. vs FA2", "non-det. vs cuDNN",
              "flashlm fwd vs FA2", "flashlm peak GiB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in results:
        cells = [str(shape["head_dim"]), "yes" if shape["causal"] else "no", f"{shape['seqlen'] // 1024}K"]
        by = {r["provider"]: r for r in shape["rows"]}
        for p in PROVIDERS:
            r = by.get(p)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append(r["error"] if r["error"] == "out of memory" else "unsupported")
            else:
                cells.append(f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f}")

        def ratio(peer, mode="fwd_bwd", ours="flashlm"):
            a, b = by.get(ours, {}), by.get(peer, {})
            if f"{mode}_tflops" in a and f"{mode}_tflops" in b:
                return f"{a[f'{mode}_tflops'] / b[f'{mode}_tflops']:.2f}x"
            return "-"
        cells += [ratio("sdpa_flash"), ratio("sdpa_cudnn"), ratio("flex"),
                  ratio("sdpa_flash", ours="flashlm_nondet"),
                  ratio("sdpa_cudnn", ours="flashlm_nondet"), ratio("sdpa_flash", "fwd")]
        fl = by.get("flashlm", {})
        cells.append(f"{fl['peak_mem_gib']:.2f}" if "peak_mem_gib" in fl else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(s["head_dim"], s["causal"]) for s in results}, reverse=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        shapes = [s for s in results if s["head_dim"] == d and s["causal"] == causal]
        for p in PROVIDERS:
            xs, ys = [], []
            for s in shapes:
                r = next((r for r in s["rows"] if r["provider"] == p), None)
                if r and "fwd_bwd_tflops" in r:
                    xs.append(s["seqlen"])
                    ys.append(r["fwd_bwd_tflops"])
            if xs:
                ax.plot(xs, ys, marker="o", label=LABELS[p])
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={d}, {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(paths):
    """Combine the rows of several runs' JSON, keyed by (head_dim, causal, seqlen, provider);
    later files win. Used when a sweep is split over several device calls."""
    env, shapes = None, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        env = env or data["environment"]
        for shape in data["results"]:
            key = (shape["head_dim"], shape["causal"], shape["seqlen"])
            entry = shapes.setdefault(key, dict(shape, rows=[]))
            rows = {r["provider"]: r for r in entry["rows"]}
            rows.update({r["provider"]: r for r in shape["rows"]})
            entry["rows"] = [rows[p] for p in PROVIDERS if p in rows]
    order = sorted(shapes, key=lambda k: (-k[0], not k[1], k[2]))
    return env, [shapes[k] for k in order]


def write_outputs(out, env, results):
    with open(os.path.join(out, "attention.json"), "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=1)
    table = markdown(results, env)
    with open(os.path.join(out, "attention.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(out, "attention.png"))
    return table


def main(args):
    if args.merge:
        os.makedirs(args.out, exist_ok=True)
        print(write_outputs(args.out, *merge(args.merge)))
        return
    if not torch.cuda.is_available():
        sys.exit("scripts/bench/attention.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    env = environment("cuda", commit=args.commit)
    env["rounds"] = args.rounds
    if args.explore:
        explore_configs()
    if args.varlen:
        from torch import _dynamo
        _dynamo.config.cache_size_limit = 256
        varlen, window = [], []

        def save():  # after every row, so a run cut short still leaves its results
            with open(os.path.join(args.out, "attention_varlen.json"), "w") as f:
                json.dump({"environment": env, "varlen": varlen, "window": window}, f, indent=1)
            with open(os.path.join(args.out, "attention_varlen.md"), "w") as f:
                f.write(varlen_markdown(varlen, window, env))
        for total in (16384, 65536):
            varlen.append(bench_varlen(total, 128, 16))
            save()
        for seqlen in (16384, 65536, 131072):
            window.append(bench_window(seqlen, 4096, 128, 16))
            save()
        print(varlen_markdown(varlen, window, env))
        return
    results = []
    for head_dim in args.head_dims:
        nheads = args.hidden // head_dim
        for causal in {"both": (True, False), "causal": (True,), "full": (False,)}[args.masks]:
            for seqlen in args.seqlens:
                batch = max(args.tokens // seqlen, 1)
                providers = [p for p in args.providers
                             if p != "flex" or seqlen <= args.flex_max_seqlen]
                rounds = {p: [] for p in providers}
                # Providers take turns round by round, so a drift of the GPU's clock over the
                # run falls on all of them alike.
                for _ in range(args.rounds):
                    for provider in providers:
                        row = bench_one(provider, batch, seqlen, nheads, head_dim, causal,
                                        torch.bfloat16, "cuda")
                        rounds[provider].append(row)
                        print(f"D={head_dim} causal={causal} S={seqlen} B={batch} {provider}: "
                              + (row.get("error") or f"fwd {row['fwd_tflops']:.0f} bwd {row['bwd_tflops']:.0f} "
                                 f"fwd+bwd {row['fwd_bwd_tflops']:.0f} TFLOP/s, {row['peak_mem_gib']:.2f} GiB"),
                              flush=True)
                        if "configs" in row:
                            print("   configs:", row["configs"], flush=True)
                rows = [median_row(rounds[p]) for p in providers]
                results.append({"head_dim": head_dim, "causal": causal, "seqlen": seqlen,
                                "batch": batch, "nheads": nheads, "rows": rows})
                with open(os.path.join(args.out, "attention.json"), "w") as f:
                    json.dump({"environment": env, "results": results}, f, indent=1)
    print(write_outputs(args.out, env, results))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/attention")
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--seqlens", type=int, nargs="+",
                   default=[1024 * 2**i for i in range(8)])
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--masks", choices=["both", "causal", "full"], default="both",
                   help="causal rows, rows without a mask, or both")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each cell this many times, providers taking turns, and keep "
                        "the median")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=16384, help="B*S for S below this")
    p.add_argument("--flex-max-seqlen", type=int, default=16384,
                   help="FlexAttention compiles per shape; skip it above this length")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge these runs' JSON files into --out instead of measuring")
    add_commit_argument(p)
    p.add_argument("--varlen", action="store_true",
                   help="packed-document and sliding-window rows instead of the dense sweep")
    p.add_argument("--explore", action="store_true",
                   help="autotune over wide config lists and record the winners")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


if __name__ == "__main__":
    main(parse_args())
