"""FlashAttention forward and backward in Triton: flashlm's attention kernel.

Algorithm
    Forward: one program per (query block, batch * head). It walks the key/value blocks with an
    online softmax (running max ``m`` and sum ``l`` in fp32, scores in the log2 domain with the
    softmax scale folded into one multiply), so the seqlen_q x seqlen_k score matrix never
    leaves on-chip memory. Each program splits its key range in three: a masked stretch on the
    left (sliding window), an unmasked middle with no mask arithmetic at all, and a masked
    stretch on the right (causal diagonal, ragged last block). Tiles outside the causal or
    sliding window are never visited, so local attention costs O(seqlen * window). Causal
    programs are launched heaviest first.
    Backward (FlashAttention-2 style, deterministic): a small kernel computes
    ``delta = rowsum(dO * O) - dlse``; one kernel per key block accumulates dK and dV over every
    query block and every query head of its GQA group in registers; a separate kernel per
    query block accumulates dQ. No atomics, so gradients are bit-identical run to run.
    Loads: on Hopper and newer GPUs (fp16/bf16, head dims up to 128, sequences of 1K tokens or
    more) the tiles each inner loop streams come through TMA tensor descriptors built on the
    host; elsewhere through pointers. Both paths compute the same values.
    Hopper forward: dense causal or full attention at head dims 64 and 128 (lengths a multiple
    of 128) runs the Gluon kernel in ``hopper_fwd.py`` instead; it writes the same out and lse,
    and the backward below is shared.
    Hopper backward, opt-in (``deterministic=False``): the fused Gluon kernel in
    ``hopper_bwd.py`` replaces the dK/dV and dQ kernels for dense causal or full attention in
    its scope; it adds dQ with TMA reduce-adds, so dQ's last bits vary between runs.

Layouts
    Dense: q (batch, seqlen_q, nheads, head_dim); k, v (batch, seqlen_k, nheads_k, head_dim);
    out like q; lse (batch, nheads, seqlen_q).
    Varlen (packed documents): q (total_q, nheads, head_dim); k, v (total_k, nheads_k, head_dim);
    ``cu_seqlens`` int32 (num_docs + 1,) cumulative offsets; lse (nheads, total_q).
    lse is fp32 and in natural log. Any strides with a unit last-dimension stride are used
    in place; the gradient of lse is taken in whatever layout autograd hands over.

Semantics (FlashAttention-2 >= 2.1)
    GQA/MQA: query head h reads key/value head h // (nheads // nheads_k), without copies.
    Masks are aligned bottom-right (per document for varlen): with d = seqlen_k - seqlen_q,
    query i sees key j iff j <= i + d + right (right = 0 when causal) and j >= i + d - left,
    where ``window_size = (left, right)`` and -1 means unbounded. A query row that sees no key
    gets out = 0 and lse = +inf (zero gradient). softmax_scale must be positive and finite
    (the online softmax takes each row's maximum from the unscaled scores).

dtypes
    fp16 and bf16 (fp32 accumulation); fp32 inputs use IEEE fp32 dot products.

Head dims
    Every multiple of 8 from 8 to 256. Non-power-of-two head dims are padded to the next
    power of two inside the kernel and masked.

Not supported here
    Dropout, ALiBi, softcapping, arbitrary attention masks, a KV cache.
"""

import math
import os

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

from ..utils import (LOG2E, check_float_tensor, check_runnable, device_ctx, is_interpreted,
                     unit_last)
from . import hopper_bwd, hopper_fwd

MAX_HEAD_DIM = 256


@triton.jit
def _visible(offs_q, offs_k, seqlen_k, diag, left, right, MASK_LEFT: tl.constexpr,
             MASK_RIGHT: tl.constexpr):
    """(len(offs_q), len(offs_k)) mask: which keys each query row may attend to."""
    ok = offs_k[None, :] < seqlen_k
    if MASK_RIGHT:
        ok = ok & (offs_k[None, :] <= offs_q[:, None] + diag + right)
    if MASK_LEFT:
        ok = ok & (offs_k[None, :] >= offs_q[:, None] + diag - left)
    return ok


