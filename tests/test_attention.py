"""Triton FlashAttention against a float64 reference: forward output, lse and every gradient.

Runs under the Triton interpreter on CPU (fp16 and fp32, small shapes) and natively on CUDA,
where bf16 and long sequences are added. Tolerance follows the house rule: the kernel's error
against the fp64 reference may be at most about twice that of plain PyTorch computing the same
attention in the same low precision, plus a few units in the last place of the output dtype
(``numerics.assert_no_worse_than_torch``).
"""

import json
import math
import re

import pytest
import torch
import triton

from conftest import DEVICE, load_script
from numerics import assert_no_worse_than_torch, magnitude
from flashlm import flash_attn_func, flash_attn_varlen_func
from flashlm.kernels.attention import attention_reference, varlen_attention_reference
from flashlm.kernels import utils as kernel_utils
from flashlm.kernels.attention import flash_attn as fa

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# The interpreter's bf16 dot is wrong on CPU in current triton: bf16 is tested on the GPU.
# Units in the last place allowed beyond twice PyTorch's error: 4, and 32 in fp32 (2^-20 at
# magnitude 1), where the kernel's exp2 of log2(e)-scaled scores and torch's exp round apart.
ULPS = {torch.float16: 4, torch.bfloat16: 4, torch.float32: 32}


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _inputs(seed, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)
    q = rnd(batch, seqlen_q, nheads, head_dim)
    k = rnd(batch, seqlen_k, nheads_k, head_dim)
    v = rnd(batch, seqlen_k, nheads_k, head_dim)
    dout = rnd(batch, seqlen_q, nheads, head_dim)
    return q, k, v, dout


