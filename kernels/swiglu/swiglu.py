"""Fused SwiGLU activation, ``silu(gate) * up``, forward and backward in Triton.

Algorithm
    Elementwise over (rows, inter) tiles of 1024 elements. With ``s = sigmoid(gate)``:
    forward ``out = gate * s * up``; backward ``d_up = dout * gate * s`` and
    ``d_gate = dout * up * s * (1 + gate * (1 - s))``, silu recomputed from the saved input.
    Saved for the backward: the input only (the PyTorch composition also keeps silu(gate)).

Layout
    The input is the product of one matmul with the gate and up weights stacked,
    ``gate_up = x @ cat([gate_w, up_w]).T`` of shape (..., 2 * inter): gate is its first half,
    up its second. Rows may have any stride (unit stride within a row; other layouts are
    copied once). out is a new contiguous (..., inter) tensor, and the backward writes the
    gradient of gate_up as one contiguous (..., 2 * inter) tensor, so no concatenation of the
    two halves' gradients follows.

dtypes
    fp16, bf16 or fp32; fp32 arithmetic; out and the gradient in the input's dtype, rounded
    once (the PyTorch composition rounds silu(gate) before the product).

Not supported
    Separate gate and up tensors, other gated activations (GELU), a bias.
"""

import torch
import triton
import triton.language as tl

from ..utils import (FUSED_OPS_FALLBACK, as_rows, check_float_tensor, check_runnable, device_ctx,
                     num_warps)

# Elements per program: 1024 keeps eight 16-bit values per thread with four warps. A program
# covers (BLOCK_R rows) x (BLOCK_C columns): one row's block of 1024 at Llama's widths (5632 is
# 5.5 blocks), several rows when inter is narrow.
TILE = 1024


@triton.jit
def _tile(pid_r, pid_c, n_rows, inter, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row indices (int64), column indices and the mask of one program's tile."""
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows[:, None], cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < inter)


@triton.jit
def _swiglu_fwd_kernel(GU, OUT, stride_gu, stride_out, n_rows, inter, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, inter, BLOCK_R, BLOCK_C)
    gate_ptr = GU + rows * stride_gu + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + inter, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + rows * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(GU, DOUT, DGU, stride_gu, stride_dout, stride_dgu, n_rows, inter,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, inter, BLOCK_R, BLOCK_C)
    gate_ptr = GU + rows * stride_gu + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + inter, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + rows * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    d_gate = dout * up * s * (1.0 + gate * (1.0 - s))
    d_up = dout * gate * s
    dgate_ptr = DGU + rows * stride_dgu + cols
    tl.store(dgate_ptr, d_gate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + inter, d_up.to(DGU.dtype.element_ty), mask=mask)


def _launch(kernel, rows, inter, gate_up, *args):
    block_c = min(triton.next_power_of_2(inter), TILE)
    block_r = TILE // block_c
    grid = (triton.cdiv(rows, block_r), triton.cdiv(inter, block_c))
    with device_ctx(gate_up):
        kernel[grid](*args, rows, inter, BLOCK_R=block_r, BLOCK_C=block_c,
                     num_warps=num_warps(block_r * block_c))


def _swiglu_fwd(gate_up, empty=torch.empty):
    """Launch the forward on ``gate_up`` (rows, 2 * inter) with unit last stride; the
    (rows, inter) output is allocated by ``empty`` (tests pass one that fills NaN)."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _launch(_swiglu_fwd_kernel, rows, inter, gate_up, gate_up, out, gate_up.stride(0),
                out.stride(0))
    return out


def _swiglu_bwd(dout, gate_up, empty=torch.empty):
    """Launch the backward; ``dout`` (rows, inter) and ``gate_up`` (rows, 2 * inter) with unit
    last stride. Returns the gradient of gate_up (rows, 2 * inter), allocated by ``empty``."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = empty((rows, 2 * inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _launch(_swiglu_bwd_kernel, rows, inter, gate_up, gate_up, dout, d_gate_up,
                gate_up.stride(0), dout.stride(0), d_gate_up.stride(0))
    return d_gate_up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        rows = as_rows(gate_up)
        ctx.save_for_backward(rows)
        ctx.shape = gate_up.shape
        return _swiglu_fwd(rows).view(*gate_up.shape[:-1], rows.shape[1] // 2)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        return _swiglu_bwd(as_rows(dout), gate_up).view(ctx.shape)


def swiglu(gate_up):
    """``silu(gate) * up`` where gate and up are the two halves of the last dimension.

    Args:
        gate_up: (..., 2 * inter), fp16, bf16 or fp32: ``F.linear(x, cat([gate_w, up_w]))``.

    Returns:
        (..., inter) in gate_up's dtype. Differentiable; the backward keeps only gate_up and
        returns its gradient as one tensor.
    """
    fn = "swiglu"
    check_float_tensor(fn, "gate_up", gate_up)
    width = gate_up.shape[-1]
    if width == 0 or width % 2:
        raise ValueError(f"{fn}: the last dimension of gate_up holds gate and up side by side, "
                         f"so it must be even and positive, got shape {tuple(gate_up.shape)}")
    check_runnable(fn, _swiglu_fwd_kernel, FUSED_OPS_FALLBACK, gate_up=gate_up)
    return _SwiGLU.apply(gate_up)
