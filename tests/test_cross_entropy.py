"""Triton row-wise cross-entropy against a float64 reference, and the chunked LM-head loss that
runs it (``chunked_linear_cross_entropy(..., fused=True)``) against its PyTorch path and
``F.cross_entropy``.

Runs under the Triton interpreter on CPU (fp16 and fp32, small shapes) and natively on CUDA,
where bf16 and a 32K vocabulary are added: the interpreter rounds fp32 to bf16 toward zero,
which doubles the gradient's rounding error. Tolerance follows the house rule: the kernel's
error against the fp64 reference may be at most about twice that of plain PyTorch computing
the same thing in the same precision, plus a few units in the last place
(``numerics.assert_no_worse_than_torch``).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from numerics import assert_no_worse_than_torch
from flashlm.kernels.cross_entropy import (cross_entropy_forward, cross_entropy_forward_backward_,
                                           cross_entropy_reference)
from flashlm.model.loss import IGNORE_INDEX, chunked_linear_cross_entropy

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _inputs(seed, rows, vocab, dtype, ignored=()):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(device=DEVICE, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    targets[list(ignored)] = IGNORE_INDEX
    scale = (torch.rand(rows, generator=gen) + 0.5).to(DEVICE)
    return logits, targets, scale


def _compare(logits, targets, scale, dtype):
    ref_loss, ref_grad = cross_entropy_reference(logits.double(), targets, scale.double())
    # The kernel's loss is fp32: judged against PyTorch in fp32 on the same logits. Its
    # gradient is rounded to the logits' dtype: judged against PyTorch in that dtype.
    low_loss = cross_entropy_reference(logits.float(), targets, scale)[0]
    low_grad = cross_entropy_reference(logits, targets, scale.to(dtype))[1]
    loss = torch.full((logits.shape[0],), float("nan"), device=logits.device)
    grad = logits.clone()
    assert cross_entropy_forward_backward_(grad, targets, scale, IGNORE_INDEX, out=loss) is loss
    # The ulp term at the output's own magnitude, down to 1e-3 (not 1): losses and gradients
    # here are small, and a floor of 1 would let their errors grow past the signal.
    assert_no_worse_than_torch("loss", loss, ref_loss, low_loss, torch.float32, floor=1e-3)
    assert_no_worse_than_torch("grad", grad, ref_grad, low_grad, dtype, floor=1e-3)
    ignored = targets == IGNORE_INDEX
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    return loss, grad


SHAPES = [(1, 1), (1, 97), (5, 128), (7, 1000), (16, 97), (3, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"rows{s[0]}-vocab{s[1]}")
def test_kernel_matches_reference(shape, dtype):
    rows, vocab = shape
    ignored = range(1, rows, 3)
    logits, targets, scale = _inputs(rows * 7919 + vocab, rows, vocab, dtype, ignored)
    _compare(logits, targets, scale, dtype)


@pytest.mark.skipif(not ON_GPU, reason="a 32K vocabulary is too slow for the CPU interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_kernel_llama_vocab(dtype):
    logits, targets, scale = _inputs(0, 257, 32000, dtype, ignored=range(0, 257, 11))
    _compare(logits, targets, scale, dtype)


def test_all_rows_ignored_strided_rows_and_forward_only():
    torch.manual_seed(0)
    logits, targets, scale = _inputs(1, 6, 300, torch.float32)
    loss = torch.full((6,), float("nan"), device=DEVICE)
    grad = logits.clone()
    cross_entropy_forward_backward_(grad, torch.full_like(targets, IGNORE_INDEX), scale, out=loss)
    assert (loss == 0).all() and (grad == 0).all()

    # Rows of a wider buffer (row stride 320): only the first 300 columns are touched.
    wide = torch.randn(6, 320, device=DEVICE)
    wide[:, :300] = logits
    before = wide.clone()
    loss = cross_entropy_forward_backward_(wide[:, :300], targets, scale)
    ref_loss, ref_grad = cross_entropy_reference(logits.double(), targets, scale.double())
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide[:, :300], ref_grad.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(wide[:, 300:], before[:, 300:])

    # The loss alone leaves the logits untouched, and repeats bit for bit.
    kept = logits.clone()
    first = cross_entropy_forward(logits, targets)
    assert torch.equal(logits, kept)
    assert torch.equal(first, cross_entropy_forward(logits, targets))
    torch.testing.assert_close(first, ref_loss.float(), rtol=1e-5, atol=1e-5)


def test_target_out_of_range_gives_nan_loss():
    logits, targets, scale = _inputs(2, 4, 50, torch.float32)
    targets[1], targets[2] = 50, -1
    loss = cross_entropy_forward(logits, targets)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()


def test_launcher_rejects_bad_inputs():
    logits, targets, scale = _inputs(3, 4, 50, torch.float32)
    with pytest.raises(TypeError, match="logits.dtype"):
        cross_entropy_forward(logits.double(), targets)
    with pytest.raises(ValueError, match="unit stride"):
        cross_entropy_forward_backward_(logits.T, targets.repeat(13)[:50], scale.repeat(13)[:50])
    with pytest.raises(ValueError, match="one entry per logits row"):
        cross_entropy_forward(logits, targets[:3])
    with pytest.raises(TypeError, match="scale.dtype"):
        cross_entropy_forward_backward_(logits, targets, scale.half())
    with pytest.raises(ValueError, match="scale is required"):
        cross_entropy_forward_backward_(logits, targets, None)


def _linear_ce_runs(tokens, hidden_size, vocab, chunk, param_dtype, autocast, ignored):
    """{(name): (loss, grad_hidden, grad_weight)} for the fused and PyTorch chunked paths, the
    full-logits loss in fp64 (the reference) and in the run's own precision."""
    gen = torch.Generator().manual_seed(tokens * 31 + vocab)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(DEVICE, param_dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.3).to(DEVICE, param_dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(DEVICE)
    targets[list(ignored)] = IGNORE_INDEX
    runs = {}
    cases = {"fused": dict(fused=True), "torch": dict(fused=False), "full": None, "full64": None}
    for name, kwargs in cases.items():
        dtype = torch.float64 if name == "full64" else param_dtype
        h = hidden.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=bool(autocast) and name != "full64"):
            if kwargs is None:
                loss = F.cross_entropy((h @ w.T).float(), targets, ignore_index=IGNORE_INDEX)
                if not (targets != IGNORE_INDEX).any():
                    loss = (h @ w.T).sum() * 0  # F.cross_entropy's mean over nothing is NaN
            else:
                loss = chunked_linear_cross_entropy(h, w, targets, chunk, **kwargs)
        loss.backward()
        runs[name] = loss.detach(), h.grad, w.grad
    return runs