def _reference(q, k, v, dout, causal, dtype, window=(-1, -1)):
    """(out, lse, dq, dk, dv) of attention_reference computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, causal=causal, window_size=window)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return (out.detach(), lse.detach(), *grads)


def _check_results(got, ref64, low, dtype, names=("out", "lse", "dq", "dk", "dv")):
    """Each of ``got`` against the fp64 reference, no worse than plain PyTorch in ``dtype``
    (``low``). A gradient that cancels to ~0 (dk with a single key) is judged on the scale of
    all the gradients, since its rounding noise comes from terms of that size."""
    grads = [r for name, r in zip(names, ref64) if name.startswith("d")]
    grad_scale = max(magnitude(r) for r in grads)
    for name, g, r, lo in zip(names, got, ref64, low):
        assert_no_worse_than_torch(name, g, r, lo, dtype, ulps=ULPS[dtype],
                                   scale=grad_scale if name.startswith("d") else None)


def _run_poisoned(q, k, v, dout, causal, window=(-1, -1), cu_q=None, cu_k=None, max_q=0, max_k=0,
                  deterministic=True):
    """Forward and backward through the launchers, with every output buffer NaN-filled first."""
    pb = fa._Problem(q, k, cu_q, max_q, max_k, 1.0 / math.sqrt(q.shape[-1]), causal, window,
                     deterministic)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(pb.lse_shape, float("nan"), device=q.device)
    out, lse = fa._flash_fwd_impl(q, k, v, cu_q, cu_k, pb, out=out, lse=lse)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, dk, dv = fa._flash_bwd_impl(dout, q, k, v, out, lse, None, cu_q, cu_k, pb, grads=grads)
    return out, lse, dq, dk, dv


def _compare(q, k, v, dout, causal, dtype, window=(-1, -1), deterministic=True):
    got = _run_poisoned(q, k, v, dout, causal, window, deterministic=deterministic)
    ref64 = _reference(q, k, v, dout, causal, torch.float64, window)
    low = _reference(q, k, v, dout, causal, dtype, window)
    _check_results(got, ref64, low, dtype)


SEQLENS = [(1, 1), (17, 17), (63, 63), (113, 113), (257, 257),
           (17, 63), (63, 17), (113, 257), (257, 113), (1, 113), (113, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"q{s[0]}-k{s[1]}")
def test_seqlens(seqlens, causal, dtype):
    seqlen_q, seqlen_k = seqlens
    batch = 2 if max(seqlens) <= 113 else 1
    q, k, v, dout = _inputs(seqlen_q * 1000 + seqlen_k, batch, seqlen_q, seqlen_k, 4, 2, 64, dtype)
    _compare(q, k, v, dout, causal, dtype)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=_name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [8, 32, 40, 64, 96, 128, 256], ids=lambda d: f"d{d}")
def test_head_dims(head_dim, causal, dtype):
    q, k, v, dout = _inputs(head_dim, 1, 113, 97, 2, 1, head_dim, dtype)
    _compare(q, k, v, dout, causal, dtype)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8], ids=lambda r: f"gqa{r}")
def test_gqa_ratios(ratio):
    q, k, v, dout = _inputs(ratio, 2, 63, 80, 8, 8 // ratio, 32, torch.float16)
    _compare(q, k, v, dout, True, torch.float16)


WINDOWS = [((16, -1), True), ((0, 0), False), ((8, 8), False), ((40, 5), False),
           ((-1, 7), False), ((70, -1), False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("seqlens", [(113, 113), (63, 150), (150, 63)],
                         ids=lambda s: f"q{s[0]}-k{s[1]}")
@pytest.mark.parametrize("window,causal", WINDOWS,
                         ids=lambda w: f"w{w[0]}_{w[1]}" if isinstance(w, tuple) else
                         ("causal" if w else "full"))
def test_sliding_window(window, causal, seqlens, dtype):
    q, k, v, dout = _inputs(sum(seqlens) + window[0], 1, *seqlens, 4, 2, 32, dtype)
    _compare(q, k, v, dout, causal, dtype, window)


def _varlen_inputs(seed, lens_q, lens_k, nheads, nheads_k, head_dim, dtype):
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)
    def cu(lens):
        return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                            device=DEVICE)
    total_q, total_k = sum(lens_q), sum(lens_k)
    return (rnd(total_q, nheads, head_dim), rnd(total_k, nheads_k, head_dim),
            rnd(total_k, nheads_k, head_dim), rnd(total_q, nheads, head_dim),
            cu(lens_q), cu(lens_k))


def _varlen_reference(q, k, v, dout, cu_q, cu_k, causal, window, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention_reference(*leaves, cu_q, cu_k, causal=causal, window_size=window)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype)))


DOCS = {
    "mixed": ([0, 1, 17, 63, 113, 5, 40], None),
    "one": ([97], None),
    "cross": ([5, 0, 70, 33], [9, 12, 0, 100]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("window,causal", [((-1, -1), False), ((-1, -1), True), ((12, -1), True)],
                         ids=["full", "causal", "causal-w12"])
@pytest.mark.parametrize("docs", sorted(DOCS))
def test_varlen(docs, window, causal, dtype):
    """Packed documents against one reference attention per document (empty and length-1
    documents included); no attention may cross a document boundary."""
    lens_q, lens_k = DOCS[docs]
    lens_k = lens_k or lens_q
    q, k, v, dout, cu_q, cu_k = _varlen_inputs(len(docs) + sum(lens_q), lens_q, lens_k, 4, 2,
                                               64, dtype)
    got = _run_poisoned(q, k, v, dout, causal, window, cu_q, cu_k, max(lens_q), max(lens_k))
    ref64 = _varlen_reference(q, k, v, dout, cu_q, cu_k, causal, window, torch.float64)
    low = _varlen_reference(q, k, v, dout, cu_q, cu_k, causal, window, dtype)
    _check_results(got, ref64, low, dtype)


@pytest.mark.skipif(not ON_GPU, reason="documents long enough for the autotuned (TMA) path need a GPU")
def test_varlen_long_documents_gpu():
    """Documents past the fixed-tile threshold, with ragged ends, take the tuned kernels (tensor
    descriptors on Hopper), where a box can read into the next document."""
    lens = [1500, 2047, 1453, 9]
    q, k, v, dout, cu_q, cu_k = _varlen_inputs(3, lens, lens, 4, 2, 128, torch.bfloat16)
    got = _run_poisoned(q, k, v, dout, True, (-1, -1), cu_q, cu_k, max(lens), max(lens))
    ref64 = _varlen_reference(q, k, v, dout, cu_q, cu_k, True, (-1, -1), torch.float64)
    low = _varlen_reference(q, k, v, dout, cu_q, cu_k, True, (-1, -1), torch.bfloat16)
    _check_results(got, ref64, low, torch.bfloat16)


def test_varlen_public_api_matches_dense_per_document():
    """flash_attn_varlen_func through autograd equals flash_attn_func run on each document."""
    lens = [30, 1, 64]
    q, k, v, dout, cu, _ = _varlen_inputs(21, lens, lens, 4, 4, 32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu, cu, max(lens), max(lens), causal=True)
    grads = torch.autograd.grad(out, leaves, dout)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        doc = [t[a:b][None].clone().requires_grad_() for t in (q, k, v)]
        ref = flash_attn_func(*doc, causal=True)
        ref_grads = torch.autograd.grad(ref, doc, dout[a:b][None])
        torch.testing.assert_close(out[a:b], ref[0])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g[a:b], r[0])


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


VARLEN_BAD = {
    "not_monotone": (lambda: (_cu([0, 10, 5, 16]), _cu([0, 10, 5, 16]), 10), ValueError,
                     "never decrease"),
    "total_mismatch": (lambda: (_cu([0, 8, 15]), _cu([0, 8, 15]), 8), ValueError,
                       "does not match the 16 packed tokens"),
    "not_from_zero": (lambda: (_cu([2, 8, 16]), _cu([2, 8, 16]), 8), ValueError, "start at 0"),
    "dtype": (lambda: (_cu([0, 8, 16], torch.int64), _cu([0, 8, 16]), 8), TypeError,
              "torch.int32"),
    "max_too_small": (lambda: (_cu([0, 4, 16]), _cu([0, 4, 16]), 8), ValueError,
                      "max_seqlen=8 is smaller"),
    "count_mismatch": (lambda: (_cu([0, 8, 16]), _cu([0, 16]), 16), ValueError, "offsets"),
}


@pytest.mark.parametrize("case", sorted(VARLEN_BAD))
def test_varlen_bad_cu_seqlens(case):
    make, exc, message = VARLEN_BAD[case]
    cu_q, cu_k, max_len = make()
    q = _t(16, 2, 16)
    with pytest.raises(exc, match=message):
        flash_attn_varlen_func(q, q, q, cu_q, cu_k, max_len, max_len)


def test_varlen_unchecked_offsets_still_check_shape_and_dtype():
    """check_cu_seqlens=False skips only the read-back of the values."""
    q = _t(16, 2, 16)
    with pytest.raises(TypeError, match="torch.int32"):
        flash_attn_varlen_func(q, q, q, _cu([0, 8, 16], torch.int64), _cu([0, 8, 16]), 8, 8,
                               check_cu_seqlens=False)
    good = _cu([0, 5, 16])
    out = flash_attn_varlen_func(q, q, q, good, good, 11, 11, causal=True, check_cu_seqlens=False)
    ref = flash_attn_varlen_func(q, q, q, good, good, 11, 11, causal=True)
    assert torch.equal(out, ref)


def test_bad_window():
    q = _t(1, 8, 2, 16)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, q, q, window_size=4)


def test_autograd_through_public_api_with_lse_gradient():
    """flash_attn_func's autograd, with a loss that also uses lse (so dlse reaches the kernel)."""
    torch.manual_seed(0)
    q, k, v, dout = _inputs(7, 2, 70, 90, 4, 2, 64, torch.float32)
    dlse = torch.randn(2, 4, 70, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_func(*leaves, causal=True, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 70)
    grads = torch.autograd.grad([out, lse], leaves, [dout, dlse])
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_leaves, causal=True)
    ref_grads = torch.autograd.grad([ref_out, ref_lse], ref_leaves, [dout.double(), dlse.double()])
    for got, ref in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# Consumers of lse whose gradient reaches the backward in the layouts autograd really makes:
# (consumer, check on the gradient's strides). w is a random tensor shaped like lse.
LSE_CONSUMERS = {
    "sum": (lambda lse, w: lse.sum(), lambda g: all(st == 0 for st in g.stride())),
    "sum-over-dim0": (lambda lse, w: (lse.sum(0) * w[0]).sum(), lambda g: g.stride(0) == 0),
    "transposed": (lambda lse, w: (lse.mT * w.mT.contiguous()).sum(),
                   lambda g: not g.is_contiguous() and g.stride(-1) != 1),
    "strided-slice": (lambda lse, w: (lse[..., ::3] * w[..., ::3]).sum(), lambda g: True),
}
LSE_PATHS = ["dense", "varlen", "custom-op-dense", "custom-op-varlen"]