@triton.jit
def _key_ranges(start_m, seqlen_q, seqlen_k, left, right, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Key stretches for query rows [start_m, start_m + BLOCK_M): masked [lo, a), unmasked
    [a, b), masked [b, hi). Every bound but hi is a multiple of BLOCK_N."""
    diag = seqlen_k - seqlen_q
    full_k = (seqlen_k // BLOCK_N) * BLOCK_N
    lo = 0
    first_all = 0  # first key that every row of the block sees on the left
    if MASK_LEFT:
        lo = (tl.maximum(start_m + diag - left, 0) // BLOCK_N) * BLOCK_N
        first_all = tl.maximum(start_m + BLOCK_M - 1 + diag - left, 0)
        first_all = ((first_all + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    hi = seqlen_k
    end_all = full_k  # end of the keys that every row sees on the right, whole blocks only
    if MASK_RIGHT:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag + right, 0), seqlen_k)
        end_all = tl.minimum((tl.maximum(start_m + diag + right + 1, 0) // BLOCK_N) * BLOCK_N,
                             full_k)
    a = tl.maximum(lo, tl.minimum(first_all, hi))
    b = tl.maximum(a, tl.minimum(end_all, hi))
    return diag, lo, a, b, hi


@triton.jit
def _query_ranges(start_n, seqlen_q, seqlen_k, left, right, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Query stretches for key rows [start_n, start_n + BLOCK_N), as in `_key_ranges`."""
    diag = seqlen_k - seqlen_q
    full_q = (seqlen_q // BLOCK_M) * BLOCK_M
    lo = 0
    first_all = 0
    if MASK_RIGHT:
        lo = (tl.maximum(start_n - diag - right, 0) // BLOCK_M) * BLOCK_M
        first_all = tl.maximum(start_n + BLOCK_N - 1 - diag - right, 0)
        first_all = ((first_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    hi = seqlen_q
    end_all = full_q
    if MASK_LEFT:
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - diag + left, 0), seqlen_q)
        end_all = tl.minimum((tl.maximum(start_n - diag + left + 1, 0) // BLOCK_M) * BLOCK_M,
                             full_q)
    a = tl.maximum(lo, tl.minimum(first_all, hi))
    b = tl.maximum(a, tl.minimum(end_all, hi))
    return diag, lo, a, b, hi


@triton.jit
def _load_rows(base, offs, stride, offs_d, n_rows, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               D_PADDED: tl.constexpr):
    """Load a (len(offs), BLOCK_D) tile; rows are masked only when MASKED."""
    ptrs = base + offs[:, None].to(tl.int64) * stride + offs_d[None, :]
    if MASKED:
        mask = offs[:, None] < n_rows
        if D_PADDED:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptrs, mask=mask, other=0.0)
    elif D_PADDED:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_tile(desc, desc_b, desc_row, desc_h, base, offs, stride, offs_d, n_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               D_PADDED: tl.constexpr, USE_TMA: tl.constexpr):
    """A (len(offs), BLOCK_D) tile of rows offs: through the tensor descriptor ``desc`` (TMA:
    one bulk copy, no address arithmetic in registers, out-of-bounds rows and columns read as
    zeros) at (desc_b, desc_row, desc_h, 0), or through pointers as in `_load_rows`."""
    if USE_TMA:
        return desc.load([desc_b, desc_row, desc_h.to(tl.int32), 0]).reshape(offs.shape[0], BLOCK_D)
    else:
        return _load_rows(base, offs, stride, offs_d, n_rows, HEAD_DIM, MASKED, D_PADDED)


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, desc_b, k_row, hk,
    offs_m, offs_d, lo, hi, seqlen_k, diag, left, right, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, MASKED: tl.constexpr,
    D_PADDED: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(desc_k, desc_b, k_row + start_n, hk, k_base, offs_n, stride_kn, offs_d,
                       seqlen_k, HEAD_DIM, BLOCK_D, MASKED, D_PADDED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, seqlen_k, diag, left, right, MASK_LEFT,
                                  MASK_RIGHT), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # A row that has seen no key yet keeps m = -inf; shift it by 0 to avoid inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_shift = m_new
        p = tl.math.exp2(s * qk_scale - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(desc_v, desc_b, k_row + start_n, hk, v_base, offs_n, stride_vn, offs_d,
                       seqlen_k, HEAD_DIM, BLOCK_D, MASKED, D_PADDED, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sequence(pid_bh, nheads, CU_Q, CU_K, seqlen_q, seqlen_k, stride_lb, stride_lh,
              VARLEN: tl.constexpr):
    """Batch index, head, first row of the sequence in q and k, lengths, and the lse/delta row
    offset of the sequence's first query."""
    b = pid_bh // nheads
    h = (pid_bh % nheads).to(tl.int64)
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        seqlen_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    else:
        q_start = 0
        k_start = 0
    b = b.to(tl.int64)
    lse_row = b * stride_lb + h * stride_lh + q_start
    return b, h, q_start, k_start, seqlen_q, seqlen_k, lse_row


@triton.jit
def _desc_coords(b, q_start, k_start, VARLEN: tl.constexpr):
    """(batch, first q row, first k row) of a sequence in the 4-D tensor descriptors, which
    view a packed (total, heads, dim) tensor as (1, total, heads, dim)."""
    if VARLEN:
        return 0, q_start.to(tl.int32), k_start.to(tl.int32)
    else:
        return b.to(tl.int32), 0, 0


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, DESC_A, DESC_B,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    nheads, seqlen_q, seqlen_k, group, qk_scale, left, right, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """DESC_A, DESC_B: tensor descriptors of k and v with BLOCK_N-row boxes when USE_TMA."""
    pid_m = tl.program_id(0)
    if MASK_RIGHT:
        # Later query blocks see more keys: launch them first so the tail of the grid is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h, q_start, k_start, seqlen_q, seqlen_k, lse_row = _sequence(
        tl.program_id(1), nheads, CU_Q, CU_K, seqlen_q, seqlen_k, stride_lb, stride_lh, VARLEN)
    hk = h // group
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
    k_base = K + b * stride_kb + k_start * stride_kn + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + hk * stride_vh
    q = _load_rows(q_base, offs_m, stride_qm, offs_d, seqlen_q, HEAD_DIM, True, D_PADDED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag, lo, a, b_, hi = _key_ranges(start_m, seqlen_q, seqlen_k, left, right, BLOCK_M, BLOCK_N,
                                      MASK_LEFT, MASK_RIGHT)
    hi = tl.where(start_m < seqlen_q, hi, 0)  # a varlen program past the end of its document
    desc_b, _, k_row = _desc_coords(b, q_start, k_start, VARLEN)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, DESC_A, DESC_B, desc_b, k_row, hk,
        offs_m, offs_d, lo, tl.minimum(a, hi), seqlen_k, diag, left, right, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_LEFT, MASK_RIGHT, True, D_PADDED, DOT_PREC, USE_TMA)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, DESC_A, DESC_B, desc_b, k_row, hk,
        offs_m, offs_d, a, tl.minimum(b_, hi), seqlen_k, diag, left, right, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_LEFT, MASK_RIGHT, False, D_PADDED, DOT_PREC, USE_TMA)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, DESC_A, DESC_B, desc_b, k_row, hk,
        offs_m, offs_d, b_, hi, seqlen_k, diag, left, right, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_LEFT, MASK_RIGHT, True, D_PADDED, DOT_PREC, USE_TMA)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"),
                   (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = O + b * stride_ob + q_start * stride_om + h * stride_oh
    row_ok = offs_m[:, None] < seqlen_q
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + lse_row + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh,
    nheads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE: the softmax-backward correction per query row."""
    pid_m = tl.program_id(0)
    b, h, q_start, _, seqlen_q, _, lse_row = _sequence(
        tl.program_id(1), nheads, CU_Q, CU_Q, seqlen_q, seqlen_q, stride_lb, stride_lh, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + q_start * stride_om + h * stride_oh, offs_m, stride_om,
                   offs_d, seqlen_q, HEAD_DIM, True, True).to(tl.float32)
    do = _load_rows(DO + b * stride_dob + q_start * stride_dom + h * stride_doh, offs_m,
                    stride_dom, offs_d, seqlen_q, HEAD_DIM, True, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_row + offs_m, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + lse_row + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
    desc_q, desc_do, desc_b, q_row, h,
    offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, diag, left, right, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, MASKED: tl.constexpr,
    D_PADDED: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(desc_q, desc_b, q_row + start_m, h, q_base, offs_m, stride_qm, offs_d,
                       seqlen_q, HEAD_DIM, BLOCK_D, MASKED, D_PADDED, USE_TMA)
        do = _load_tile(desc_do, desc_b, q_row + start_m, h, do_base, offs_m, stride_dom, offs_d,
                        seqlen_q, HEAD_DIM, BLOCK_D, MASKED, D_PADDED, USE_TMA)
        if MASKED:
            # Rows past the end get lse = +inf, so their probabilities are exactly zero.
            lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed scores: (BLOCK_N, BLOCK_M), so dK and dV accumulate without transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :] * 1.4426950408889634)
        if MASKED:
            visible = tl.trans(_visible(offs_m, offs_n, seqlen_k, diag, left, right, MASK_LEFT,
                                        MASK_RIGHT))
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DESC_A, DESC_B,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    nheads, nheads_k, seqlen_q, seqlen_k, group, softmax_scale, qk_scale, left, right,
    seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """DESC_A, DESC_B: tensor descriptors of q and dout with BLOCK_M-row boxes when USE_TMA."""
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b, hk, q_start, k_start, seqlen_q, seqlen_k, _ = _sequence(
        pid_bhk, nheads_k, CU_Q, CU_K, seqlen_q, seqlen_k, 0, 0, VARLEN)
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + k_start * stride_kn + hk * stride_kh, offs_n, stride_kn,
                   offs_d, seqlen_k, HEAD_DIM, True, D_PADDED)
    v = _load_rows(V + b * stride_vb + k_start * stride_vn + hk * stride_vh, offs_n, stride_vn,
                   offs_d, seqlen_k, HEAD_DIM, True, D_PADDED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag, lo, a, b_, hi = _query_ranges(start_n, seqlen_q, seqlen_k, left, right, BLOCK_M,
                                        BLOCK_N, MASK_LEFT, MASK_RIGHT)
    hi = tl.where(start_n < seqlen_k, hi, 0)
    desc_b, q_row, _ = _desc_coords(b, q_start, k_start, VARLEN)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
        do_base = DO + b * stride_dob + q_start * stride_dom + h * stride_doh
        lse_row = b * stride_lb + h * stride_lh + q_start
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + lse_row, DELTA + lse_row, stride_qm, stride_dom,
            DESC_A, DESC_B, desc_b, q_row, h, offs_n, offs_d, lo, tl.minimum(a, hi), seqlen_q, seqlen_k, diag, left, right,
            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, MASK_LEFT, MASK_RIGHT, True, D_PADDED, DOT_PREC,
            USE_TMA)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + lse_row, DELTA + lse_row, stride_qm, stride_dom,
            DESC_A, DESC_B, desc_b, q_row, h, offs_n, offs_d, a, tl.minimum(b_, hi), seqlen_q, seqlen_k, diag, left, right,
            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, MASK_LEFT, MASK_RIGHT, False, D_PADDED, DOT_PREC,
            USE_TMA)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + lse_row, DELTA + lse_row, stride_qm, stride_dom,
            DESC_A, DESC_B, desc_b, q_row, h, offs_n, offs_d, b_, hi, seqlen_q, seqlen_k, diag, left, right,
            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, MASK_LEFT, MASK_RIGHT, True, D_PADDED, DOT_PREC,
            USE_TMA)

    dk = dk * softmax_scale
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    rows_n = offs_n[:, None].to(tl.int64)
    tl.store(DK + b * stride_dkb + (k_start + rows_n) * stride_dkn + hk * stride_dkh
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + (k_start + rows_n) * stride_dvn + hk * stride_dvh
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, desc_b, k_row,
    hk, offs_m, offs_d, lo, hi, seqlen_k, diag, left, right, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, MASKED: tl.constexpr,
    D_PADDED: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(desc_k, desc_b, k_row + start_n, hk, k_base, offs_n, stride_kn, offs_d,
                       seqlen_k, HEAD_DIM, BLOCK_D, MASKED, D_PADDED, USE_TMA)
        v = _load_tile(desc_v, desc_b, k_row + start_n, hk, v_base, offs_n, stride_vn, offs_d,
                       seqlen_k, HEAD_DIM, BLOCK_D, MASKED, D_PADDED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, seqlen_k, diag, left, right, MASK_LEFT,
                                  MASK_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DESC_A, DESC_B,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    nheads, seqlen_q, seqlen_k, group, softmax_scale, qk_scale, left, right, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """DESC_A, DESC_B: tensor descriptors of k and v with BLOCK_N-row boxes when USE_TMA."""
    pid_m = tl.program_id(0)
    if MASK_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h, q_start, k_start, seqlen_q, seqlen_k, lse_row = _sequence(
        tl.program_id(1), nheads, CU_Q, CU_K, seqlen_q, seqlen_k, stride_lb, stride_lh, VARLEN)
    hk = h // group
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + q_start * stride_qm + h * stride_qh, offs_m, stride_qm,
                   offs_d, seqlen_q, HEAD_DIM, True, D_PADDED)
    do = _load_rows(DO + b * stride_dob + q_start * stride_dom + h * stride_doh, offs_m,
                    stride_dom, offs_d, seqlen_q, HEAD_DIM, True, D_PADDED)
    # Rows past seqlen_q get lse = +inf, so every probability in them is exactly zero.
    row_ok = offs_m < seqlen_q
    lse = tl.load(LSE + lse_row + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + lse_row + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + k_start * stride_kn + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag, lo, a, b_, hi = _key_ranges(start_m, seqlen_q, seqlen_k, left, right, BLOCK_M, BLOCK_N,
                                      MASK_LEFT, MASK_RIGHT)
    hi = tl.where(start_m < seqlen_q, hi, 0)
    desc_b, _, k_row = _desc_coords(b, q_start, k_start, VARLEN)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, DESC_A, DESC_B,
                       desc_b, k_row, hk, offs_m, offs_d, lo, tl.minimum(a, hi), seqlen_k, diag,
                       left, right, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_LEFT, MASK_RIGHT,
                       True, D_PADDED, DOT_PREC, USE_TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, DESC_A, DESC_B,
                       desc_b, k_row, hk, offs_m, offs_d, a, tl.minimum(b_, hi), seqlen_k, diag,
                       left, right, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_LEFT, MASK_RIGHT,
                       False, D_PADDED, DOT_PREC, USE_TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, DESC_A, DESC_B,
                       desc_b, k_row, hk, offs_m, offs_d, b_, hi, seqlen_k, diag,
                       left, right, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_LEFT, MASK_RIGHT,
                       True, D_PADDED, DOT_PREC, USE_TMA)
    dq = dq * softmax_scale
    tl.store(DQ + b * stride_dqb + (q_start + offs_m[:, None].to(tl.int64)) * stride_dqm
             + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Host side: configurations, launchers, autograd, public functions.

def _seq_bucket(seqlen):
    """Autotuning key: sequence lengths rounded to powers of two, so a 1K..128K sweep tunes
    once per octave rather than once per length. Past 128K the best tiles no longer change
    (the work per program is the same, only the grid grows), so longer sequences reuse the
    128K tuning instead of paying for a sweep at every octave."""
    return min(triton.next_power_of_2(max(int(seqlen), 16)), 131072)


def _configs(kind):
    """Short autotune lists, one per kernel, chosen on an H100 (triton 3.6, TMA loads) from wider
    sweeps (`scripts/bench/attention.py --explore`; kernels/attention/NOTES.md v2 and v5).

    Forward: 128x128 tiles with 8 warps win at head dim 128; at head dim 64, 4 warps over
    64x128 (causal) or 128x128 tiles. dK/dV: 64 query rows per step over 128-key tiles with 8
    warps at head dim 128, 64x64 or 32x64 with 4 warps at head dim 64. dQ: the mirror image.
    The last entry, two stages deep, is the fallback that `_prune` keeps for head dim 256 and
    fp32, which load through pointers (see `_use_tma`); with TMA, `_prune` drops the 4-warp
    2-stage entries, which ptxas (triton 3.6) crashes on.
    """
    def c(block_m, block_n, num_warps, num_stages):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                             num_stages=num_stages, pre_hook=_tma_boxes_hook(kind))

    if kind == "fwd":
        return [c(128, 128, 8, 3), c(64, 128, 4, 3), c(128, 128, 4, 3), c(128, 64, 8, 3),
                c(64, 64, 4, 2)]
    if kind == "dkdv":
        return [c(64, 128, 8, 2), c(64, 128, 8, 3), c(64, 64, 4, 2), c(64, 64, 4, 3),
                c(32, 64, 4, 2)]
    return [c(128, 64, 8, 3), c(128, 64, 8, 4), c(64, 128, 4, 3), c(128, 64, 4, 3),  # dq
            c(64, 32, 4, 2)]


# Which block size is the row count of the tiles each kernel's inner loop streams.
_INNER_ROWS = {"fwd": "BLOCK_N", "dkdv": "BLOCK_M", "dq": "BLOCK_N"}


def _set_tma_boxes(kind, descs, block_m, block_n, block_d):
    rows = block_n if _INNER_ROWS[kind] == "BLOCK_N" else block_m
    for desc in descs:
        desc.block_shape = [1, rows, 1, block_d]


def _tma_boxes_hook(kind):
    """Config pre-hook: size the descriptors' boxes to the configuration's tiles."""
    def hook(nargs):
        if nargs["USE_TMA"]:
            _set_tma_boxes(kind, (nargs["DESC_A"], nargs["DESC_B"]), nargs["BLOCK_M"],
                           nargs["BLOCK_N"], nargs["BLOCK_D"])
    return hook


def _use_tma(*tensors):
    """Whether the inner loops load these tensors through TMA tensor descriptors: on a GPU with
    the tensor memory accelerator (compute capability 9.0 or newer), with 16-byte aligned
    bases and every stride but the last a multiple of 16 bytes (the copy engine's rules), for
    fp16/bf16 and head dims up to 128, the cases the tuned lists were measured on. A tensor
    with a zero stride (a broadcast, such as the gradient of ``out.sum()``) takes pointers."""
    first = tensors[0]
    if not first.is_cuda or torch.cuda.get_device_capability(first.device)[0] < 9:
        return False
    if first.element_size() != 2 or first.shape[-1] > 128:
        return False
    return all(t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def _tma_for(pb, *tensors):
    """`_use_tma` on the autotuned path only (and under the interpreter, where tests force it):
    with triton 3.6, ptxas crashes compiling the fixed short-sequence tiles with descriptors,
    while `_prune` keeps the configurations it crashes on out of the tuned lists."""
    tuned_path = pb.bucket >= _AUTOTUNE_MIN_SEQ or is_interpreted(_attn_fwd_kernel)
    return tuned_path and _use_tma(*tensors)


def _descriptors(use_tma, *tensors):
    """4-D tensor descriptors ((1, total, heads, dim) for packed tensors) whose boxes
    `_set_tma_boxes` sizes at launch; the tensors themselves (unused) without TMA."""
    if not use_tma:
        return tensors
    views = [t if t.dim() == 4 else t.unsqueeze(0) for t in tensors]
    block_d = max(triton.next_power_of_2(views[0].shape[-1]), 16)
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 16, 1, block_d])
                 for t in views)


# (num_warps, num_stages) of the tiles that ptxas (triton 3.6, H100) crashes on (SIGSEGV) when
# the inner loop loads through tensor descriptors: the forward's and dQ's autotune entries
# (NOTES.md, v4) and the fixed short-sequence tiles of all three kernels, dK/dV's included,
# are all 4 warps deep 2 stages. The tuner survives a failed compile, but triton prints the
# whole PTX of each (thousands of lines on a cold cache) and the compile time is lost.
_PTXAS_CRASHES_WITH_TMA = (4, 2)


def _prune(configs, named_args, **kwargs):
    """The tuners' pre-pruning: drop tiles that cannot fit in shared memory at large head dims
    or in fp32, and, with TMA, the configurations ptxas crashes on (`_PTXAS_CRASHES_WITH_TMA`)
    in every kernel; the last entry is the fallback when nothing else is left."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elem = named_args["Q"].element_size()
    budget = 128 * 128 * 128 * 2 // (block_d * elem)  # BLOCK_M * BLOCK_N that fits
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= budget]
    if kwargs.get("USE_TMA"):
        kept = [cfg for cfg in kept
                if (cfg.num_warps, cfg.num_stages) != _PTXAS_CRASHES_WITH_TMA] or kept
    return kept or configs[-1:]


_TUNE_KEYS = ["HEAD_DIM", "MASK_LEFT", "MASK_RIGHT", "VARLEN", "seq_bucket", "DOT_PREC", "USE_TMA"]


# A launch at least this long is timed once per configuration when tuning.
_LONG_LAUNCH_MS = 5.0


def _tuning_bench(kernel_call, quantiles=None):
    """The tuners' timer. Triton's default runs each configuration about eight times (an
    estimate, a warm-up and the timed repeats): at 512K tokens a backward launch takes seconds
    and a cold tuning sweep minutes. Here a configuration runs once to compile and warm up, once
    timed, and only launches shorter than `_LONG_LAUNCH_MS` (where one timing is noisy) go on
    to triton's repeated measurement."""
    kernel_call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    kernel_call()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    if ms < _LONG_LAUNCH_MS:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return [ms] * len(quantiles) if quantiles else ms


def _autotuned(kind, kernel):
    return triton.autotune(_configs(kind), key=_TUNE_KEYS, do_bench=_tuning_bench,
                           prune_configs_by={"early_config_prune": _prune})(kernel)


_fwd_tuned = _autotuned("fwd", _attn_fwd_kernel)
_dkdv_tuned = _autotuned("dkdv", _attn_bwd_dkdv_kernel)
_dq_tuned = _autotuned("dq", _attn_bwd_dq_kernel)

# Below this many tokens a launch is too short for tuning to pay, and each distinct shape would
# trigger a tuning sweep: short sequences take one fixed, always-fitting configuration.
_AUTOTUNE_MIN_SEQ = 1024
# Under the CPU interpreter every tile is a numpy call: small fixed tiles keep tests fast while
# still giving several blocks per sequence. BLOCK_M != BLOCK_N exercises the diagonal logic.
_INTERPRET_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


def _fixed_config(kind, block_d, elem):
    small = block_d * elem > 256  # head dim 256 in 16-bit, or >= 128 in fp32
    if kind == "fwd":
        return (32, 32, 4, 2) if small else (64, 64, 4, 2)
    if kind == "dkdv":
        return (16, 32, 4, 1) if small else (32, 64, 4, 2)
    return (32, 16, 4, 1) if small else (64, 32, 4, 2)


# The configuration the autotuner chose, per kernel and tuning key (`_tuned_key`). Once a key
# is tuned, `_launch` launches its configuration directly: the autotuner's own dispatch (an
# argument dict, its key and the pre-hook's dict, over some forty arguments) took 91 us of its
# own per call under cProfile on the H100 (`scripts/bench/host_time.py`), more than Triton's
# launch of the kernel (33 us of its own).
_CHOSEN: dict[str, dict[tuple, triton.Config]] = {"fwd": {}, "dkdv": {}, "dq": {}}


def _tuned_key(args, seq_bucket, meta):
    """At least what the autotuner keys on: the `_TUNE_KEYS` values (``meta`` and the bucket)
    and the dtype of every tensor argument."""
    return (seq_bucket, *meta.values(), *(a.dtype for a in args if isinstance(a, torch.Tensor)))


def _launch(kind, tuned, grid_fn, *args, seq_bucket, descs, **meta):
    """Launch ``kind`` with the interpreter's blocks, the fixed short-sequence configuration or
    the autotuned one; ``descs`` are the kernel's DESC_A and DESC_B, already among ``args``."""
    q = args[0]
    if is_interpreted(tuned.fn):
        block_m, block_n = _INTERPRET_BLOCKS[kind]
        options = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    elif seq_bucket < _AUTOTUNE_MIN_SEQ:
        block_m, block_n, warps, stages = _fixed_config(kind, meta["BLOCK_D"], q.element_size())
        options = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
    else:
        key = _tuned_key(args, seq_bucket, meta)
        config = _CHOSEN[kind].get(key)
        if config is None:
            tuned[grid_fn](*args, seq_bucket, **meta)  # the configurations' pre-hook sizes the boxes
            _CHOSEN[kind][key] = tuned.best_config
            return
        options = config.all_kwargs()  # the blocks, warps, stages: what the autotuner launches
    if meta["USE_TMA"]:
        _set_tma_boxes(kind, descs, options["BLOCK_M"], options["BLOCK_N"], meta["BLOCK_D"])
    tuned.fn[grid_fn(options)](*args, seq_bucket, **options, **meta)


class _Problem:
    """Everything a launch needs besides the tensors: sizes, masks, strides of the lse layout.

    Dense tensors are viewed as (batch, seqlen, heads, dim); packed varlen tensors as
    (1, total, heads, dim) with a batch stride of 0, the sequences found through cu_seqlens.
    """

    def __init__(self, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                 window_size, deterministic=True):
        self.varlen = cu_seqlens_q is not None
        self.deterministic = deterministic
        self.nheads, head_dim = q.shape[-2], q.shape[-1]
        self.nheads_k = k.shape[-2]
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.seqlen_q, self.seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
            total_q = q.shape[0]
            self.lse_shape = (self.nheads, total_q)
            self.lse_strides = (0, total_q)
        else:
            self.batch, self.seqlen_q = q.shape[0], q.shape[1]
            self.seqlen_k = k.shape[1]
            self.lse_shape = (self.batch, self.nheads, self.seqlen_q)
            self.lse_strides = (self.nheads * self.seqlen_q, self.seqlen_q)
        left, right = window_size
        if causal:
            right = 0
        self.left, self.right = max(int(left), 0), max(int(right), 0)
        self.scale = softmax_scale
        self.meta = dict(
            HEAD_DIM=head_dim,
            BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
            MASK_LEFT=left >= 0,
            MASK_RIGHT=right >= 0,
            VARLEN=self.varlen,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        )
        self.bucket = _seq_bucket(max(self.seqlen_q, self.seqlen_k))


def _strides(t):
    """(batch, row, head) strides of a dense (B, S, H, D) or packed (T, H, D) tensor."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(0), t.stride(1)


def _cu_args(pb, cu_q, cu_k, fallback):
    return (cu_q, cu_k) if pb.varlen else (fallback, fallback)


def _dense_causal_or_full(pb):
    """The mask scope of the Gluon kernels: dense inputs, no sliding window (a right mask is the
    causal one)."""
    return not (pb.varlen or pb.meta["MASK_LEFT"] or (pb.meta["MASK_RIGHT"] and pb.right != 0))


def _gluon_forward(q, k, v, out, pb):
    """Whether the forward runs the Gluon kernel for Hopper (`hopper_fwd`): dense causal or
    full attention in its scope, at the head dims where it measured faster than this file's
    kernel (`hopper_fwd.DEFAULT_HEAD_DIMS`). ``FLASHLM_GLUON_FWD=0`` turns it off, ``=1`` on
    for every head dim it supports."""
    flag = os.environ.get("FLASHLM_GLUON_FWD", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"FLASHLM_GLUON_FWD must be 0 (off), 1 (on) or unset, got {flag!r}")
    if flag == "0" or not _dense_causal_or_full(pb):
        return False
    if flag != "1" and q.shape[-1] not in hopper_fwd.DEFAULT_HEAD_DIMS:
        return False
    return hopper_fwd.supports(q, k, v, out)


def _flash_fwd_impl(q, k, v, cu_q, cu_k, pb, out=None, lse=None):
    """Launch the forward. ``out``/``lse`` may be passed in preallocated (tests poison them)."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(pb.lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or pb.batch == 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse

    if _gluon_forward(q, k, v, out, pb):
        with device_ctx(q):
            # Only full attention and the causal mask are left: a right mask means causal.
            return hopper_fwd.hopper_fwd(q, k, v, out, lse, pb.scale, pb.meta["MASK_RIGHT"])

    def grid(meta):
        return (triton.cdiv(pb.seqlen_q, meta["BLOCK_M"]), pb.batch * pb.nheads)

    use_tma = _tma_for(pb, k, v)
    descs = _descriptors(use_tma, k, v)
    with device_ctx(q):
        _launch(
            "fwd", _fwd_tuned, grid,
            q, k, v, out, lse, *_cu_args(pb, cu_q, cu_k, lse), *descs,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *pb.lse_strides,
            pb.nheads, pb.seqlen_q, pb.seqlen_k, pb.nheads // pb.nheads_k, pb.scale * LOG2E,
            pb.left, pb.right, seq_bucket=pb.bucket, descs=descs, USE_TMA=use_tma, **pb.meta,
        )
    return out, lse


def _gluon_backward(q, k, v, out, dout, dk, dv, pb):
    """Whether the backward runs the fused Gluon kernel for Hopper (`hopper_bwd`): only when
    the caller allows a non-deterministic dQ, for dense causal or full attention in its scope."""
    if pb.deterministic or not _dense_causal_or_full(pb):
        return False
    if (q.shape[-1], bool(pb.meta["MASK_RIGHT"])) not in hopper_bwd.FASTER:
        return False
    return hopper_bwd.supports(q, k, v, out, dout, dk, dv)


def _flash_bwd_impl(dout, q, k, v, out, lse, dlse, cu_q, cu_k, pb, grads=None):
    """Launch the backward. ``grads=(dq, dk, dv)`` may be passed in preallocated. A problem
    built with ``deterministic=False`` lets Hopper GPUs take the fused kernel. ``dlse`` may come
    in any layout autograd hands over (a broadcast from ``lse.sum()``, a transposed view): the
    kernels read it, like lse, as a contiguous (batch, heads, seqlen) or (heads, total) tensor."""
    dout = unit_last(dout)
    if dlse is not None:
        dlse = dlse.contiguous()
    if grads is None:
        grads = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                 torch.empty(k.shape, dtype=k.dtype, device=k.device),
                 torch.empty(v.shape, dtype=v.dtype, device=v.device))
    dq, dk, dv = grads
    if q.numel() == 0 or k.numel() == 0 or pb.batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(pb.lse_shape, dtype=torch.float32, device=q.device)
    group = pb.nheads // pb.nheads_k
    cu = _cu_args(pb, cu_q, cu_k, delta)
    with device_ctx(q):
        pre_block = 32 if is_interpreted(_bwd_preprocess_kernel) else 64
        _bwd_preprocess_kernel[(triton.cdiv(pb.seqlen_q, pre_block), pb.batch * pb.nheads)](
            out, dout, dlse if dlse is not None else delta, delta, cu[0],
            *_strides(out), *_strides(dout), *pb.lse_strides, pb.nheads, pb.seqlen_q,
            HEAD_DIM=pb.meta["HEAD_DIM"], BLOCK_D=pb.meta["BLOCK_D"], BLOCK_M=pre_block,
            HAS_DLSE=dlse is not None, VARLEN=pb.varlen,
        )
        if _gluon_backward(q, k, v, out, dout, dk, dv, pb):
            hopper_bwd.hopper_bwd(dout, q, k, v, lse, delta, dq, dk, dv, pb.scale,
                                  pb.meta["MASK_RIGHT"])
            return dq, dk, dv
        use_tma = _tma_for(pb, q, dout)
        descs = _descriptors(use_tma, q, dout)
        _launch(
            "dkdv", _dkdv_tuned,
            lambda m: (triton.cdiv(pb.seqlen_k, m["BLOCK_N"]), pb.batch * pb.nheads_k),
            q, k, v, dout, lse, delta, dk, dv, *cu, *descs,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
            *_strides(dv), *pb.lse_strides,
            pb.nheads, pb.nheads_k, pb.seqlen_q, pb.seqlen_k, group, pb.scale,
            pb.scale * LOG2E, pb.left, pb.right, seq_bucket=pb.bucket, descs=descs,
            USE_TMA=use_tma, **pb.meta,
        )
        use_tma = _tma_for(pb, k, v)
        descs = _descriptors(use_tma, k, v)
        _launch(
            "dq", _dq_tuned,
            lambda m: (triton.cdiv(pb.seqlen_q, m["BLOCK_M"]), pb.batch * pb.nheads),
            q, k, v, dout, lse, delta, dq, *cu, *descs,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            *pb.lse_strides,
            pb.nheads, pb.seqlen_q, pb.seqlen_k, group, pb.scale, pb.scale * LOG2E,
            pb.left, pb.right, seq_bucket=pb.bucket, descs=descs, USE_TMA=use_tma, **pb.meta,
        )
    return dq, dk, dv


# torch custom ops: opaque to torch.compile (no graph break), with fake implementations that
# only describe shapes. One pair serves the dense and the varlen layout (cu_seqlens None or not).

@torch.library.custom_op("flashlm::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                       max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                       window_left: int, window_right: int, deterministic: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    pb = _Problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                  (window_left, window_right), deterministic)
    return _flash_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, pb)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, deterministic):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(lse_shape, dtype=torch.float32, device=q.device))


