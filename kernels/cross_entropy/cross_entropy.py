"""Row-wise softmax cross-entropy in Triton, with its gradient written over the logits.

Made for the chunked LM-head loss (``flashlm.model.loss.chunked_linear_cross_entropy``): a
chunk of logits comes straight out of ``hidden @ weight.T`` and this kernel turns it, in place,
into the gradient that the two following matmuls need, while producing each row's loss. One
kernel replaces the chain of fp32 elementwise passes (upcast, max, subtract, exp, sum, log,
divide, one-hot subtract, scale, downcast) that the same computation takes in PyTorch.

Algorithm
    One program per row. Pass 1 walks the vocabulary in blocks of ``BLOCK_V`` with an online
    max and sum of exponentials (fp32), giving ``lse = log(sum(exp(logits)))``; the row's loss
    is ``lse - logits[target]``. Pass 2 (only when a gradient is asked for) walks the row again
    and stores ``(softmax - onehot(target)) * scale`` over the logits. Traffic per row: two
    reads and one write of the logits (one read without the gradient). Rows never interact, so
    writing in place is safe and the results are deterministic.

Layout
    logits (rows, vocab), any row stride, unit stride along the vocabulary (it is overwritten,
    so it cannot be copied to a contiguous buffer). targets (rows,) int64 or int32, scale and
    loss (rows,) fp32, any stride.

Semantics
    A row whose target equals ``ignore_index`` gets loss 0 and, with the gradient, a row of
    zeros. A target outside ``[0, vocab)`` (other than ``ignore_index``) gets a NaN loss, so a
    bad label shows in the mean instead of reading out of bounds; no host sync checks it.

dtypes
    logits fp16, bf16 or fp32; all arithmetic in fp32; the gradient is rounded once to the
    logits' dtype. Loss fp32.

Not supported here
    Label smoothing, z-loss, logit soft-capping, class weights, reductions (the caller sums).
"""

import torch
import triton
import triton.language as tl

from ..utils import FLOAT_DTYPES, check_runnable, device_ctx, is_interpreted

TARGET_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _cross_entropy_kernel(LOGITS, TARGETS, SCALE, LOSS, stride_row, stride_target, stride_scale,
                          stride_loss, vocab, ignore_index, WRITE_GRAD: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(TARGETS + row * stride_target).to(tl.int64)
    if target == ignore_index:
        tl.store(LOSS + row * stride_loss, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=LOGITS.dtype.element_ty)
            for start in range(0, vocab, BLOCK_V):
                tl.store(base + start + cols, zeros, mask=start + cols < vocab)
    else:
        # Every block holds at least one real column, so after the first block m is finite and
        # exp(m - m_new) never sees -inf - -inf.
        m = tl.full([], float("-inf"), dtype=tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, vocab, BLOCK_V):
            x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf"))
            x = x.to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        in_range = (target >= 0) & (target < vocab)
        target_logit = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
        tl.store(LOSS + row * stride_loss, tl.where(in_range, lse - target_logit, float("nan")))
        if WRITE_GRAD:
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
            for start in range(0, vocab, BLOCK_V):
                offs = start + cols
                mask = offs < vocab
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) * scale
                grad = tl.where(offs == target, grad - scale, grad)
                tl.store(base + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: launch configuration, validation, public functions.

# The row loop streams the vocabulary: 4096 columns a block (8 iterations at a 32K vocabulary,
# 16 fp32 values per thread with 8 warps) keep enough loads in flight without spilling. Not
# autotuned: the kernel overwrites its input, so a tuning sweep would need to restore it.
_MAX_BLOCK_V = 4096
_NUM_WARPS = 8
# Under the CPU interpreter every block is a numpy call: small blocks keep tests fast while
# still giving several blocks and a ragged last one at the test vocabularies.
_INTERPRET_BLOCK_V = 128


def _check(fn, logits, targets, scale, out):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        desc = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{fn}: logits must be a 2-D tensor (rows, vocab), got {desc}")
    rows, vocab = logits.shape
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: logits.dtype={logits.dtype} is not supported; use torch.float16, "
                        "torch.bfloat16 or torch.float32")
    if vocab == 0:
        raise ValueError(f"{fn}: logits has an empty vocabulary dimension, shape {tuple(logits.shape)}")
    if logits.stride(1) != 1 and rows > 0 and vocab > 1:
        raise ValueError(f"{fn}: logits must have unit stride along the vocabulary, got strides "
                         f"{logits.stride()}; pass a contiguous tensor")
    named = [("targets", targets, TARGET_DTYPES), ("scale", scale, (torch.float32,)),
             ("out", out, (torch.float32,))]
    for name, t, dtypes in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != rows:
            desc = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a 1-D tensor with one entry per logits row "
                             f"({rows}), got {desc}")
        if t.dtype not in dtypes:
            raise TypeError(f"{fn}: {name}.dtype={t.dtype}; expected one of {dtypes}")
        if t.device != logits.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but logits are on {logits.device}")
    check_runnable(fn, _cross_entropy_kernel, logits=logits)