def _attention_with_lse(path, q, k, v, cu, max_len):
    """(out, lse) of causal attention through ``path``: the public functions, or the custom
    op that torch.compile traces, called eagerly (its registered autograd)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if path == "dense":
        return flash_attn_func(q, k, v, causal=True, return_lse=True)
    if path == "varlen":
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True,
                                      return_lse=True)
    op = torch.ops.flashlm.flash_attn_fwd
    if path == "custom-op-dense":
        return op(q, k, v, None, None, q.shape[1], k.shape[1], scale, True, -1, -1, True)
    return op(q, k, v, cu, cu, max_len, max_len, scale, True, -1, -1, True)


@pytest.mark.parametrize("path", LSE_PATHS)
@pytest.mark.parametrize("consumer", sorted(LSE_CONSUMERS))
@pytest.mark.parametrize("use_out", [True, False], ids=["out-and-lse", "lse-only"])
def test_lse_gradient_in_any_layout(consumer, path, use_out):
    """The gradient of lse reaches the backward as autograd makes it (a stride-0 broadcast from
    ``lse.sum()``, a transposed view, ...): q, k and v get the reference's gradients, dense and
    packed, through the eager function and the custom op, with and without a loss on out."""
    loss_of_lse, layout_ok = LSE_CONSUMERS[consumer]
    lens = [23, 1, 40]
    q, k, v, dout, cu, _ = _varlen_inputs(len(consumer), lens, lens, 4, 2, 32, torch.float32)
    dense = not path.endswith("varlen")
    if dense:  # two sequences of 32 from the same numbers
        q, k, v, dout = (t[:64].view(2, 32, *t.shape[1:]) for t in (q, k, v, dout))

    def loss(out, lse, w, layouts):
        lse.register_hook(lambda g: layouts.append(g))
        total = loss_of_lse(lse, w)
        return total + (out * dout.to(out.dtype)).sum() if use_out else total

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _attention_with_lse(path, *leaves, cu, max(lens))
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    layouts = []
    # Without a loss on out, v gets a zero gradient: lse does not depend on it.
    grads = torch.autograd.grad(loss(out, lse, w, layouts), leaves, materialize_grads=True)
    assert layouts and layout_ok(layouts[0]), [g.stride() for g in layouts]

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    if dense:
        ref_out, ref_lse = attention_reference(*ref_leaves, causal=True)
    else:
        ref_out, ref_lse = varlen_attention_reference(*ref_leaves, cu, cu, causal=True)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse, w.double(), []), ref_leaves,
                                    materialize_grads=True)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=name)


def test_replay_takes_out_and_lse_in_any_layout():
    """flash_attn_replay with the forward's out and lse handed over as other layouts of the same
    values (lse transposed in memory, out without a unit last stride), and a broadcast output
    gradient: the same gradients as the forward's own tensors."""
    q, k, v, dout = _inputs(41, 2, 40, 40, 4, 2, 32, torch.float32)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    views = (out.mT.contiguous().mT, lse.mT.contiguous().mT)
    assert views[0].stride(-1) != 1 and not views[1].is_contiguous()
    grads = []
    for saved_out, saved_lse in ((out, lse), views):
        for loss in (lambda o: (o * dout).sum(), lambda o: o.sum()):  # the second: dout broadcast
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            again = fa.flash_attn_replay(*leaves, saved_out, saved_lse, causal=True)
            grads.append(torch.autograd.grad(loss(again), leaves))
    for i, (a, b) in enumerate(zip(grads[:2], grads[2:])):
        for name, x, y in zip(("dq", "dk", "dv"), a, b):
            assert torch.equal(x, y), (i, name)


BAD_SCALES = [0.0, -0.125, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=str)
def test_softmax_scale_must_be_positive_and_finite(scale):
    """The kernels need a positive finite scale (the running row maximum of the scaled scores
    is taken from the raw scores; 0 times a masked -inf is NaN): anything else is refused by
    every entry point with an error that names the argument."""
    q = _t(1, 16, 2, 16)
    cu = _cu([0, 16])
    out, lse = flash_attn_func(q, q, q, causal=True, return_lse=True)
    calls = {
        "flash_attn_func": lambda: flash_attn_func(q, q, q, softmax_scale=scale, causal=True),
        "flash_attn_varlen_func": lambda: flash_attn_varlen_func(
            q[0], q[0], q[0], cu, cu, 16, 16, softmax_scale=scale, causal=True),
        "flash_attn_replay": lambda: fa.flash_attn_replay(q, q, q, out, lse, softmax_scale=scale,
                                                          causal=True),
    }
    for fn, call in calls.items():
        with pytest.raises(ValueError, match=rf"{fn}: softmax_scale=.* positive finite"):
            call()
    with pytest.raises(TypeError, match="softmax_scale must be a number"):
        flash_attn_func(q, q, q, softmax_scale="auto")


@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.5])
def test_softmax_scale_other_than_the_default(scale):
    """Any positive scale, small or large, against the reference: output, lse and gradients."""
    q, k, v, dout = _inputs(43, 1, 37, 53, 4, 2, 32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_func(*leaves, softmax_scale=scale, causal=True, return_lse=True)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_leaves, softmax_scale=scale, causal=True)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    for got, ref in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_tuned_lists_leave_out_what_ptxas_crashes_on(kind):
    """With TMA, no kernel's tuner tries the 4-warp 2-stage tiles ptxas (triton 3.6) crashes on
    (a crash the tuner survives, after printing the whole PTX); through pointers they stay,
    and head dim 256 still keeps the small fallback."""
    configs = fa._configs(kind)

    def kept(block_d, use_tma, dtype=torch.bfloat16):
        q = torch.empty(1, dtype=dtype)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in fa._prune(configs, {"Q": q}, BLOCK_D=block_d, USE_TMA=use_tma)]

    for block_d in (64, 128):
        tma = kept(block_d, True)
        assert tma and all(c[2:] != fa._PTXAS_CRASHES_WITH_TMA for c in tma), tma
    assert any(c[2:] == (4, 2) for c in kept(128, False))
    last = configs[-1]
    fallback = (last.kwargs["BLOCK_M"], last.kwargs["BLOCK_N"], last.num_warps, last.num_stages)
    assert fallback in kept(256, False) and fallback in kept(256, False, torch.float32)