@torch.library.custom_op("flashlm::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                       cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                       max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                       window_left: int, window_right: int, deterministic: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pb = _Problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                  (window_left, window_right), deterministic)
    return _flash_bwd_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, pb)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, deterministic):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *ctx.static = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.static)
    return (dq, dk, dv) + (None,) * 9


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttnFunction(torch.autograd.Function):
    """The eager path: the launchers of the custom ops above, without the dispatcher's Python
    layers (on the H100, 1.48 ms of host time per forward+backward against 1.66 ms through the
    custom op; kernels/attention/NOTES.md). Under torch.compile the custom ops, opaque to the
    compiler and with fake implementations, are used instead."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, *static):
        ctx.pb = _problem(q, k, cu_q, static)
        out, lse = _flash_fwd_impl(q, k, v, cu_q, cu_k, ctx.pb)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient to read
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = _flash_bwd_impl(dout, q, k, v, out, lse, dlse, cu_q, cu_k, ctx.pb)
        return (dq, dk, dv) + (None,) * 9


def _problem(q, k, cu_q, static):
    """`_Problem` from the ops' trailing arguments (max_seqlen_q, max_seqlen_k, softmax_scale,
    causal, window_left, window_right, deterministic)."""
    max_q, max_k, scale, causal, left, right, deterministic = static
    return _Problem(q, k, cu_q, max_q, max_k, scale, causal, (left, right), deterministic)


def _attention(q, k, v, cu_q, cu_k, *static):
    """(out, lse): the custom op while torch.compile traces, the autograd function otherwise."""
    if torch.compiler.is_compiling():
        return _flash_attn_fwd_op(q, k, v, cu_q, cu_k, *static)
    return _FlashAttnFunction.apply(q, k, v, cu_q, cu_k, *static)


class _SavedForward(torch.autograd.Function):
    """Attention whose forward pass already ran: returns its saved output, and differentiates it
    with the usual backward kernels from the saved output and lse."""

    @staticmethod
    def forward(ctx, q, k, v, saved, static):
        out, lse, cu_q, cu_k = saved
        ctx.pb = _problem(q, k, cu_q, static)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _flash_bwd_impl(dout, q, k, v, out, lse, None, cu_q, cu_k, ctx.pb)
        return dq, dk, dv, None, None


def flash_attn_replay(q, k, v, out, lse, softmax_scale=None, causal=False, window_size=(-1, -1),
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      deterministic=True):
    """Attention of q, k, v whose forward pass has already run, without running it again.

    ``out`` and ``lse`` are what `flash_attn_func` (or `flash_attn_varlen_func`, with
    ``cu_seqlens_*`` and ``max_seqlen_*``) returned with ``return_lse=True`` for the same
    inputs and options. The result is ``out``, attached to the autograd graph of q, k and v:
    its backward is the usual one. Activation checkpointing uses this to recompute a layer
    without its attention forward (``GPTConfig.checkpoint_keep_attention``). Nothing checks that
    ``out`` came from these inputs; gradients are only right if it did. ``deterministic`` is as
    in `flash_attn_func`; ``softmax_scale`` must be the one the forward used (positive and
    finite, as there).
    """
    fn = "flash_attn_replay"
    varlen = cu_seqlens_q is not None
    _check_tensors(fn, q, k, v, 3 if varlen else 4,
                   "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"{fn}: out must match q, got out {tuple(out.shape)} {out.dtype} and q "
                         f"{tuple(q.shape)} {q.dtype}")
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != lse_shape or lse.dtype != torch.float32:
        raise ValueError(f"{fn}: lse must be float32 of shape {lse_shape}, got {lse.dtype} of "
                         f"shape {tuple(lse.shape)}")
    left, right = _check_window(fn, window_size)
    softmax_scale = _check_scale(fn, softmax_scale, q.shape[-1])
    if varlen:
        static = (int(max_seqlen_q), int(max_seqlen_k))
    else:
        static = (q.shape[1], k.shape[1])
    static += (softmax_scale, bool(causal), left, right, bool(deterministic))
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    # The backward reads out by its strides (unit last one) and lse as a contiguous tensor.
    saved = (unit_last(out), lse.contiguous(), cu_seqlens_q, cu_seqlens_k)
    return _SavedForward.apply(q, k, v, saved, static)


def _check_tensors(fn, q, k, v, rank, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(fn, name, t)
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must have {rank} dimensions {layout}, got {t.dim()} "
                             f"with shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k and v must share one dtype, got q={q.dtype}, "
                        f"k={k.dtype}, v={v.dtype}")
    check_runnable(fn, _attn_fwd_kernel, "use the 'sdpa' attention backend", q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{fn}: head_dim mismatch, q has head_dim={head_dim} and k/v "
                         f"head_dim={k.shape[-1]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim={head_dim} is not supported; it must be a multiple "
                         f"of 8 between 8 and {MAX_HEAD_DIM}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"{fn}: nheads={nheads} (q) must be a multiple of nheads_k={nheads_k} "
                         "(k/v)")


def _check_window(fn, window_size):
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: window_size must be a pair of ints (left, right), got "
                        f"{window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{fn}: window_size={tuple(window_size)!r}: each side must be >= 0, "
                         "or -1 for unbounded")
    return left, right


def _check_scale(fn, softmax_scale, head_dim):
    """The softmax scale as a float: ``1 / sqrt(head_dim)`` for None, else a positive finite
    number. The kernels take each row's running maximum of the scaled scores as the scale
    times the maximum of the raw scores, which holds only for a positive scale; a scale of 0
    would also multiply the masked scores' -inf into NaN."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: softmax_scale must be a number, got {softmax_scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: softmax_scale={softmax_scale!r} is not supported; it must be a "
                         "positive finite number (None for 1 / sqrt(head_dim))")
    return scale


