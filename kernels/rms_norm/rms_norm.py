"""Fused RMSNorm forward and backward in Triton.

Algorithm
    Forward: each program takes a block of rows (one row at hidden 2048, more when rows are
    narrow), read once, and computes in fp32 ``rstd = rsqrt(mean(x^2) + eps)`` and
    ``y = (x * rstd) * weight``; y is written in the output dtype and rstd (one fp32 per row)
    is kept for the backward.
    Backward: with ``xhat = x * rstd`` and ``g = dy * weight``,
    ``dx = rstd * (g - xhat * mean(g * xhat))`` and ``dweight = sum over rows of dy * xhat``.
    A fixed number of programs (eight per SM) each walk a contiguous range of row blocks and
    keep their share of dweight in fp32 registers; the (programs, hidden) partial sums are added by
    one torch sum. No atomics: gradients are bit-identical run to run.
    Saved for the backward: x as given and rstd, never the normalized tensor.

Layout
    x (..., hidden): unit stride along hidden, any stride between rows (other layouts are
    copied once); weight (hidden,). y is a new contiguous (..., hidden) tensor.

dtypes
    x and weight: fp16, bf16 or fp32, in any combination; all arithmetic is fp32. y is
    ``out_dtype``, by default ``torch.promote_types(x.dtype, weight.dtype)`` (what
    transformers' ``LlamaRMSNorm`` returns). dx has x's dtype, dweight weight's.
    One rounding, at the end: transformers rounds ``x * rstd`` to x's dtype before the weight
    multiply, so for 16-bit x the two differ by that rounding. With fp32 x and weight the
    result is ``F.rms_norm``'s; asking for a 16-bit ``out_dtype`` then gives the value that
    casting the fp32 result would give, without the fp32 tensor.

Limits
    hidden up to 16384 (a row is held in registers, padded to a power of two and masked).

Not supported
    A bias, Gemma's ``(1 + weight)`` scale, a residual add fused in.
"""

import torch
import triton
import triton.language as tl

from ..utils import (FUSED_OPS_FALLBACK, as_rows, check_float_tensor, check_runnable, device_ctx,
                     loop_programs, num_warps)

MAX_HIDDEN = 16384
# Elements a program holds per tensor: narrow rows are processed several at a time (one
# row of 2048, Llama-1B's hidden size, per program). Past 8192 the backward spills registers.
TILE = 2048


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                         BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                         n_rows, n_cols, n_blocks, blocks_per_program,
                         BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * blocks_per_program  # 64-bit loop, so row offsets are too
    for block in range(first, tl.minimum(first + blocks_per_program, n_blocks)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        dy = dy.to(tl.float32)
        xhat = x.to(tl.float32) * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _blocks(hidden):
    """(BLOCK_R, BLOCK): rows per block and the row length padded to a power of two."""
    block = triton.next_power_of_2(hidden)
    return max(TILE // block, 1), block


def _rms_norm_fwd(x, weight, eps, out_dtype, empty=torch.empty):
    """Launch the forward on ``x`` (rows, hidden) with unit last stride. Returns (y, rstd),
    allocated by ``empty`` (tests pass one that fills NaN, so an unwritten row shows)."""
    rows, hidden = x.shape
    y = empty((rows, hidden), dtype=out_dtype, device=x.device)
    rstd = empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    block_r, block = _blocks(hidden)
    with device_ctx(x):
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x, weight, y, rstd, x.stride(0), y.stride(0), rows, hidden, eps,
            BLOCK_R=block_r, BLOCK=block, num_warps=num_warps(block_r * block))
    return y, rstd


def _rms_norm_bwd(dy, x, weight, rstd, empty=torch.empty):
    """Launch the backward; ``dy`` and ``x`` are (rows, hidden) with unit last stride.
    Returns (dx in x's dtype, dweight in weight's dtype); ``empty`` allocates dx and the
    partial sums of dweight."""
    rows, hidden = x.shape
    dx = empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block_r, block = _blocks(hidden)
    n_blocks = triton.cdiv(rows, block_r)
    # A fixed number of programs, whatever the row count (those past the last block write zero
    # partial sums): the partial buffer's shape then does not depend on the sequence length,
    # so torch.compile with a dynamic length has no size of it to guard on (a guard there
    # recompiled the compiled blocks once per new length on CUDA).
    programs = loop_programs(x.device)
    blocks_per_program = triton.cdiv(n_blocks, programs)
    partial = empty((programs, hidden), dtype=torch.float32, device=x.device)
    with device_ctx(x):
        _rms_norm_bwd_kernel[(programs,)](
            dy, x, weight, rstd, dx, partial, dy.stride(0), x.stride(0), dx.stride(0), rows,
            hidden, n_blocks, blocks_per_program, BLOCK_R=block_r, BLOCK=block,
            num_warps=num_warps(block_r * block))
    return dx, partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        rows = as_rows(x)
        y, rstd = _rms_norm_fwd(rows, weight, eps, out_dtype)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _rms_norm_bwd(as_rows(dy), x, weight, rstd)
        return dx.view(ctx.shape), dweight if ctx.needs_input_grad[1] else None, None, None


def rms_norm(x, weight, eps, out_dtype=None):
    """RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2) + eps)``, in fp32.

    Args:
        x: (..., hidden), fp16, bf16 or fp32; hidden <= 16384.
        weight: (hidden,), fp16, bf16 or fp32, on x's device.
        eps: added to the mean square.
        out_dtype: dtype of the result; default ``torch.promote_types(x.dtype, weight.dtype)``.
            Under autocast, where the result feeds a matmul that autocast casts anyway, pass
            the autocast dtype: the same values, without an fp32 tensor in between.

    Returns:
        (..., hidden) tensor of ``out_dtype``. Differentiable in x and weight; the backward
        keeps x and one fp32 inverse RMS per row, and is deterministic.
    """
    fn = "rms_norm"
    check_float_tensor(fn, "x", x)
    check_float_tensor(fn, "weight", weight)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"{fn}: weight must have shape (hidden,) = ({hidden},) to match x of "
                         f"shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"{fn}: hidden size {hidden} is not supported; it must be between 1 "
                         f"and {MAX_HIDDEN}")
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{fn}: out_dtype={out_dtype} is not supported; use torch.float16, "
                        "torch.bfloat16 or torch.float32")
    check_runnable(fn, _rms_norm_fwd_kernel, FUSED_OPS_FALLBACK, x=x, weight=weight)
    return _RMSNorm.apply(x, weight.contiguous(), float(eps), out_dtype)