class _RecordingKernel:
    """Stands in for a compiled kernel: records each launch's grid, arguments and the TMA
    boxes its descriptors carried."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            boxes = [list(d.block_shape) for d in args if hasattr(d, "block_shape")]
            self.launches.append((grid, args, kwargs, boxes))
        return launch


class _TimingTuner:
    """Stands in for triton's autotuner: picks a configuration per key from made-up timings
    (so not the first), runs its pre-hook, launches it, and counts its tuning runs."""

    def __init__(self, kind):
        self.fn = _RecordingKernel()
        self.configs = fa._configs(kind)
        self.tuned = 0

    def __getitem__(self, grid_fn):
        def run(*args, **meta):
            self.tuned += 1
            self.best_config = self.configs[(self.tuned + 1) % len(self.configs)]
            kwargs = {**meta, **self.best_config.all_kwargs()}
            self.best_config.pre_hook({"DESC_A": args[2], "DESC_B": args[3], **kwargs})
            self.fn[grid_fn(kwargs)](*args, **kwargs)
        return run


@pytest.mark.parametrize("use_tma", [False, True])
def test_tuned_launch_reuses_the_autotuners_choice(use_tma, monkeypatch):
    """Once the autotuner has chosen for a key, a launch with that key launches exactly what the
    autotuner launched (grid, arguments, blocks, warps, stages, TMA boxes) without asking it
    again; another sequence bucket or dtype goes back to it."""
    monkeypatch.setattr(fa, "_CHOSEN", {"fwd": {}, "dkdv": {}, "dq": {}})

    class Desc:
        block_shape = [1, 16, 1, 64]

    def launch(tuner, bucket, dtype):
        q = torch.zeros(2, 3, dtype=dtype)
        descs = (Desc(), Desc()) if use_tma else (q, q)
        grid = lambda m: (bucket // m["BLOCK_M"], 6)  # noqa: E731
        fa._launch("dkdv", tuner, grid, q, 7, *descs, seq_bucket=bucket, descs=descs,
                   HEAD_DIM=64, BLOCK_D=64, USE_TMA=use_tma)
        grid_, args, kwargs, boxes = tuner.fn.launches[-1]
        return grid_, [a if isinstance(a, int) else a.dtype for a in args[:2]], kwargs, boxes

    tuner = _TimingTuner("dkdv")
    first = launch(tuner, 4096, torch.float16)
    assert tuner.tuned == 1 and tuner.configs[2].all_kwargs().items() <= first[2].items()
    assert launch(tuner, 4096, torch.float16) == first and tuner.tuned == 1
    assert len(tuner.fn.launches) == 2
    other = launch(tuner, 8192, torch.float16)
    assert tuner.tuned == 2 and other != first
    launch(tuner, 4096, torch.float32)
    assert tuner.tuned == 3
    assert launch(tuner, 4096, torch.float16) == first and tuner.tuned == 3


def test_kernels_load_once_under_one_name():
    """The kernels are flashlm.kernels.<op> only: imported through the repository's top-level
    kernels/ folder as ``kernels.attention`` (a namespace package when no other distribution
    named kernels is installed), they refuse to load, so the flashlm:: custom ops can never be
    registered a second time by a second copy."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import importlib.machinery, importlib.util, sys\n"
            f"spec = importlib.machinery.PathFinder.find_spec('kernels', [{root!r}])\n"
            "assert spec.loader is None or spec.origin is None, spec  # a namespace, no __init__\n"
            "sys.modules['kernels'] = importlib.util.module_from_spec(spec)\n"
            "import kernels.attention\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "must be imported as flashlm.kernels.<op>" in run.stderr, run.stderr[-2000:]


def test_rows_that_see_no_key():
    """Causal with seqlen_q > seqlen_k: the first rows see nothing, so out = 0, lse = +inf."""
    q, k, v, dout = _inputs(3, 1, 40, 8, 2, 2, 32, torch.float32)
    out, lse, dq, dk, dv = _run_poisoned(q, k, v, dout, True)
    assert torch.all(out[:, :32] == 0) and torch.all(torch.isposinf(lse[:, :, :32]))
    assert torch.all(dq[:, :32] == 0)
    assert torch.isfinite(lse[:, :, 32:]).all() and out[:, 32:].abs().sum() > 0


