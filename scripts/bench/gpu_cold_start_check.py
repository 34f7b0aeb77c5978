"""GPU cold-start check: does the first use of flashlm's attention make the compiler crash or print?

On the H100 with triton 3.6, ptxas crashed (SIGSEGV) compiling some autotuned configurations
that load through TMA tensor descriptors. The autotuner survives a failed compile, but triton
prints the whole PTX of each failure: thousands of lines on the first run with an empty cache.
This script reproduces that first run and reports what the compiler printed:

- a fresh, empty ``TRITON_CACHE_DIR`` in a temporary directory (nothing compiled before);
- forward+backward of ``flash_attn_func`` over the shapes that autotune: bf16, head dims 64 and
  128, causal and not, 1K-8K tokens (lengths that are a multiple of 128 and ragged ones, which
  Triton compiles differently), GQA and not, ``deterministic`` True and False, each also with
  the Gluon forward off (``FLASHLM_GLUON_FWD=0``) so the Triton forward tunes at every length;
- in child processes whose stdout and stderr go to files, so everything that triton, ptxas
  and the driver print is captured at the file-descriptor level;
- which autotune configurations failed to compile (the tuner gives them an infinite time),
  and which one each tuner picked.

A line containing "ptxas", "PTX", "Segmentation" or ".version" (the first line of a printed PTX
module) counts as compiler output. Writes a JSON report (the provenance block of
``scripts/provenance.py`` under "environment") to the given path; exit status 0 when there was
no compiler output and no case failed, 1 otherwise.

    python scripts/bench/gpu_cold_start_check.py results/attention/experiments/cold_start.json
"""

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, environment  # noqa: E402

MARKERS = ("ptxas", "PTX", "Segmentation", ".version")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="path of the JSON report")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+",
                        default=[1024, 1500, 2048, 3001, 4096, 8192],
                        help="in the order they run: a ragged length before the multiple of 128 "
                             "of the same power-of-two bucket, so that bucket tunes on it")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 1],
                        help="query heads per key/value head (GQA ratios)")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    parser.add_argument("--jobs", type=int, default=8,
                        help="child processes at once (the default runs all eight together)")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds per child process")
    parser.add_argument("--logs", help="folder to keep the children's full output in")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec: run as a child
    add_commit_argument(parser)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def child_specs(args):
    """One child per (head dim, mask, Gluon forward on or off), each running every length,
    GQA ratio and determinism setting."""
    specs = []
    for head_dim, causal, gluon_fwd in itertools.product(args.head_dims, (True, False), ("", "0")):
        cases = [dict(head_dim=head_dim, causal=causal, seqlen=s, group=g, deterministic=d)
                 for s, g, d in itertools.product(args.seqlens, args.groups, (True, False))]
        name = f"d{head_dim}-{'causal' if causal else 'full'}-gluonfwd{'-off' if gluon_fwd else ''}"
        specs.append(dict(name=name, gluon_fwd=gluon_fwd, hidden=args.hidden, cases=cases))
    return specs