def _check_cu_seqlens(fn, name, cu, total, max_seqlen, device, batch=None, values=True):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
        desc = f"{cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) \
            else type(cu).__name__
        raise TypeError(f"{fn}: {name} must be a 1-D torch.int32 tensor, got {desc}")
    if cu.device != device:
        raise ValueError(f"{fn}: {name} is on {cu.device} but q, k, v are on {device}")
    if cu.numel() < 1 or (batch is not None and cu.numel() != batch + 1):
        raise ValueError(f"{fn}: {name} has {cu.numel()} entries; cu_seqlens_q and cu_seqlens_k "
                         "must both hold num_sequences + 1 offsets")
    if not values or torch.compiler.is_compiling():
        return  # the value checks below read the tensor back (a sync, a graph break)
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{fn}: {name} must start at 0 and never decrease, got {values[:16]}"
                         + (" ..." if len(values) > 16 else ""))
    if values[-1] != total:
        raise ValueError(f"{fn}: {name}[-1]={values[-1]} does not match the {total} packed "
                         "tokens of the tensor")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{fn}: max_seqlen={max_seqlen} is smaller than the longest sequence in "
                         f"{name} ({max(lengths)})")


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, deterministic=True):
    """Exact attention without materializing the score matrix (FlashAttention-2 interface).

    Args:
        q: (batch, seqlen_q, nheads, head_dim), fp16, bf16 or fp32.
        k, v: (batch, seqlen_k, nheads_k, head_dim), same dtype and device as ``q``;
            ``nheads`` must be a multiple of ``nheads_k`` (GQA/MQA).
        softmax_scale: scale applied to ``q @ k^T``; defaults to ``1 / sqrt(head_dim)``. It
            must be a positive finite number: 0, a negative scale, inf or NaN raise ValueError.
        causal: causal mask aligned to the bottom-right corner when ``seqlen_q != seqlen_k``.
        window_size: ``(left, right)`` sliding window; -1 leaves a side unbounded. Query ``i``
            sees keys ``[i + d - left, i + d + right]`` with ``d = seqlen_k - seqlen_q``
            (``right`` is 0 when causal).
        return_lse: also return the log-sum-exp of the scaled scores.
        deterministic: keep the backward bit-for-bit reproducible (the default). ``False``
            lets Hopper GPUs run a fused backward that sums dQ with atomics, in an order that
            varies between runs (last-bit differences); it is faster there
            (``kernels/attention/NOTES.md``). Where that kernel does not apply (other GPUs,
            sliding windows, lengths that are not a multiple of 128) the flag changes nothing.

    Returns:
        out: (batch, seqlen_q, nheads, head_dim), dtype of ``q``; or ``(out, lse)`` with
        lse: (batch, nheads, seqlen_q) float32, natural log (``+inf`` for a row that sees no key).

    Differentiable in q, k and v (and through ``lse``).
    """
    fn = "flash_attn_func"
    _check_tensors(fn, q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{fn}: batch size mismatch, q has batch={q.shape[0]} and k/v "
                         f"batch={k.shape[0]}")
    left, right = _check_window(fn, window_size)
    softmax_scale = _check_scale(fn, softmax_scale, q.shape[-1])
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    out, lse = _attention(q, k, v, None, None, q.shape[1], k.shape[1], softmax_scale,
                          bool(causal), left, right, bool(deterministic))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1),
                           return_lse=False, check_cu_seqlens=True, deterministic=True):
    """Attention over packed variable-length sequences; no attention crosses a sequence.

    Args:
        q: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim): the sequences of
            a batch concatenated (FlashAttention-2's packed layout).
        cu_seqlens_q, cu_seqlens_k: (num_sequences + 1,) int32 on the same device; sequence
            ``i`` holds rows ``cu[i]:cu[i + 1]``. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: upper bounds on the sequence lengths (they size the grid).
        softmax_scale, causal, window_size: as in `flash_attn_func`, per sequence.
        return_lse: also return lse of shape (nheads, total_q).
        deterministic: as in `flash_attn_func`; packed sequences always take the
            deterministic backward today.
        check_cu_seqlens: check the offsets' values (see below); pass False when the caller
            has already checked them, e.g. once per model forward rather than once per layer.

    Returns:
        out: (total_q, nheads, head_dim), or ``(out, lse)``.

    The offsets are checked (start at 0, never decrease, end at the tensor's length, fit the
    max lengths), which reads them back to the host; under ``torch.compile`` only their shape
    and dtype are checked.
    """
    fn = "flash_attn_varlen_func"
    _check_tensors(fn, q, k, v, 3, "(total_tokens, heads, head_dim)")
    _check_cu_seqlens(fn, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device,
                      values=check_cu_seqlens)
    _check_cu_seqlens(fn, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device,
                      batch=cu_seqlens_q.numel() - 1, values=check_cu_seqlens)
    left, right = _check_window(fn, window_size)
    softmax_scale = _check_scale(fn, softmax_scale, q.shape[-1])
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                          int(max_seqlen_k), softmax_scale, bool(causal), left, right,
                          bool(deterministic))
    return (out, lse) if return_lse else out