def test_strided_inputs_are_used_in_place():
    """q, k, v as views into one packed qkv tensor: strided, unit last stride, no copy."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 50, 3, 4, 32, generator=gen).to(DEVICE, torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    assert fa.unit_last(q).data_ptr() == q.data_ptr()
    dout = torch.randn(2, 50, 4, 32, generator=gen).to(DEVICE, torch.float16)
    _compare(q, k, v, dout, True, torch.float16)


def test_backward_is_deterministic():
    q, k, v, dout = _inputs(5, 2, 130, 130, 4, 1, 64, torch.float16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attn_func(*leaves, causal=True)
        runs.append((out, *torch.autograd.grad(out, leaves, dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# The inner loops' tiles through TMA tensor descriptors (the default on Hopper GPUs; forced
# here so the interpreter runs that path too): ragged ends, cross lengths, GQA, a padded head
# dim, windows and packed documents, where a box can reach past a sequence.
TMA_CASES = {
    "q113-k113-causal": (113, 113, 4, 4, 64, True, (-1, -1)),
    "q63-k150-full-gqa2": (63, 150, 4, 2, 64, False, (-1, -1)),
    "q150-k63-causal-gqa4": (150, 63, 4, 1, 64, True, (-1, -1)),
    "q113-k113-window": (113, 113, 2, 1, 64, True, (20, -1)),
    "q70-k70-d40": (70, 70, 2, 2, 40, True, (-1, -1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("case", sorted(TMA_CASES))
def test_tma_loads(case, dtype, monkeypatch):
    monkeypatch.setattr(fa, "_use_tma", lambda *tensors: True)
    _compare_tma_case(case, dtype)


def _compare_tma_case(case, dtype):
    seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, window = TMA_CASES[case]
    q, k, v, dout = _inputs(len(case), 2, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype)
    _compare(q, k, v, dout, causal, dtype, window)


@pytest.mark.parametrize("docs", ["mixed", "cross"])
def test_tma_loads_varlen(docs, monkeypatch):
    monkeypatch.setattr(fa, "_use_tma", lambda *tensors: True)
    test_varlen(docs, (-1, -1), True, torch.float16)


@pytest.mark.skipif(not ON_GPU, reason="the pointer path is the interpreter's default already")
@pytest.mark.parametrize("case", sorted(TMA_CASES))
def test_pointer_loads_gpu(case, monkeypatch):
    """On the GPU, where TMA is the default, the pointer path must stay correct (misaligned
    tensors and pre-Hopper GPUs take it)."""
    monkeypatch.setattr(fa, "_use_tma", lambda *tensors: False)
    _compare_tma_case(case, torch.bfloat16)


def test_use_tma_rules():
    """TMA only for CUDA tensors with 16-byte aligned bases and nonzero strides (a broadcast,
    such as the gradient of ``out.sum()``, takes pointers)."""
    assert not fa._use_tma(torch.randn(2, 8, 2, 16))
    if ON_GPU and torch.cuda.get_device_capability()[0] >= 9:
        t = torch.randn(2, 8, 2, 16, device="cuda", dtype=torch.float16)
        assert fa._use_tma(t)
        assert not fa._use_tma(t.flatten()[1:].view(-1)[:2 * 8 * 2 * 15].view(2, 8, 2, 15))
        assert not fa._use_tma(t[:, :1].expand(2, 8, 2, 16))


def test_torch_compile_fullgraph():
    """Registered as a custom op with a fake: compiles with fullgraph=True (no graph break)."""
    q, k, v, dout = _inputs(9, 1, 33, 33, 2, 1, 32, torch.float32)

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True) * 2.0

    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = f(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a, b)


def _t(*shape, dtype=torch.float16, device=DEVICE):
    return torch.randn(*shape).to(device=device, dtype=dtype)


BAD_INPUTS = {
    "rank": (lambda: (_t(2, 8, 2, 16)[0], _t(2, 8, 2, 16), _t(2, 8, 2, 16)),
             ValueError, "q must have 4 dimensions"),
    "batch": (lambda: (_t(2, 8, 2, 16), _t(3, 8, 2, 16), _t(3, 8, 2, 16)),
              ValueError, "batch size mismatch"),
    "head_dim_mismatch": (lambda: (_t(1, 8, 2, 16), _t(1, 8, 2, 32), _t(1, 8, 2, 32)),
                          ValueError, "head_dim mismatch"),
    "kv_shape": (lambda: (_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 9, 2, 16)),
                 ValueError, "same shape"),
    "gqa": (lambda: (_t(1, 8, 3, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)),
            ValueError, "nheads=3"),
    "head_dim_odd": (lambda: (_t(1, 8, 2, 20), _t(1, 8, 2, 20), _t(1, 8, 2, 20)),
                     ValueError, "head_dim=20"),
    "head_dim_big": (lambda: (_t(1, 8, 2, 264), _t(1, 8, 2, 264), _t(1, 8, 2, 264)),
                     ValueError, "head_dim=264"),
    "dtype": (lambda: tuple(_t(1, 8, 2, 16, dtype=torch.float64) for _ in range(3)),
              TypeError, "torch.float64"),
    "int_dtype": (lambda: tuple(torch.ones(1, 8, 2, 16, dtype=torch.int32) for _ in range(3)),
                  TypeError, "torch.int32"),
    "mixed_dtype": (lambda: (_t(1, 8, 2, 16), _t(1, 8, 2, 16, dtype=torch.float32),
                             _t(1, 8, 2, 16)), TypeError, "share one dtype"),
    "not_tensor": (lambda: ([[1.0]], _t(1, 8, 2, 16), _t(1, 8, 2, 16)), TypeError, "q must be"),
    "devices": (lambda: (_t(1, 8, 2, 16), _t(1, 8, 2, 16, device="meta"), _t(1, 8, 2, 16)),
                ValueError, "one device"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case):
    make, exc, message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        flash_attn_func(*make())


def test_cpu_tensors_rejected_without_interpreter(monkeypatch):
    """When Triton cannot run CPU tensors, the error says so before anything is launched."""
    monkeypatch.setattr(kernel_utils, "is_interpreted", lambda kernel: False)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="on the CPU"):
        flash_attn_func(q, q, q)


@pytest.mark.skipif(not ON_GPU, reason="the autotuned kernels run on a GPU")
def test_tuned_launches_repeat_exactly_gpu(monkeypatch):
    """The first call of a tuned shape goes through the autotuner, the next launches its choice
    directly (`flash_attn._CHOSEN`): same output and gradients, bit for bit. A window keeps the
    forward on the Triton kernel (the Gluon one takes no window), so all three kernels are tuned."""
    monkeypatch.setattr(fa, "_CHOSEN", {"fwd": {}, "dkdv": {}, "dq": {}})
    q, k, v, dout = _inputs(21, 2, 4096, 4096, 8, 2, 64, torch.bfloat16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attn_func(*leaves, causal=True, window_size=(1000, 0), deterministic=True)
        runs.append((out, *torch.autograd.grad(out, leaves, dout)))
    assert all(len(chosen) == 1 for chosen in fa._CHOSEN.values()), fa._CHOSEN
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ON_GPU, reason="long sequences need a GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", [3001, 16384, 32768, 65536], ids=lambda s: f"s{s}")
def test_long_sequences_gpu(seqlen, causal):
    """Long sequences in bf16 against SDPA in fp32 (the S x S fp64 reference would not fit)."""
    import torch.nn.functional as F
    q, k, v, dout = _inputs(seqlen, 1, seqlen, seqlen, 4, 2, 128, torch.bfloat16)

    def sdpa(dtype):
        # Memory-efficient (fp32) and flash (bf16) SDPA: neither materializes S x S.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.EFFICIENT_ATTENTION if dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        group = q.shape[2] // k.shape[2]
        qt = leaves[0].transpose(1, 2)
        kt, vt = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in leaves[1:])
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype)))

    ref = sdpa(torch.float32)
    low = sdpa(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, causal=causal)
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    _check_results(got, ref, low, torch.bfloat16, names=("out", "dq", "dk", "dv"))


def test_replay_gives_the_forward_and_its_gradients():
    """flash_attn_replay with a forward's own (out, lse) returns that output, and its backward
    equals the one through flash_attn_func, for dense and packed inputs; mismatched results are
    rejected."""
    q, k, v, dout = _inputs(31, 2, 40, 40, 4, 2, 32, torch.float32)
    lens = [13, 27, 40]
    cu = torch.tensor([0, 13, 40, 80], dtype=torch.int32, device=DEVICE)
    flat = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    for packed in (False, True):
        leaves = [(t.flatten(0, 1) if packed else t).clone().requires_grad_() for t in (q, k, v)]
        grad_out = dout.flatten(0, 1) if packed else dout
        if packed:
            out, lse = flash_attn_varlen_func(*leaves, cu, cu, max(lens), max(lens), causal=True,
                                              window_size=(9, -1), return_lse=True)
        else:
            out, lse = flash_attn_func(*leaves, causal=True, window_size=(9, -1), return_lse=True)
        want = torch.autograd.grad(out, leaves, grad_out)
        again = fa.flash_attn_replay(*leaves, out.detach(), lse.detach(), causal=True,
                                     window_size=(9, -1), **(flat if packed else {}))
        assert torch.equal(again, out)
        for a, b in zip(torch.autograd.grad(again, leaves, grad_out), want):
            assert torch.equal(a, b)
    lse = torch.zeros(2, 4, 40, device=DEVICE)  # (batch, heads, seqlen_q)
    with pytest.raises(ValueError, match="out must match q"):
        fa.flash_attn_replay(q, k, v, q[:, :5].clone(), lse)
    with pytest.raises(ValueError, match="lse must be float32"):
        fa.flash_attn_replay(q, k, v, q.clone(), lse.double())
    with pytest.raises(ValueError, match="lse must be float32"):
        fa.flash_attn_replay(q, k, v, q.clone(), lse[:, :, :-1])


# The Gluon forward for Hopper (kernels/attention/hopper_fwd.py) runs only on compute
# capability 9.x; the interpreter cannot run Gluon, so these tests need that GPU.
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9


def _gluon_cases(test):
    """The shapes, head dims, masks and dtypes both Gluon kernels are checked on."""
    for mark in (
            pytest.mark.parametrize("shape", [(2, 256, 4, 2), (1, 1024, 2, 1)],
                                    ids=["b2-s256-gqa2", "b1-s1024-mqa"]),
            pytest.mark.parametrize("head_dim", [64, 128]),
            pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"]),
            pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)):
        test = mark(test)
    return test


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon forward needs a Hopper GPU")
@_gluon_cases
def test_gluon_forward_gpu(shape, head_dim, causal, dtype, monkeypatch):
    """The Gluon forward (forced on, and checked to have run) gives the reference's out and lse,
    with NaN-poisoned buffers; the shared backward then gives the reference's gradients."""
    from flashlm.kernels.attention import hopper_fwd
    calls = []
    launch = hopper_fwd.hopper_fwd
    monkeypatch.setattr(hopper_fwd, "hopper_fwd", lambda *a: calls.append(1) or launch(*a))
    monkeypatch.setenv("FLASHLM_GLUON_FWD", "1")
    batch, seqlen, nheads, nheads_k = shape
    q, k, v, dout = _inputs(seqlen + head_dim, batch, seqlen, seqlen, nheads, nheads_k, head_dim, dtype)
    _compare(q, k, v, dout, causal, dtype)
    assert calls, "the Gluon forward did not run"


