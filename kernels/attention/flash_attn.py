"""FlashAttention forward and backward in Triton: flashlm's attention kernel.

Algorithm
    Forward: one program per (query block, batch * head). It walks the key/value blocks with an
    online softmax (running max ``m`` and sum ``l`` in fp32, scores in the log2 domain with the
    softmax scale folded into one multiply), so the seqlen_q x seqlen_k score matrix never
    leaves on-chip memory. Key blocks that need no mask run in a loop without any masking;
    only the causal diagonal and the ragged last block run the masked loop. Causal programs
    are launched heaviest first.
    Backward (FlashAttention-2 style, deterministic): a small kernel computes
    ``delta = rowsum(dO * O)``; one kernel per key block accumulates dK and dV over every
    query block and every query head of its GQA group in registers; a separate kernel per
    query block accumulates dQ. No atomics, so gradients are bit-identical run to run.

Layout
    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim);
    out like q; lse: (batch, nheads, seqlen_q) fp32, natural log. Any strides with a unit
    stride in the last dimension are used in place.

Semantics (same as FlashAttention-2 >= 2.1)
    GQA/MQA: query head h reads key/value head h // (nheads // nheads_k), without copies.
    Causal masks are aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.
    A query row that sees no key gets out = 0 and lse = +inf (zero gradient).

dtypes
    fp16 and bf16 (fp32 accumulation); fp32 inputs use IEEE fp32 dot products.

Head dims
    Every multiple of 8 from 8 to 256. Non-power-of-two head dims are padded to the next
    power of two inside the kernel and masked.

Not supported here
    Dropout, ALiBi, softcapping, arbitrary attention masks, a KV cache.
"""

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi,
    seqlen_k, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, D_PADDED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
        if MASKED:
            kv_mask = offs_n[:, None] < seqlen_k
            if D_PADDED:
                kv_mask = kv_mask & d_ok
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif D_PADDED:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
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
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif D_PADDED:
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_ranges(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """Key range [0, hi) that query block start_m needs, and the end of its unmasked prefix."""
    diag = seqlen_k - seqlen_q
    full_k = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seqlen_k)
        unmasked = (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
        unmasked = tl.minimum(unmasked, full_k)
    else:
        hi = seqlen_k
        unmasked = full_k
    unmasked = tl.minimum(unmasked, hi)
    return diag, unmasked, hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    nheads, seqlen_q, seqlen_k, group, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Later query blocks see more keys: launch them first so the tail of the grid is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = (pid_bh % nheads).to(tl.int64)
    hk = h // group
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    row_ok = offs_m[:, None] < seqlen_q
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok & d_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag, unmasked, hi = _key_ranges(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0, unmasked,
        seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, D_PADDED, DOT_PREC)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, unmasked, hi,
        seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, D_PADDED, DOT_PREC)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"),
                   (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    nheads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE: the softmax-backward correction per query row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = (pid_bh % nheads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_offs = pid_bh.to(tl.int64) * seqlen_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_offs, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row_offs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
    offs_n, offs_d, lo, hi, seqlen_q, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    D_PADDED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :]
        if MASKED:
            row_mask = offs_m[:, None] < seqlen_q
            if D_PADDED:
                row_mask = row_mask & d_ok
            q = tl.load(q_ptrs, mask=row_mask, other=0.0)
            lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
        elif D_PADDED:
            q = tl.load(q_ptrs, mask=d_ok, other=0.0)
            lse = tl.load(lse_base + offs_m)
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(lse_base + offs_m)
        # Transposed scores: (BLOCK_N, BLOCK_M), so dK and dV accumulate without transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :] * 1.4426950408889634)
        if MASKED:
            visible = offs_m[None, :] < seqlen_q
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag)
            p_t = tl.where(visible, p_t, 0.0)
            do = tl.load(do_ptrs, mask=row_mask, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            if D_PADDED:
                do = tl.load(do_ptrs, mask=d_ok, other=0.0)
            else:
                do = tl.load(do_ptrs)
            delta = tl.load(delta_base + offs_m)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    nheads, nheads_k, seqlen_q, seqlen_k, group, softmax_scale, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = (pid_bhk // nheads_k).to(tl.int64)
    hk = (pid_bhk % nheads_k).to(tl.int64)
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + rows_n * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + rows_n * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows [lo, unmasked_lo) touch the causal diagonal and need a mask; the rows from
    # unmasked_lo up to the last full query block need none; the ragged tail needs one again.
    diag = seqlen_k - seqlen_q
    full_q = (seqlen_q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(start_n + BLOCK_N - 1 - diag, 0)
        first_full = ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        unmasked_lo = tl.maximum(lo, tl.minimum(first_full, full_q))
    else:
        lo = 0
        unmasked_lo = 0
    tail_lo = tl.maximum(unmasked_lo, full_q)

    for g in range(0, group):
        h = hk * group + g
        bh = b * nheads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * seqlen_q
        delta_base = DELTA + bh * seqlen_q
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, lo, unmasked_lo, seqlen_q, diag, qk_scale,
            HEAD_DIM, BLOCK_M, CAUSAL, True, D_PADDED, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, unmasked_lo, full_q, seqlen_q, diag, qk_scale,
            HEAD_DIM, BLOCK_M, CAUSAL, False, D_PADDED, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, tail_lo, seqlen_q, seqlen_q, diag, qk_scale,
            HEAD_DIM, BLOCK_M, CAUSAL, True, D_PADDED, DOT_PREC)

    dk = dk * softmax_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + rows_n * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + rows_n * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi,
    seqlen_k, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    D_PADDED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
        if MASKED:
            kv_mask = offs_n[:, None] < seqlen_k
            if D_PADDED:
                kv_mask = kv_mask & d_ok
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif D_PADDED:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    nheads, seqlen_q, seqlen_k, group, softmax_scale, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = (pid_bh % nheads).to(tl.int64)
    hk = h // group
    D_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0)
    row_offs = pid_bh.to(tl.int64) * seqlen_q + offs_m
    # Rows past seqlen_q get lse = +inf, so every probability in them is exactly zero.
    lse = tl.load(LSE + row_offs, mask=offs_m < seqlen_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_offs, mask=offs_m < seqlen_q, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag, unmasked, hi = _key_ranges(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       0, unmasked, seqlen_k, diag, qk_scale,
                       HEAD_DIM, BLOCK_N, CAUSAL, False, D_PADDED, DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       unmasked, hi, seqlen_k, diag, qk_scale,
                       HEAD_DIM, BLOCK_N, CAUSAL, True, D_PADDED, DOT_PREC)
    dq = dq * softmax_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: configurations, launchers, autograd, public function.

def _is_interpreted(kernel):
    return type(kernel).__name__ == "InterpretedFunction"


def _seq_bucket(seqlen):
    """Autotuning key: sequence lengths rounded to powers of two, so a 1K..128K sweep tunes
    once per octave rather than once per length."""
    return triton.next_power_of_2(max(int(seqlen), 16))


def _configs(kind):
    """Short autotune lists, one per kernel, chosen on an H100 (triton 3.6) by a wide sweep
    (`scripts/bench_attention.py --explore`; winners recorded in kernels/attention/NOTES.md).

    Forward: 128x128 tiles with 8 warps win at head dim 128; 128x64 with 4 warps wins at the
    longest causal lengths. Backward dK/dV: 64-row query steps over 128-key tiles (causal) or
    64x64 (non-causal). dQ: the mirror image. The 64x64 and smaller entries are the fallbacks
    that `_prune` keeps for head dim 256 and fp32, where the large tiles do not fit.
    """
    c = triton.Config
    if kind == "fwd":
        return [
            c({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            c({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            c({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            c({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        ]
    if kind == "dkdv":
        return [
            c({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            c({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            c({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=3),
            c({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        ]
    return [  # dq
        c({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        c({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        c({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles that cannot fit in shared memory at large head dims or in fp32."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elem = named_args["Q"].element_size()
    budget = 128 * 128 * 128 * 2 // (block_d * elem)  # BLOCK_M * BLOCK_N that fits
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= budget]
    return kept or configs[-1:]


_TUNE_KEYS = ["HEAD_DIM", "CAUSAL", "seq_bucket", "DOT_PREC"]
_fwd_tuned = triton.autotune(_configs("fwd"), key=_TUNE_KEYS,
                             prune_configs_by={"early_config_prune": _prune})(_attn_fwd_kernel)
_dkdv_tuned = triton.autotune(_configs("dkdv"), key=_TUNE_KEYS,
                              prune_configs_by={"early_config_prune": _prune})(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_configs("dq"), key=_TUNE_KEYS,
                            prune_configs_by={"early_config_prune": _prune})(_attn_bwd_dq_kernel)

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


def _launch(kind, tuned, grid_fn, *args, seq_bucket, **meta):
    q = args[0]
    if _is_interpreted(tuned.fn):
        block_m, block_n = _INTERPRET_BLOCKS[kind]
        grid = grid_fn({"BLOCK_M": block_m, "BLOCK_N": block_n})
        tuned.fn[grid](*args, seq_bucket, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
    elif seq_bucket < _AUTOTUNE_MIN_SEQ:
        block_m, block_n, warps, stages = _fixed_config(kind, meta["BLOCK_D"], q.element_size())
        grid = grid_fn({"BLOCK_M": block_m, "BLOCK_N": block_n})
        tuned.fn[grid](*args, seq_bucket, BLOCK_M=block_m, BLOCK_N=block_n,
                       num_warps=warps, num_stages=stages, **meta)
    else:
        tuned[grid_fn](*args, seq_bucket, **meta)


def _common_meta(q, causal):
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        CAUSAL=bool(causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_ctx(t):
    return torch.cuda.device(t.device) if t.is_cuda else _nullctx()


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _flash_fwd_impl(q, k, v, softmax_scale, causal, out=None, lse=None):
    """Launch the forward. ``out``/``lse`` may be passed in preallocated (tests poison them)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)

    with _device_ctx(q):
        _launch(
            "fwd", _fwd_tuned, grid,
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            nheads, seqlen_q, seqlen_k, nheads // nheads_k, softmax_scale * _LOG2E,
            seq_bucket=_seq_bucket(max(seqlen_q, seqlen_k)),
            **_common_meta(q, causal),
        )
    return out, lse


def _flash_bwd_impl(dout, q, k, v, out, lse, dlse, softmax_scale, causal, grads=None):
    """Launch the backward. ``grads=(dq, dk, dv)`` may be passed in preallocated."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dout = _unit_last(dout)
    if grads is None:
        grads = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                 torch.empty(k.shape, dtype=k.dtype, device=k.device),
                 torch.empty(v.shape, dtype=v.dtype, device=v.device))
    dq, dk, dv = grads
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    meta = _common_meta(q, causal)
    bucket = _seq_bucket(max(seqlen_q, seqlen_k))
    group = nheads // nheads_k
    with _device_ctx(q):
        pre_block = 64 if not _is_interpreted(_bwd_preprocess_kernel) else 32
        _bwd_preprocess_kernel[(triton.cdiv(seqlen_q, pre_block), batch * nheads)](
            out, dout, dlse if dlse is not None else delta, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            nheads, seqlen_q,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block,
            HAS_DLSE=dlse is not None,
        )
        _launch(
            "dkdv", _dkdv_tuned,
            lambda m: (triton.cdiv(seqlen_k, m["BLOCK_N"]), batch * nheads_k),
            q, k, v, dout, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            nheads, nheads_k, seqlen_q, seqlen_k, group, softmax_scale,
            softmax_scale * _LOG2E, seq_bucket=bucket,
            **meta,
        )
        _launch(
            "dq", _dq_tuned,
            lambda m: (triton.cdiv(seqlen_q, m["BLOCK_M"]), batch * nheads),
            q, k, v, dout, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            nheads, seqlen_q, seqlen_k, group, softmax_scale, softmax_scale * _LOG2E,
            seq_bucket=bucket, **meta,
        )
    return dq, dk, dv


# torch custom ops: opaque to torch.compile (no graph break), with fake implementations that
# only describe shapes.

@torch.library.custom_op("flashlm::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd_impl(q, k, v, softmax_scale, causal)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal):
    batch, seqlen_q, nheads, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device))


@torch.library.custom_op("flashlm::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                       softmax_scale: float, causal: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_bwd_impl(dout, q, k, v, out, lse, dlse, softmax_scale, causal)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, causal):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attn_func: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"flash_attn_func: {name} must have 4 dimensions (batch, seqlen, heads, head_dim), "
                f"got {t.dim()} with shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash_attn_func: {name}.dtype={t.dtype} is not supported; "
                            "use torch.float16, torch.bfloat16 or torch.float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attn_func: q, k and v must share one dtype, got q={q.dtype}, "
                        f"k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attn_func: q, k and v must be on one device, got q on {q.device}, "
                         f"k on {k.device}, v on {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attn_func: k and v must have the same shape, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attn_func: batch size mismatch, q has batch={q.shape[0]} and k/v "
                         f"batch={k.shape[0]}")
    head_dim = q.shape[3]
    if k.shape[3] != head_dim:
        raise ValueError(f"flash_attn_func: head_dim mismatch, q has head_dim={head_dim} and k/v "
                         f"head_dim={k.shape[3]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attn_func: head_dim={head_dim} is not supported; it must be a "
                         f"multiple of 8 between 8 and {MAX_HEAD_DIM}")
    nheads, nheads_k = q.shape[2], k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"flash_attn_func: nheads={nheads} (q) must be a multiple of "
                         f"nheads_k={nheads_k} (k/v)")
    if q.device.type == "cpu" and not _is_interpreted(_attn_fwd_kernel):
        raise ValueError(
            f"flash_attn_func: q, k and v are on the CPU (device={q.device}), where the Triton "
            "kernel cannot run; move them to a GPU, use the 'sdpa' attention backend, or set "
            "TRITON_INTERPRET=1 before importing flashlm to run the (slow) Triton interpreter")


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
    """Exact attention without materializing the score matrix (FlashAttention-2 interface).

    Args:
        q: (batch, seqlen_q, nheads, head_dim), fp16, bf16 or fp32.
        k, v: (batch, seqlen_k, nheads_k, head_dim), same dtype and device as ``q``;
            ``nheads`` must be a multiple of ``nheads_k`` (GQA/MQA).
        softmax_scale: scale applied to ``q @ k^T``; defaults to ``1 / sqrt(head_dim)``.
        causal: causal mask aligned to the bottom-right corner when ``seqlen_q != seqlen_k``.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out: (batch, seqlen_q, nheads, head_dim), dtype of ``q``; or ``(out, lse)`` with
        lse: (batch, nheads, seqlen_q) float32, natural log (``+inf`` for a row that sees no key).

    Differentiable in q, k and v (and through ``lse``); the backward is deterministic.
    """
    _check_inputs(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out, lse = _flash_attn_fwd_op(q, k, v, float(softmax_scale), bool(causal))
    return (out, lse) if return_lse else out