def _launch(logits, targets, scale, ignore_index, out):
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    write_grad = scale is not None
    if is_interpreted(_cross_entropy_kernel):
        block_v, warps = _INTERPRET_BLOCK_V, 1
    else:
        block_v, warps = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V), _NUM_WARPS
    # Without a gradient the scale pointer is never read; any tensor stands in for it.
    scale_arg = scale if write_grad else out
    with device_ctx(logits):
        _cross_entropy_kernel[(rows,)](
            logits, targets, scale_arg, out, logits.stride(0), targets.stride(0),
            scale_arg.stride(0), out.stride(0), vocab, int(ignore_index),
            WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps)
    return out


def cross_entropy_forward(logits, targets, ignore_index=-100, out=None):
    """Per-row cross-entropy ``logsumexp(logits[i]) - logits[i, targets[i]]``; logits unchanged.

    Args:
        logits: (rows, vocab), fp16, bf16 or fp32, unit stride along the vocabulary.
        targets: (rows,) int64 or int32; ``ignore_index`` marks rows without a loss.
        ignore_index: the target value of ignored rows (their loss is 0).
        out: optional (rows,) fp32 tensor to write the losses into.

    Returns:
        (rows,) fp32 losses (``out`` when given); NaN for a target outside ``[0, vocab)``.
    """
    _check("cross_entropy_forward", logits, targets, None, out)
    return _launch(logits, targets, None, ignore_index, out)


def cross_entropy_forward_backward_(logits, targets, scale, ignore_index=-100, out=None):
    """Per-row cross-entropy, and its gradient written over ``logits`` in place.

    After the call, ``logits[i]`` holds ``(softmax(logits[i]) - onehot(targets[i])) * scale[i]``
    in the logits' dtype, and all zeros for a row whose target is ``ignore_index``: the
    gradient of ``sum_i scale[i] * loss[i]``. With ``scale[i] = 1 / (number of valid rows)``
    that is the gradient of the mean loss.

    Args:
        logits: (rows, vocab), fp16, bf16 or fp32, unit stride along the vocabulary;
            overwritten.
        targets: (rows,) int64 or int32; ``ignore_index`` marks rows without a loss.
        scale: (rows,) fp32, the weight of each row's loss in the gradient.
        ignore_index: the target value of ignored rows.
        out: optional (rows,) fp32 tensor to write the losses into.

    Returns:
        (rows,) fp32 losses, unscaled (``out`` when given); NaN for a target outside
        ``[0, vocab)``.
    """
    _check("cross_entropy_forward_backward_", logits, targets, scale, out)
    if scale is None:
        raise ValueError("cross_entropy_forward_backward_: scale is required; use "
                         "cross_entropy_forward for the loss alone")
    return _launch(logits, targets, scale, ignore_index, out)