def test_gluon_forward_dispatch(monkeypatch):
    """The Gluon forward is taken only where its scope holds: never for CPU tensors, packed
    documents, sliding windows, ragged lengths, or when FLASHLM_GLUON_FWD=0."""
    from flashlm.kernels.attention import hopper_fwd
    q, k, v, _ = _inputs(0, 1, 256, 256, 2, 2, 128, torch.float16)

    def taken(q, k, causal=True, window=(-1, -1)):
        pb = fa._Problem(q, k, None, 0, 0, 0.1, causal, window)
        return fa._gluon_forward(q, k, k, q, pb)

    expected = ON_HOPPER and hopper_fwd.available()
    assert taken(q, k) == expected
    assert taken(q, k, causal=False) == expected
    assert taken(q, k, causal=False, window=(-1, 0)) == expected  # the causal mask, spelled out
    assert not taken(q, k, causal=False, window=(64, 0))
    assert not taken(q, k, causal=False, window=(-1, 64))
    assert not taken(q[:, :200], k[:, :200])  # not a multiple of the 128-row block
    assert not taken(q, k[:, :128])  # seqlen_q != seqlen_k
    monkeypatch.setenv("FLASHLM_GLUON_FWD", "0")
    assert not taken(q, k)
    monkeypatch.setenv("FLASHLM_GLUON_FWD", "")
    q64, k64, _, _ = _inputs(0, 1, 256, 256, 2, 2, 64, torch.float16)
    assert taken(q64, k64) == expected  # head dims 64 and 128 both
    monkeypatch.setenv("FLASHLM_GLUON_FWD", "off")
    with pytest.raises(ValueError, match="FLASHLM_GLUON_FWD must be 0"):
        flash_attn_func(q, k, k)


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon backward needs a Hopper GPU")
@_gluon_cases
def test_gluon_backward_gpu(shape, head_dim, causal, dtype, monkeypatch):
    """The fused Gluon backward (deterministic=False; checked to have run) gives the reference's
    gradients with NaN-poisoned buffers, and agrees with the deterministic backward to within
    the rounding of the gradients' dtype."""
    from flashlm.kernels.attention import hopper_bwd
    calls = []
    launch = hopper_bwd.hopper_bwd
    monkeypatch.setattr(hopper_bwd, "hopper_bwd", lambda *a: calls.append(1) or launch(*a))
    # The kernel runs every case here, also those the dispatch leaves to the deterministic pair.
    monkeypatch.setattr(hopper_bwd, "FASTER", {(d, c) for d in (64, 128) for c in (False, True)})
    batch, seqlen, nheads, nheads_k = shape
    q, k, v, dout = _inputs(seqlen + head_dim + 7, batch, seqlen, seqlen, nheads, nheads_k,
                            head_dim, dtype)
    _compare(q, k, v, dout, causal, dtype, deterministic=False)
    assert calls, "the Gluon backward did not run"
    fused = _run_poisoned(q, k, v, dout, causal, deterministic=False)
    split = _run_poisoned(q, k, v, dout, causal, deterministic=True)
    assert len(calls) == 2
    # dK and dV sum in the same order in both kernels' fp32 accumulators; dQ's order differs.
    for name, a, b in zip(("dq", "dk", "dv"), fused[2:], split[2:]):
        ulp = torch.finfo(dtype).eps * b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 4 * ulp, name


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon backward needs a Hopper GPU")
@pytest.mark.parametrize("sms", [1, 16, 24, 1000])
def test_gluon_backward_program_order_gpu(sms, monkeypatch):
    """Whatever the head grouping of the causal programs (here 1, 2, 3 and all 6 (batch, key
    head) pairs per group), each key block of each head is done once: dK and dV come out
    bit-identical to the one-group order, and dQ agrees to the rounding of its adds."""
    from flashlm.kernels.attention import hopper_bwd
    q, k, v, dout = _inputs(5, 2, 512, 512, 6, 3, 128, torch.bfloat16)
    expected = _run_poisoned(q, k, v, dout, True, deterministic=False)
    monkeypatch.setattr(hopper_bwd, "FASTER", {(128, True)})
    monkeypatch.setattr(hopper_bwd, "sm_count", lambda device: sms)
    got = _run_poisoned(q, k, v, dout, True, deterministic=False)
    assert torch.equal(got[3], expected[3]) and torch.equal(got[4], expected[4])
    ulp = torch.finfo(torch.bfloat16).eps * expected[2].float().abs().max().item()
    assert (got[2].float() - expected[2].float()).abs().max().item() <= 2 * ulp


