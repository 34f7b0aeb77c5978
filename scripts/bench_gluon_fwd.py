"""The Gluon forward (kernels/attention/hopper_fwd.py) on a Hopper GPU, in one process.

1. Correctness: out and lse of the Gluon kernel against a float64 reference, and forward +
   backward through `flash_attn_func` with either forward, each within 2x the portable
   kernel's error.
2. Forward TFLOP/s of the Gluon kernel, the portable Triton forward and SDPA's cuDNN backend.
3. Forward+backward TFLOP/s through `flash_attn_func` with either forward.

Writes $OUT/gluon_fwd.json (default /tmp). Run from the repository root with PYTHONPATH=.
The committed results/attention/gluon_fwd.json came from this script at commit eca99d4; it has
since been tidied to reuse bench_attention.py's helpers, with the same shapes and timings.
"""

import contextlib
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import attention_flops, make_attention  # noqa: E402
from flashlm import flash_attn_func  # noqa: E402
from flashlm.kernels.attention import attention_reference  # noqa: E402
from flashlm.kernels.attention import hopper_fwd  # noqa: E402

DEVICE = "cuda"
# (batch, seqlen, heads, kv heads) of the correctness checks.
CHECK_SHAPES = ((2, 512, 4, 2), (1, 1024, 2, 2))
GRAD_SHAPE = (2, 1024, 4, 2)


@contextlib.contextmanager
def gluon_forward(on):
    """flash_attn_func with the Gluon forward forced on or off for the block."""
    old = os.environ.get("FLASHLM_GLUON_FWD")
    os.environ["FLASHLM_GLUON_FWD"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FLASHLM_GLUON_FWD"]
        else:
            os.environ["FLASHLM_GLUON_FWD"] = old


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def check_forward(results):
    for head_dim in (64, 128):
        for causal in (False, True):
            for batch, seqlen, nheads, nheads_k in CHECK_SHAPES:
                for dtype in (torch.bfloat16, torch.float16):
                    q = torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE, dtype=dtype)
                    k, v = (torch.randn(batch, seqlen, nheads_k, head_dim, device=DEVICE,
                                        dtype=dtype) for _ in range(2))
                    assert hopper_fwd.supports(q, k, v, q)
                    out = torch.full_like(q, float("nan"))
                    lse = torch.full((batch, nheads, seqlen), float("nan"), device=DEVICE)
                    hopper_fwd.hopper_fwd(q, k, v, out, lse, head_dim ** -0.5, causal)
                    o_ref, lse_ref = attention_reference(q.double(), k.double(), v.double(),
                                                         causal=causal)
                    with gluon_forward(False):
                        err_portable = max_err(flash_attn_func(q, k, v, causal=causal), o_ref)
                    err_out, err_lse = max_err(out, o_ref), max_err(lse, lse_ref)
                    ok = err_out <= 2 * err_portable + 1e-3 and err_lse < 1e-3
                    results.append(dict(D=head_dim, causal=causal, B=batch, S=seqlen, Hq=nheads,
                                        Hk=nheads_k, dtype=str(dtype), err_out=err_out,
                                        err_lse=err_lse, err_portable=err_portable, ok=ok))
                    print("check", results[-1], flush=True)


def check_forward_backward(results):
    batch, seqlen, nheads, nheads_k = GRAD_SHAPE
    for head_dim in (64, 128):
        for causal in (False, True):
            q = torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, seqlen, nheads_k, head_dim, device=DEVICE,
                                dtype=torch.bfloat16) for _ in range(2))
            dout = torch.randn_like(q)
            leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
            o_ref, _ = attention_reference(*leaves64, causal=causal)
            ref = (o_ref, *torch.autograd.grad(o_ref, leaves64, dout.double()))
            errs = {}
            for on in (True, False):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                with gluon_forward(on):
                    out = flash_attn_func(*leaves, causal=causal)
                    got = (out, *torch.autograd.grad(out, leaves, dout))
                errs[on] = [max_err(g, r) for g, r in zip(got, ref)]
            ok = all(eg <= 2 * ep + 2e-3 for eg, ep in zip(errs[True], errs[False]))
            results.append(dict(kind="fwd+bwd", D=head_dim, causal=causal, err_gluon=errs[True],
                                err_triton=errs[False], ok=ok))
            print("check", results[-1], flush=True)


def tflops(ms, batch, nheads, seqlen, head_dim, causal, mode="fwd"):
    return attention_flops(batch, nheads, seqlen, head_dim, causal, mode) / (ms * 1e-3) / 1e12


def bench_forward(results):
    for head_dim in (128, 64):
        nheads = 2048 // head_dim
        for causal in (True, False):
            for seqlen in (4096, 16384, 65536):
                if head_dim == 64 and seqlen > 16384:
                    continue
                batch = max(16384 // seqlen, 1)
                q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE,
                                       dtype=torch.bfloat16) for _ in range(3))
                out = torch.empty_like(q)
                lse = torch.empty(batch, nheads, seqlen, device=DEVICE)
                cudnn = make_attention("sdpa_cudnn", causal, seqlen, DEVICE)

                def portable():
                    with gluon_forward(False):
                        flash_attn_func(q, k, v, causal=causal)
                fns = {
                    "gluon": lambda: hopper_fwd.hopper_fwd(q, k, v, out, lse, head_dim ** -0.5,
                                                           causal),
                    "triton": portable,
                    "cudnn": lambda: cudnn(q, k, v),
                }
                row = dict(D=head_dim, causal=causal, S=seqlen)
                for name, fn in fns.items():
                    with torch.no_grad():
                        ms = triton.testing.do_bench(fn, warmup=50, rep=300)
                    row[name] = round(tflops(ms, batch, nheads, seqlen, head_dim, causal), 1)
                results.append(row)
                print("bench", row, flush=True)


def bench_forward_backward(results):
    for head_dim, causal, seqlen in ((128, True, 4096), (128, True, 16384),
                                     (128, False, 16384), (64, True, 16384)):
        nheads = 2048 // head_dim
        batch = max(16384 // seqlen, 1)
        q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE,
                               dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        row = dict(kind="fwd+bwd", D=head_dim, causal=causal, S=seqlen)
        for name, on in (("gluon", True), ("triton", False)):
            with gluon_forward(on):
                ms = triton.testing.do_bench(
                    lambda: torch.autograd.grad(flash_attn_func(q, k, v, causal=causal),
                                                (q, k, v), dout), warmup=30, rep=300)
            row[name] = round(tflops(ms, batch, nheads, seqlen, head_dim, causal, "fwd_bwd"), 1)
        results.append(row)
        print("bench", row, flush=True)


def main():
    torch.manual_seed(0)
    results = {"check": [], "bench": []}
    check_forward(results["check"])
    check_forward_backward(results["check"])
    bench_forward(results["bench"])
    bench_forward_backward(results["bench"])
    path = os.path.join(os.environ.get("OUT", "/tmp"), "gluon_fwd.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
