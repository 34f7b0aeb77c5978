"""Host time of an attention call: how long the CPU spends issuing flashlm's attention forward,
and forward plus backward, next to the GPU time of the same call, and where the host time goes.

At small shapes a call's host time (argument checks, autograd, Triton's launch path for three
to five kernels, tensor descriptors) can exceed its GPU time; the GPU then waits on Python.
For each shape and each kind of call this reports, over ``--rounds`` rounds of ``--calls``
calls each (medians):

    host_us   CPU time to issue one call, the GPU never waited on (the calls queue up)
    gpu_us    GPU time of one call, timed with the GPU kept busy before the first one, so
              that the launches queue ahead and the kernels run back to back
    bound     "host" when host_us > gpu_us: a training step at this shape waits on Python

and a cProfile of ``--calls`` calls: the functions with the most time of their own per call.

    PYTHONPATH=. python3 scripts/bench/host_time.py --out results/attention/experiments
    PYTHONPATH=. python3 scripts/bench/host_time.py --shapes 8x4096x12x4x64 --calls 20

Shapes are BxSxHxKVxD (batch, sequence, query heads, key/value heads, head dim), causal, bf16.
The defaults: the 100m model's 4K step (8 x 4096, 12 heads of 64, 4 K/V heads) and a short
D=128 call (16 x 1024, 16 heads). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, describe, environment, write_report  # noqa: E402

from flashlm.kernels.attention import flash_attn_func  # noqa: E402

CALLS = ("fwd", "fwd+bwd det", "fwd+bwd nondet")


def parse_shape(text):
    try:
        b, s, h, kv, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BxSxHxKVxD, e.g. 8x4096x12x4x64")
    if min(b, s, h, kv, d) < 1 or h % kv:
        raise argparse.ArgumentTypeError(f"shape {text!r}: sizes must be positive and H a multiple of KV")
    return b, s, h, kv, d


def make_call(kind, shape, device):
    """A closure running one call of ``kind`` on fresh random bf16 inputs of ``shape``."""
    b, s, h, kv, d = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(heads):
        return torch.randn(b, s, heads, d, device=device, dtype=torch.bfloat16, generator=gen)

    q, k, v = rand(h), rand(kv), rand(kv)
    if kind == "fwd":
        return lambda: flash_attn_func(q, k, v, causal=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = rand(h)
    deterministic = kind.endswith(" det")

    def call():
        flash_attn_func(q, k, v, causal=True, deterministic=deterministic).backward(dout)
        q.grad = k.grad = v.grad = None
    return call


def host_us(call, calls):
    """Microseconds of CPU time per call, measured while the GPU runs behind."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def gpu_us(call, calls, host_estimate_us):
    """Microseconds of GPU time per call: a sleep kernel long enough to cover the issue of all
    ``calls`` holds the GPU while they queue, so the events time the kernels alone."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # ~2 GHz clock; 1.5x the expected issue time, so the queue is full before the sleep ends
    torch.cuda._sleep(int(host_estimate_us * calls * 1.5 * 2000))
    start.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def profile(call, calls, top):
    """The ``top`` functions by time of their own, per call (microseconds)."""
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(path).name}:{line}({name})" if line else name
        rows.append({"function": where, "calls_per_call": ncalls / calls,
                     "own_us": tottime / calls * 1e6, "cumulative_us": cumtime / calls * 1e6})
    rows.sort(key=lambda r: r["own_us"], reverse=True)
    return rows[:top]


def measure(shape, kind, args):
    call = make_call(kind, shape, "cuda")
    for _ in range(3):  # compile, tune, warm the caches
        call()
    torch.cuda.synchronize()
    hosts, gpus = [], []
    for _ in range(args.rounds):
        hosts.append(host_us(call, args.calls))
        gpus.append(gpu_us(call, args.calls, max(hosts)))
    row = {"shape": "x".join(map(str, shape)), "call": kind,
           "host_us": statistics.median(hosts), "gpu_us": statistics.median(gpus),
           "host_us_rounds": hosts, "gpu_us_rounds": gpus,
           "profile": profile(call, args.calls, args.profile_top)}
    row["bound"] = "host" if row["host_us"] > row["gpu_us"] else "gpu"
    return row


def table(env, rows, top):
    lines = [f"Host time of a flashlm attention call, {describe(env, 'triton')}", "",
             "Causal, bf16. host: CPU time to issue one call; gpu: the kernels' time with the "
             "launches queued ahead; medians over rounds.", "",
             "| shape BxSxHxKVxD | call | host us | gpu us | bound |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['call']} | {r['host_us']:.0f} | {r['gpu_us']:.0f} | {r['bound']} |"
              for r in rows]
    for r in rows:
        lines += ["", f"### {r['shape']} {r['call']}: the {top} functions with most own time per call", "",
                  "| function | calls | own us | cumulative us |", "|---|---|---|---|"]
        lines += [f"| `{p['function']}` | {p['calls_per_call']:.0f} | {p['own_us']:.1f} | "
                  f"{p['cumulative_us']:.1f} |" for p in r["profile"][:top]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=parse_shape,
                   default=[parse_shape("8x4096x12x4x64"), parse_shape("16x1024x16x16x128")])
    p.add_argument("--calls", type=int, default=50, help="calls per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-top", type=int, default=15, help="functions listed per profile")
    p.add_argument("--out", default="results/attention/experiments")
    add_commit_argument(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_time.py: needs a CUDA device")
    env = environment("cuda", commit=args.commit)
    rows = []
    for shape in args.shapes:
        for kind in CALLS:
            rows.append(measure(shape, kind, args))
            r = rows[-1]
            print(f"{r['shape']:>20} {kind:>15}: host {r['host_us']:7.0f} us, gpu {r['gpu_us']:7.0f} us", flush=True)
    report = {"environment": env, "settings": {"calls": args.calls, "rounds": args.rounds}, "rows": rows}
    write_report(args.out, "host_time", report, table(env, rows, args.profile_top))
    print(f"wrote {args.out}/host_time.json and .md")


if __name__ == "__main__":
    main()