def test_gluon_backward_head_groups():
    """The causal backward's head groups: a divisor of the (batch, key head) pairs, the
    smallest whose programs fill half the GPU, all pairs when none does, one without a mask."""
    from flashlm.kernels.attention import hopper_bwd
    if not hopper_bwd.available():
        pytest.skip("needs Gluon (triton >= 3.5)")
    group = hopper_bwd._heads_per_group
    assert group(64, 32, True, 132) == 4  # 4K: 4 heads x 32 key blocks >= 66 programs
    assert group(32, 128, True, 132) == 1  # 16K: one head already fills the GPU
    assert group(40, 16, True, 132) == 5  # 2K: 4.1 heads needed, 5 divides 40
    assert group(2, 32, True, 132) == 2  # too few programs in all: one group
    assert group(64, 32, False, 132) == 1
    for n_bhk in (1, 6, 7, 48, 96):
        for n_kb in (1, 2, 8, 32, 128):
            g = group(n_bhk, n_kb, True, 132)
            assert n_bhk % g == 0 and (2 * g * n_kb >= 132 or g == n_bhk)
            assert all(n_bhk % d or 2 * d * n_kb < 132 for d in range(1, g))


def test_bench_rounds_keep_each_modes_median(capsys):
    """`scripts/bench/attention.py --rounds`: each mode keeps its median time and the TFLOP/s that time
    gives, every round's TFLOP/s is kept, a failed round fails the row, and 0 rounds is an
    error that names the flag."""
    bench = load_script("bench/attention")
    flops = {"fwd": 2e12, "bwd": 5e12, "fwd_bwd": 7e12}
    rounds = []
    # Medians (4, 9, 14 ms) that are not the means, from different rounds for each mode.
    for fwd_ms, bwd_ms, all_ms, mem in ((4.0, 9.0, 19.0, 1.0), (5.0, 8.0, 14.0, 1.5),
                                        (1.0, 20.0, 12.0, 1.2)):
        row = {"provider": "flashlm", "peak_mem_gib": mem}
        for mode, ms in (("fwd", fwd_ms), ("bwd", bwd_ms), ("fwd_bwd", all_ms)):
            row[f"{mode}_ms"] = ms
            row[f"{mode}_tflops"] = flops[mode] / (ms * 1e-3) / 1e12
        rounds.append(row)
    got = bench.median_row(rounds)
    for mode, ms in (("fwd", 4.0), ("bwd", 9.0), ("fwd_bwd", 14.0)):
        assert got[f"{mode}_ms"] == ms
        assert got[f"{mode}_tflops"] == pytest.approx(flops[mode] / (ms * 1e-3) / 1e12)
        assert got[f"{mode}_tflops_rounds"] == [r[f"{mode}_tflops"] for r in rounds]
    assert got["peak_mem_gib"] == 1.5
    assert bench.median_row(rounds[:1]) is rounds[0]
    failed = {"provider": "flashlm", "error": "out of memory"}
    assert bench.median_row([rounds[0], failed]) is failed
    assert bench.parse_args(["--rounds", "3", "--masks", "causal"]).rounds == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
    env = {"gpu": "GPU", "date": "d", "torch": "t", "triton": "3", "git_commit": "abc", "rounds": 3}
    assert "median of 3 rounds" in bench.markdown([], env)


def test_bench_rounds_interleave_providers(tmp_path, monkeypatch):
    """With --rounds 2 the providers take turns (a, b, a, b), and the table and JSON keep one
    row per provider with both rounds."""
    bench = load_script("bench/attention")
    calls = []

    def fake_bench_one(provider, batch, seqlen, nheads, head_dim, causal, dtype, device):
        calls.append(provider)
        ms = float(len(calls))
        return {"provider": provider, "peak_mem_gib": 0.5, "fwd_ms": ms, "bwd_ms": 2 * ms,
                "fwd_bwd_ms": 3 * ms, "fwd_tflops": 1 / ms, "bwd_tflops": 1 / ms,
                "fwd_bwd_tflops": 1 / ms}
    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "environment", lambda *args, **kwargs: {
        "gpu": "GPU", "date": "d", "torch": "t", "triton": "3", "git_commit": "abc"})
    monkeypatch.setattr(bench, "plot", lambda results, path: None)
    bench.main(bench.parse_args(["--rounds", "2", "--head-dims", "64", "--seqlens", "1024",
                                 "--masks", "causal", "--providers", "flashlm", "sdpa_cudnn",
                                 "--out", str(tmp_path)]))
    assert calls == ["flashlm", "sdpa_cudnn", "flashlm", "sdpa_cudnn"]
    data = json.loads((tmp_path / "attention.json").read_text())
    rows = data["results"][0]["rows"]
    assert [r["provider"] for r in rows] == ["flashlm", "sdpa_cudnn"]
    assert rows[0]["fwd_tflops_rounds"] == [1.0, 1 / 3]
    assert data["environment"]["rounds"] == 2
    assert "median of 2 rounds" in (tmp_path / "attention.md").read_text()


def test_gluon_backward_dispatch():
    """The fused backward is taken only when the caller gives up determinism, on a Hopper GPU,
    inside its scope (dense, causal or full, lengths a multiple of 128); everything else takes
    the deterministic kernels."""
    from flashlm.kernels.attention import hopper_bwd
    q, k, v, dout = _inputs(0, 1, 256, 256, 2, 2, 128, torch.float16)

    def taken(q, k, deterministic=False, causal=True, window=(-1, -1)):
        pb = fa._Problem(q, k, None, 0, 0, 0.1, causal, window, deterministic)
        return fa._gluon_backward(q, k, k, q, q, k, k, pb)

    expected = ON_HOPPER and hopper_bwd.available()
    assert taken(q, k) == expected
    assert taken(q, k, causal=False) == expected
    assert not taken(q, k, deterministic=True)
    assert not taken(q, k, causal=False, window=(64, 0))
    assert not taken(q[:, :200], k[:, :200])
    assert not taken(q, k[:, :128])
    q64, k64, _, _ = _inputs(1, 1, 256, 256, 2, 2, 64, torch.float16)
    assert taken(q64, k64) == expected
    assert taken(q64, k64, causal=False) == expected
    # Through the public function: the flag reaches the backward, and the gradients are right
    # on every device (elsewhere the deterministic kernels run).
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True, deterministic=False)
    grads = torch.autograd.grad(out, leaves, dout)
    ref = _reference(q, k, v, dout, True, torch.float64)
    for g, r in zip(grads, ref[2:]):
        assert (g.double() - r).abs().max().item() < 2e-2