def _config_dict(config):
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def run_child(spec, record_path):
    """Run the cases of ``spec`` and write what the autotuners tried and picked to
    ``record_path``. Runs in a fresh process, with the parent's cache directory."""
    import torch
    from triton.runtime import autotuner

    from flashlm import flash_attn_func
    from flashlm.kernels.attention import flash_attn as fa

    tried = []
    bench = autotuner.Autotuner._bench

    def recording_bench(self, *args, config, **meta):
        timings = bench(self, *args, config=config, **meta)
        kernel = getattr(self, "base_fn", None) or self.fn
        tried.append(dict(kernel=kernel.__name__, config=_config_dict(config),
                          compiled=math.isfinite(timings[0]), use_tma=bool(meta.get("USE_TMA")),
                          head_dim=meta.get("HEAD_DIM"), causal=bool(meta.get("MASK_RIGHT"))))
        return timings

    autotuner.Autotuner._bench = recording_bench
    results = []
    for case in spec["cases"]:
        head_dim, seqlen, group = case["head_dim"], case["seqlen"], case["group"]
        nheads = spec["hidden"] // head_dim
        gen = torch.Generator(device="cuda").manual_seed(seqlen)

        def rnd(heads):
            return torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                               generator=gen).requires_grad_()

        q, k, v = rnd(nheads), rnd(nheads // group), rnd(nheads // group)
        start = time.perf_counter()
        try:
            out = flash_attn_func(q, k, v, causal=case["causal"],
                                  deterministic=case["deterministic"])
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            finite = all(torch.isfinite(t).all().item() for t in (out, q.grad, k.grad, v.grad))
            results.append(dict(case, ok=finite, error=None if finite else "non-finite output",
                                seconds=round(time.perf_counter() - start, 2)))
        except Exception as exc:  # a case that fails is reported, the others still run
            results.append(dict(case, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                                seconds=round(time.perf_counter() - start, 2)))
    chosen = [dict(kernel=name, key=[str(part) for part in key], config=_config_dict(config))
              for name, tuner in (("fwd", fa._fwd_tuned), ("dkdv", fa._dkdv_tuned),
                                  ("dq", fa._dq_tuned))
              for key, config in tuner.cache.items()]
    with open(record_path, "w") as f:
        json.dump(dict(cases=results, tried=tried, chosen=chosen), f, indent=1)


def compiler_lines(log):
    """The lines of ``log`` with a compiler marker in them, and the count of each marker."""
    lines = [line for line in log.splitlines() if any(m in line for m in MARKERS)]
    counts = {m: sum(m in line for line in log.splitlines()) for m in MARKERS}
    return lines, counts


def summarize_log(log):
    """What a child printed: marker counts, ptxas error lines, the kernels whose PTX was printed
    (``.entry`` names with their thread counts) and a short excerpt."""
    lines, counts = compiler_lines(log)
    errors = [line.strip() for line in log.splitlines()
              if re.search(r"`ptxas` (raised|failed)|Segmentation fault|PTXASError", line)]
    entries = re.findall(r"\.entry\s+(\w+)", log)
    threads = re.findall(r"\.maxntid\s+(\d+)", log)
    return dict(markers=counts, ptxas_errors=errors[:50],
                printed_ptx=[dict(kernel=e, threads=int(t) if t else None)
                             for e, t in itertools.zip_longest(entries, threads)][:200],
                excerpt=lines[:60])


def main(args):
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_cold_start_check.py needs a CUDA GPU")
    env_block = environment("cuda", commit=args.commit)
    cache_dir = tempfile.mkdtemp(prefix="flashlm-triton-cold-")
    work = Path(tempfile.mkdtemp(prefix="flashlm-cold-start-"))
    logs = Path(args.logs) if args.logs else work
    logs.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(TRITON_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")

    pending, running, children = child_specs(args), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            spec = pending.pop(0)
            log_path, record = logs / f"{spec['name']}.log", work / f"{spec['name']}.json"
            env = dict(child_env, FLASHLM_GLUON_FWD=spec["gluon_fwd"])
            with open(log_path, "w") as log:  # both streams, at the file-descriptor level
                proc = subprocess.Popen(
                    [sys.executable, __file__, str(record), "--child", json.dumps(spec)],
                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((spec, proc, log_path, record, time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            spec, proc, log_path, record, start = item
            elapsed = time.perf_counter() - start
            if proc.poll() is None and elapsed < args.timeout:
                continue
            timed_out = proc.poll() is None
            if timed_out:
                proc.kill()
                proc.wait()
            running.remove(item)
            data = json.loads(record.read_text()) if record.exists() else {}
            children.append(dict(name=spec["name"], returncode=proc.returncode,
                                 timed_out=timed_out, seconds=round(elapsed, 1),
                                 log=str(log_path), **summarize_log(log_path.read_text()), **data))
            print(f"{spec['name']}: exit {proc.returncode}{' (timed out)' if timed_out else ''}, "
                  f"{round(elapsed)} s", flush=True)

    cases = [c for child in children for c in child.get("cases", [])]
    failed_configs = [t for child in children for t in child.get("tried", []) if not t["compiled"]]
    compiler_output = any(any(child["markers"].values()) for child in children)
    ok = (not compiler_output and not failed_configs and all(c["ok"] for c in cases)
          and all(child["returncode"] == 0 for child in children))
    report = dict(environment=env_block, cache_dir=cache_dir, markers=list(MARKERS),
                  compiler_output=compiler_output, failed_configs=failed_configs,
                  cases_failed=[c for c in cases if not c["ok"]], ok=ok, children=children)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"compiler output: {'yes' if compiler_output else 'none'}; configurations that failed "
          f"to compile: {len(failed_configs)}; cases failed: {len(report['cases_failed'])} of "
          f"{len(cases)}; report: {args.out}")
    for t in failed_configs:
        print(f"  failed: {t['kernel']} {t['config']} TMA={t['use_tma']} D={t['head_dim']} "
              f"causal={t['causal']}")
    return 0 if ok else 1


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        run_child(json.loads(arguments.child), arguments.out)
    else:
        sys.exit(main(arguments))