LINEAR_CASES = {
    "fp32": (torch.float32, None),
    "fp16": (torch.float16, None),
    "autocast-fp16": (torch.float32, torch.float16),
    "autocast-bf16": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("shape", [(23, 16, 97, 8), (40, 24, 300, 16)],
                         ids=lambda s: f"t{s[0]}-h{s[1]}-v{s[2]}-c{s[3]}")
def test_chunked_linear_cross_entropy_fused(shape, case):
    if case == "autocast-bf16" and not ON_GPU:
        pytest.skip("bf16 needs CUDA: the CPU interpreter rounds fp32 to bf16 toward zero")
    param_dtype, autocast = LINEAR_CASES[case]
    tokens = shape[0]
    runs = _linear_ce_runs(*shape, param_dtype, autocast, ignored=range(0, tokens, 5))
    ref = runs["full64"]
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        fused, plain, full = runs["fused"][i], runs["torch"][i], runs["full"][i]
        assert fused.dtype == plain.dtype, name
        # The fused path may use the matmul dtype differently (fp32 output straight from the
        # matmul accumulator), so its error is bounded by the worse of the two PyTorch paths;
        # 8 fp32 ulps (8 * 2^-23 < 1e-6) of the output's magnitude, with no floor, on top.
        assert_no_worse_than_torch(f"{case} {name}", fused, ref[i], (plain, full), torch.float32,
                                   ulps=8, floor=0.0)


def test_chunked_linear_cross_entropy_fused_no_grad_and_all_ignored():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16, device=DEVICE), torch.randn(40, 16, device=DEVICE)
    targets = torch.randint(0, 40, (10,), device=DEVICE)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, targets, 3, fused=True)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-5, atol=0)
    ignored = torch.full_like(targets, IGNORE_INDEX)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, ignored, 3, fused=True)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()