def test_gluon_descriptor_layouts():
    """The launches' tensor descriptors take their shared-memory layouts from a cache: each
    must be the layout built for that tile's shape and element type (a wrong dtype entry would
    make the TMA copies misread the tiles), and one object per (shape, dtype)."""
    from flashlm.kernels.attention import hopper_bwd, hopper_fwd
    if not hopper_fwd.available():
        pytest.skip("needs Gluon (triton >= 3.5)")
    gl = hopper_fwd.gl
    for dtype, gl_dtype in ((torch.float16, gl.float16), (torch.bfloat16, gl.bfloat16)):
        for head_dim in (64, 128):
            t = torch.empty(2, 256, 4, head_dim, dtype=dtype)
            for rows in (hopper_fwd.BLOCK_M, hopper_bwd.BLOCK_M):
                desc = hopper_fwd._desc(t, rows)
                assert desc.layout == gl.NVMMASharedLayout.get_default_for([rows, head_dim],
                                                                            gl_dtype)
                assert desc.layout is hopper_fwd._desc(t.clone(), rows).layout
                assert desc.block_shape == [rows, head_dim]
            for causal in (False, True):
                dq = hopper_bwd._dq_desc(t.float(), causal)
                assert dq.block_shape == [hopper_bwd.BLOCK_M, head_dim]
                assert dq.layout.element_bitwidth == 32
                # The dQ tile takes a 32-byte swizzle only at head dim 64 with a causal mask,
                # where it measured faster (hopper_bwd._dq_layout); the default elsewhere.
                if head_dim == 64 and causal:
                    assert dq.layout.swizzle_byte_width == 32
                else:
                    assert dq.layout == gl.NVMMASharedLayout.get_default_for(
                        [hopper_bwd.BLOCK_M, head_dim], gl.float32)
    row = hopper_bwd._row_desc(torch.empty(4 * 256))
    assert row.layout.swizzle_byte_width == 0 and row.layout.element_bitwidth == 32


def _hopper_sass(kind, head_dim, causal):
    """SASS of a Gluon kernel ("fwd" or "bwd") compiled for sm_90 by tests/gluon_sass.py in a
    fresh process (the interpreter the CPU suite runs under patches triton's language
    functions); skips when this triton cannot compile it."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "gluon_sass.py")
    run = subprocess.run([sys.executable, script, kind, str(head_dim), str(int(causal))],
                         env=env, capture_output=True, text=True)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _loops(sass):
    """The bodies of the SASS's loops: the instructions from each backward branch's target to
    the branch."""
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append([t for a, t in code if int(target.group(1), 16) <= a <= addr])
    return loops


def _main_loop(sass):
    """The instructions of a kernel's main loop: the shortest loop that spans wgmma
    instructions."""
    loops = [body for body in _loops(sass) if any("HGMMA" in t for t in body)]
    assert loops, "no loop with wgmma found in the SASS"
    return min(loops, key=len)


@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False)], ids=["d128-causal", "d64-full"])
def test_gluon_forward_compiles_for_hopper(head_dim, causal):
    """The Gluon forward compiles for sm_90 with the installed triton, without a GPU (triton
    ships ptxas), and ptxas keeps its schedule: at least one wgmma wait leaves a group in
    flight (``WARPGROUP.DEPBAR.LE gsb0, 0x1``). When ptxas serializes the products it puts
    ``0x0`` after every one. CI runs the newest triton, the GPU machine triton 3.6: this is how
    the kernel is checked on both."""
    sass = _hopper_sass("fwd", head_dim, causal)
    assert sass.count("HGMMA") >= 4 * head_dim // 16  # the scores and P @ V of several steps
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass, "ptxas serialized every wgmma"
    # Its warpgroups take turns and learn that a stage landed through named barriers (BAR.ARV,
    # BAR.SYNC on a register id). With triton 3.6 (the GPU machine's) no barrier 0 over all
    # 256 compute threads is left in it; newer tritons add one after each P @ V wait.
    main_loop = _main_loop(sass)
    assert any("BAR.ARV" in t for t in main_loop)
    assert any(re.search(r"BAR\.SYNC\S* R\d+, 0x100", t) for t in main_loop), "no turn-taking"
    if triton.__version__.startswith("3.6."):
        assert not any(re.search(r"BAR\.SYNC\S* 0x0, 0x100", t) for t in main_loop)
    # The stage-landed signals (BAR.ARV on 160 threads: a warpgroup and the signalling warp)
    # come from a loop that never waits for a stage's release (BAR.SYNC on 288 threads: both
    # warpgroups and the loader), so no signal queues behind the other warpgroup's P @ V.
    signals = [body for body in _loops(sass) if any(re.search(r"BAR\.ARV R\d+, 0xa0", t)
                                                    for t in body)]
    assert signals, "no stage-landed signal in a loop"
    assert not any(re.search(r"BAR\.SYNC\S* R\d+, 0x120", t) for t in min(signals, key=len))


@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False)], ids=["d128-causal", "d64-full"])
def test_gluon_backward_compiles_for_hopper(head_dim, causal):
    """The fused Gluon backward compiles for sm_90 with the installed triton (as the forward
    above), all five products of a step are wgmma, and ptxas keeps dP^T in flight while P^T is
    computed (``WARPGROUP.DEPBAR.LE gsb0, 0x1``) and dQ leaves by TMA reduce-add
    (``UTMAREDG``), not by per-element atomics."""
    sass = _hopper_sass("bwd", head_dim, causal)
    # Per step: S^T and dP^T (K = head_dim each), dV and dK (K = 64 query rows), dQ (K = 128 keys).
    assert sass.count("HGMMA") >= 2 * head_dim // 16 + 2 * 64 // 16 + 128 // 16
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass, "ptxas serialized every wgmma"
    assert "UTMAREDG" in sass and "RED.E.ADD" not in sass
    # The rows' lse and delta arrive in shared memory with each Q tile: the main loop loads
    # nothing from global memory itself, and it issues the step's dQ reduce-add.
    main_loop = _main_loop(sass)
    assert not any(re.search(r"(^|\s)LDG", t) for t in main_loop)
    assert any("UTMAREDG" in t for t in main_loop)
    # At head dim 64, S^T = K Q^T and dP^T = V dO^T take K and V from registers (A operand
    # R<n>, not a shared-memory descriptor): the products that start a fresh accumulator
    # (RZ), other than dQ's from the transposed dS tile, read only Q and dO from shared memory.
    fresh = [t for t in main_loop if "HGMMA" in t and "RZ" in t and "tnspA" not in t]
    assert fresh
    if head_dim == 64:
        assert all(re.search(r"HGMMA\S* R\d+, R\d+, gdesc", t) for t in fresh), fresh
