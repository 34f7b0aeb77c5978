"""Rotary position embedding (RoPE) of q and k in one Triton launch, forward and backward.

Algorithm
    Each program takes a block of tokens (two at Llama-1B's 16 heads of 128), loads their
    cos and sin once and rotates every query head and then every key head, in fp32: with ``x1, x2`` the two halves of a head (transformers' half-rotation layout, the
    one Llama checkpoints use), ``out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``.
    The backward is the inverse rotation (sin negated) applied to the output gradients.
    Saved for the backward: cos and sin only.

Layout
    q (batch, seqlen, heads, head_dim) and k (batch, seqlen, kv_heads, head_dim), with unit
    stride along head_dim and any other strides: in the model they are views into one q|k|v
    product, read in place. cos, sin (batch or 1, seqlen, 1, head_dim // 2), as
    ``flashlm.model.model.RotaryEmbedding`` makes them (a batch of 1 is broadcast). The outputs
    are new contiguous tensors shaped like q and k.

dtypes
    q and k: fp16, bf16 or fp32, one dtype; cos and sin: fp16, bf16 or fp32 (fp32 in the
    model), read as fp32. The outputs (and the input gradients) are rounded to q's dtype once.

Limits
    head_dim even, at most 512.

Not supported
    The interleaved (GPT-J) layout, partial rotation, a position offset (pass cos/sin for
    the positions wanted), gradients with respect to cos and sin.
"""

import torch
import triton
import triton.language as tl

from ..utils import (FUSED_OPS_FALLBACK, check_float_tensor, check_runnable, device_ctx, num_warps,
                     unit_last)

MAX_HEAD_DIM = 512
# Elements of one half-tile (tokens x heads x head_dim / 2) a program holds at a time: a token
# of Llama-1B's q (16 heads of 128) is 1024, so a program takes two tokens.
TILE = 2048


@triton.jit
def _rotate_heads(X, OUT, x_rows, out_rows, token_ok, stride_xh, stride_oh, heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate ``heads`` heads of a block of tokens, BLOCK_H heads at a time. ``x_rows`` and
    ``out_rows`` (BLOCK_T,) are the tokens' offsets; cos and sin are (BLOCK_T, 1, BLOCK_HALF)."""
    offs_d = tl.arange(0, BLOCK_HALF)[None, None, :]
    for first in range(0, heads, BLOCK_H):
        offs_h = (first + tl.arange(0, BLOCK_H))[None, :, None]
        mask = token_ok[:, None, None] & (offs_h < heads) & (offs_d < HALF)
        x_ptrs = X + x_rows[:, None, None] + offs_h * stride_xh + offs_d
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = OUT + out_rows[:, None, None] + offs_h * stride_oh + offs_d
        tl.store(out_ptrs, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, n_tokens, seqlen, heads_q, heads_k,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
                 stride_cb, stride_cs, stride_sb, stride_ss,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    b = (tokens // seqlen).to(tl.int64)
    s = (tokens % seqlen).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = token_ok[:, None, None] & (offs_d < HALF)
    cos = tl.load(COS + (b * stride_cb + s * stride_cs)[:, None, None] + offs_d, mask=mask, other=0.0)
    sin = tl.load(SIN + (b * stride_sb + s * stride_ss)[:, None, None] + offs_d, mask=mask, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, QO, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, token_ok,
                  stride_qh, stride_qoh, heads_q, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, token_ok,
                  stride_kh, stride_koh, heads_k, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def _table_strides(t):
    """(batch, seqlen) strides of a cos/sin table; a batch of one is broadcast (stride 0)."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def _rope(q, k, cos, sin, inverse, empty=torch.empty):
    """Rotate q and k (inverse: by -sin) into new contiguous tensors of q's dtype, allocated
    by ``empty`` (tests pass one that fills NaN). Every input has unit last stride."""
    q_out = empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = empty(k.shape, dtype=q.dtype, device=q.device)
    batch, seqlen, heads_q, head_dim = q.shape
    heads_k = k.shape[2]
    n_tokens = batch * seqlen
    if n_tokens == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(head_dim // 2)
    block_hq = min(triton.next_power_of_2(heads_q), max(TILE // block_half, 1))
    block_hk = min(triton.next_power_of_2(max(heads_k, 1)), block_hq)
    # Not capped by the token count: the launch's meta-parameters then depend on the head shape
    # alone, so a compiled graph with a dynamic sequence length traces them as constants.
    block_t = max(TILE // (block_hq * block_half), 1)
    with device_ctx(q):
        _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
            q, k, q_out, k_out, cos, sin, n_tokens, seqlen, heads_q, heads_k,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            *_table_strides(cos), *_table_strides(sin),
            HALF=head_dim // 2, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
            BLOCK_HALF=block_half, INVERSE=inverse,
            num_warps=num_warps(block_t * block_hq * block_half))
    return q_out, k_out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, k, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope(unit_last(dq), unit_last(dk), cos, sin, inverse=True)
        return dq, dk, None, None


def rotary_embedding(q, k, cos, sin):
    """Apply RoPE (half-rotation layout) to q and k in one launch.

    Args:
        q: (batch, seqlen, heads, head_dim), fp16, bf16 or fp32; strided views are read in place.
        k: (batch, seqlen, kv_heads, head_dim), q's dtype.
        cos, sin: (batch or 1, seqlen, 1, head_dim // 2), fp16, bf16 or fp32 (fp32 in the model).

    Returns:
        (q_rotated, k_rotated): new contiguous tensors shaped like q and k, in q's dtype,
        computed in fp32. Differentiable in q and k (cos and sin are treated as constants).
    """
    fn = "rotary_embedding"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float_tensor(fn, name, t)
        if t.dim() != 4:
            layout = ("(batch or 1, seqlen, 1, head_dim // 2)" if name in ("cos", "sin") else
                      "(batch, seqlen, heads, head_dim)")
            raise ValueError(f"{fn}: {name} must have 4 dimensions {layout}, got shape "
                             f"{tuple(t.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"{fn}: q and k must share one dtype, got q={q.dtype}, k={k.dtype}")
    batch, seqlen, _, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, seqlen, head_dim):
        raise ValueError(f"{fn}: k of shape {tuple(k.shape)} does not match q of shape "
                         f"{tuple(q.shape)} in batch, seqlen or head_dim")
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim={head_dim} is not supported; it must be even and "
                         f"between 2 and {MAX_HEAD_DIM}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seqlen, 1, head_dim // 2):
            raise ValueError(f"{fn}: {name} must have shape ({batch} or 1, {seqlen}, 1, "
                             f"{head_dim // 2}) for q of shape {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    check_runnable(fn, _rope_kernel, FUSED_OPS_FALLBACK, q=q, k=k, cos=cos, sin=sin)
    return _Rotary.apply(unit_last(q), unit_last(k), unit_last(cos), unit_last(sin))
