"""A fused attention backward for Hopper GPUs, written in Gluon (non-deterministic dQ).

The portable backward (``flash_attn.py``) is deterministic: a dK/dV kernel and a separate dQ
kernel, which recomputes the scores and dP, so each (query block, key block) pair costs seven
matrix products where five are counted. This kernel does the five in one pass over each key
block and adds every pair's share of dQ into an fp32 buffer with a TMA reduce-add. The order
of those additions varies from run to run, so dQ differs in its last bits between runs: it is the
``deterministic=False`` backward.

One program owns a block of 128 keys (64 per compute warpgroup) and walks the query blocks
(64 rows each, every query head of the key head's group):

- one loader warp streams Q and dO tiles, and the rows' lse and delta, with TMA into a ring of
  shared-memory stages, guarded by "ready" barriers (bytes arrived) and an "empty" barrier
  (the compute warps are done with the stage);
- the compute warpgroups form S^T = K Q^T and dP^T = V dO^T, turn them into P^T and
  dS^T = P^T * (dP^T - delta) in registers, and accumulate dV += P^T dO and dK += dS^T Q with
  P^T and dS^T as register operands; dS^T also goes to shared memory, where both warpgroups
  read it back (transposed) for dQ = dS K, each computing half of dQ's columns;
- the dQ tile goes through shared memory and out by one TMA reduce-add, which runs while the
  next step computes (already scaled by the softmax scale); a copy afterwards casts the fp32
  sum to dq's dtype.

With a causal mask the programs of a few heads go key block by key block (``_heads_per_group``),
so the longest ones start first without the heads losing their sharing of L2.

Scope as the Gluon forward (``hopper_fwd.supports``): dense fp16/bf16, head dims 64 and 128,
equal query and key lengths that are a multiple of 128, causal or full; the dispatch takes it
where it measured faster (``FASTER``). On the H100 its backward ran at 521-534 TFLOP/s at head
dim 128, causal, 16K-128K, against 407-427 for the deterministic kernels and 512-545 for
cuDNN (NOTES.md, v13); what ptxas made of the schedule is in NOTES.md (v8, v10).
"""

import functools

import torch

from ..utils import LOG2E, sm_count
from . import hopper_fwd
from .gluon_compat import available, gluon

if gluon is not None:
    from .gluon_compat import (TensorDescriptor, fence_async_shared, gl, mbarrier, sync_warps, tma,
                               tma_add, tma_load, tma_store, warpgroup_mma, warpgroup_mma_wait)

BLOCK_M = 64    # query rows per step
BLOCK_N = 128   # keys per program (64 per compute warpgroup)
STAGES = 3      # Q / dO ring depth (3 measured 0-4% faster than 2 when causal)


# (head dim, causal) where this kernel measured faster than the deterministic pair of kernels
# on the H100 (results/attention/attention.md). Head dim 64 without a mask joined once K and V
# became register operands there (NOTES.md, v11).
FASTER = {(128, True), (128, False), (64, True), (64, False)}


if gluon is not None:

    @gluon.jit
    def _bwd_load_partition(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem,
                            do_smem, k_smem, v_smem, lse_smem, delta_smem, lse_row0, seqlen,
                            kv_bar, q_ready, do_ready, qdo_empty, q_row0, kv_row, kv_col, head0,
                            group, m_lo, n_q, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                            STAGES: gl.constexpr):
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma_load(k_desc, [kv_row, kv_col], kv_bar, k_smem)
        tma_load(v_desc, [kv_row, kv_col], kv_bar, v_smem)
        steps = n_q - m_lo
        for t in range(group * steps):
            s = t % STAGES
            # A fresh barrier counts as having completed the phase before phase 0.
            mbarrier.wait(qdo_empty.index(s), ((t // STAGES) & 1) ^ 1)
            row = q_row0 + (m_lo + t % steps) * BLOCK_M
            col = (head0 + t // steps) * HEAD_DIM
            mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes
                            + lse_desc.block_type.nbytes + delta_desc.block_type.nbytes)
            tma_load(q_desc, [row, col], q_ready.index(s), q_smem.index(s))
            blk = ((lse_row0 + (t // steps) * seqlen) // BLOCK_M + m_lo + t % steps).to(gl.int32)
            tma_load(lse_desc, [blk, 0], q_ready.index(s), lse_smem.index(s))
            tma_load(delta_desc, [blk, 0], q_ready.index(s), delta_smem.index(s))
            mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
            tma_load(do_desc, [row, col], do_ready.index(s), do_smem.index(s))

    @gluon.jit
    def _bwd_step(t, i, h, dk, dv, k_op, v_op, q_smem, do_smem, k_smem, ds_smem, q_ready,
                  do_ready, qdo_empty, dq_smem, dq_desc, lse_smem, delta_smem, q_row0, keys,
                  qk_scale, softmax_scale, st_zero, dq_zero, MASK: gl.constexpr,
                  HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, STAGES: gl.constexpr, a_layout: gl.constexpr):
        """Query block i of head h against this program's keys (ring step t): add into dK and
        dV, and add this pair's share of dQ into the fp32 buffer."""
        s = t % STAGES
        phase = (t // STAGES) & 1
        st_layout: gl.constexpr = st_zero.type.layout
        qcols = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
        mbarrier.wait(q_ready.index(s), phase)
        # The rows' lse and delta came with the Q tile (TMA into the stage); reading them here
        # keeps 32 registers per thread free that loads ahead of the wait would hold.
        col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
        lse = lse_smem.index(s).reshape([BLOCK_M]).load(col_layout) * 1.4426950408889634
        delta = delta_smem.index(s).reshape([BLOCK_M]).load(col_layout)
        st_tok = warpgroup_mma(k_op, q_smem.index(s).permute((1, 0)), st_zero, use_acc=False,
                               is_async=True)
        mbarrier.wait(do_ready.index(s), phase)
        dpt_tok = warpgroup_mma(v_op, do_smem.index(s).permute((1, 0)), st_zero,
                                use_acc=False, is_async=True)
        st = warpgroup_mma_wait(1, deps=[st_tok])
        if MASK:
            # A key after the query gets -1e30 (probability 0), without a predicate per element.
            later = gl.minimum((qcols[None, :] - keys[:, None]).to(gl.float32), 0.0)
            st = st + later * 1.0e30
        pt = gl.exp2(st * qk_scale - lse[None, :])
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok])
        ds16 = (pt * (dpt - delta[None, :])).to(q_smem.dtype)

        pt_a = gl.convert_layout(pt.to(q_smem.dtype), a_layout)
        dv_tok = warpgroup_mma(pt_a, do_smem.index(s), dv, is_async=True)
        ds_a = gl.convert_layout(ds16, a_layout)
        dk_tok = warpgroup_mma(ds_a, q_smem.index(s), dk, is_async=True)
        # dS^T to shared memory, where both warpgroups read it (transposed) for dQ = dS K. Two
        # buffers: a warpgroup that runs ahead writes the other one, and the barrier keeps it
        # from getting two steps ahead.
        ds_buf = ds_smem.index(t % 2)
        ds_buf.store(ds16)
        fence_async_shared()
        # The reduce of the previous step's dQ has finished reading dq_smem once its issuing
        # thread passes this wait; the barrier tells everyone else.
        tma.store_wait(0)
        sync_warps()
        dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_smem, dq_zero, use_acc=False,
                               is_async=True)
        dv, dk, dq, pt_a, ds_a = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok, pt_a, ds_a])
        mbarrier.arrive(qdo_empty.index(s))
        # This pair's share of dQ goes out by one TMA reduce-add; it runs while the next step
        # computes.
        dq_smem.store(dq * softmax_scale)
        fence_async_shared()
        tma_add(dq_desc, [q_row0 + i * BLOCK_M, h * HEAD_DIM], dq_smem)
        return dk, dv

    @gluon.jit
    def _bwd_compute_partition(q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar,
                               q_ready, do_ready, qdo_empty, dk_desc, dv_desc, dq_desc, lse_smem,
                               delta_smem, q_row0, kv_row, kv_col, head0, group, m_lo, n_q,
                               key0, qk_scale, softmax_scale,
                               CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               STAGES: gl.constexpr, num_warps: gl.constexpr):
        # S^T and dP^T: (keys, queries), one warpgroup per 64 keys.
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
        # dK and dV: (keys, head dim).
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
        # dQ: (queries, head dim), the two warpgroups side by side over the head dim.
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4],
            instr_shape=[16, HEAD_DIM // (num_warps // 4), 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout,
                                                     k_width=2)
        MASKED: gl.constexpr = BLOCK_N // BLOCK_M  # query blocks on the causal diagonal

        st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
        dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
        keys = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
        steps = n_q - m_lo

        mbarrier.wait(kv_bar, 0)
        if HEAD_DIM == 64:
            # Each warpgroup's 64 keys and values as register operands of S^T and dP^T (16
            # registers each at this head dim): those two products then read only Q and dO
            # from shared memory, whose bandwidth bounds this kernel (NOTES.md, v11). At head
            # dim 128 the 64 registers are not there.
            kv_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=st_layout,
                                                     k_width=2)
            k_op = k_smem.load(kv_a)
            v_op = v_smem.load(kv_a)
        else:
            k_op = k_smem
            v_op = v_smem
        for g in range(group):
            t0 = g * steps
            h = head0 + g
            first = m_lo
            if CAUSAL:
                for d in gl.static_range(MASKED):
                    dk, dv = _bwd_step(t0 + d, m_lo + d, h, dk, dv, k_op, v_op, q_smem,
                                       do_smem, k_smem, ds_smem, q_ready, do_ready, qdo_empty,
                                       dq_smem, dq_desc, lse_smem, delta_smem, q_row0, keys,
                                       qk_scale, softmax_scale, st_zero, dq_zero, True,
                                       HEAD_DIM, BLOCK_M, STAGES, a_layout)
                first = m_lo + MASKED
            for i in range(first, n_q):
                dk, dv = _bwd_step(t0 + i - m_lo, i, h, dk, dv, k_op, v_op, q_smem, do_smem,
                                   k_smem, ds_smem, q_ready, do_ready, qdo_empty, dq_smem,
                                   dq_desc, lse_smem, delta_smem, q_row0, keys, qk_scale,
                                   softmax_scale, st_zero, dq_zero, False, HEAD_DIM, BLOCK_M,
                                   STAGES, a_layout)

        # Every product that read K or V has retired in both warpgroups: their buffers stage
        # dK and dV.
        sync_warps()
        k_smem.store((dk * softmax_scale).to(k_smem.dtype))
        v_smem.store(dv.to(v_smem.dtype))
        fence_async_shared()
        tma_store(dk_desc, [kv_row, kv_col], k_smem)
        tma_store(dv_desc, [kv_row, kv_col], v_smem)
        tma.store_wait(0)

    @gluon.jit
    def _hopper_bwd_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, lse_desc,
                           delta_desc, seqlen, nheads, group, heads_per_group, qk_scale,
                           softmax_scale,
                           CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                           num_warps: gl.constexpr):
        # The programs of heads_per_group (batch, key head) pairs go key block by key block:
        # with a causal mask, block 0 sees the most queries, so each group's longest programs
        # start first (see _heads_per_group).
        pid = gl.program_id(0)
        span = heads_per_group * (seqlen // BLOCK_N)
        start_n = (pid % span) // heads_per_group
        bhk = (pid // span) * heads_per_group + pid % heads_per_group
        nheads_k = nheads // group
        b = bhk // nheads_k
        hk = bhk % nheads_k
        head0 = hk * group
        q_row0 = b * seqlen
        kv_row = b * seqlen + start_n * BLOCK_N
        kv_col = hk * HEAD_DIM
        n_q = seqlen // BLOCK_M
        if CAUSAL:
            m_lo = start_n * (BLOCK_N // BLOCK_M)
        else:
            m_lo = 0
        lse_row0 = (b * nheads + head0).to(gl.int64) * seqlen

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], dq_desc.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], lse_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M],
                                               delta_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(qdo_empty.index(i), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_bwd_compute_partition, (q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar,
                                      q_ready, do_ready, qdo_empty, dk_desc, dv_desc, dq_desc,
                                      lse_smem, delta_smem, q_row0, kv_row, kv_col, head0, group,
                                      m_lo, n_q, start_n * BLOCK_N, qk_scale,
                                      softmax_scale, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                                      num_warps)),
            (_bwd_load_partition, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem,
                                   do_smem, k_smem, v_smem, lse_smem, delta_smem, lse_row0, seqlen,
                                   kv_bar, q_ready, do_ready, qdo_empty, q_row0, kv_row,
                                   kv_col, head0, group, m_lo, n_q, HEAD_DIM, BLOCK_M, STAGES)),
        ], [1], [24])


def supports(q, k, v, out, dout, dk, dv):
    """Whether this backward can take these tensors: the Gluon forward's scope, with dout laid
    out like q and dk, dv like k and v (dq may have any layout)."""
    return hopper_fwd.supports(q, k, v, out) and hopper_fwd.supports(q, dk, dv, dout)


def _dq_desc(dq_acc, causal):
    """The fp32 dQ accumulator (batch, seqlen, heads, head_dim) as rows of heads * head_dim, in
    (BLOCK_M, head_dim) tiles, laid out in shared memory as ``_dq_layout`` says."""
    batch, seqlen, nheads, head_dim = dq_acc.shape
    return TensorDescriptor(dq_acc, [batch * seqlen, nheads * head_dim], [nheads * head_dim, 1],
                            [BLOCK_M, head_dim], _dq_layout(head_dim, causal))


@functools.lru_cache(maxsize=None)
def _dq_layout(head_dim, causal):
    """The dQ tile's shared-memory layout. With the default 128-byte swizzle, the compute
    warps' 64-bit stores of the tile conflict 2-way (each half-warp writes rows r and r ^ 1 to
    the same banks); a 32-byte swizzle has no conflict but takes 4x the TMA reduce messages, 8
    per tile at head dim 64 (NOTES.md, v13). It measured 2% faster at head dim 64 with a causal
    mask (16K to 128K), 2.5-3% slower without one and 9-14% slower at head dim 128 (16 messages)."""
    if head_dim == 64 and causal:
        return gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=32, rank=2)
    return hopper_fwd._tile_layout(BLOCK_M, head_dim, torch.float32)


def _row_desc(t):
    """A (batch, heads, seqlen) fp32 row statistic as rows of BLOCK_M, one row per TMA load."""
    n = t.numel() // BLOCK_M
    return TensorDescriptor(t, [n, BLOCK_M], [BLOCK_M, 1], [1, BLOCK_M], _row_layout())


@functools.lru_cache(maxsize=None)
def _row_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def _heads_per_group(n_bhk, n_kb, causal, sms):
    """How many of the n_bhk (batch, key head) pairs run their n_kb key-block programs
    together, key block by key block. With a causal mask, the fewest (a divisor of n_bhk) whose
    programs fill half the GPU. One pair at a time starts the last pair's longest program
    (block 0) late, and the last wave runs long (groups measured 4-6% faster at causal 4K);
    more pairs at once share less of Q, dO and dQ in L2 (all of them at once ran 1.4-1.8x
    slower; NOTES.md, v12). From 16K one pair's programs fill the GPU by themselves, and the
    order is pair by pair, as without a mask, where every program does the same work."""
    if not causal:
        return 1
    return next(g for g in range(1, n_bhk + 1)
                if n_bhk % g == 0 and (2 * g * n_kb >= sms or g == n_bhk))


def hopper_bwd(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, causal):
    """Fill dq, dk, dv (laid out like q, k, v) from ``delta`` = rowsum(dO * O) - dLSE and the
    forward's natural-log ``lse``, both (batch, heads, seqlen) fp32."""
    batch, seqlen, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    n_kb = seqlen // BLOCK_N
    n_bhk = batch * nheads_k
    heads_per_group = _heads_per_group(n_bhk, n_kb, causal, sm_count(q.device))
    grid = (n_kb * n_bhk,)
    _hopper_bwd_kernel[grid](
        hopper_fwd._desc(q, BLOCK_M), hopper_fwd._desc(k, BLOCK_N), hopper_fwd._desc(v, BLOCK_N),
        hopper_fwd._desc(dout, BLOCK_M), hopper_fwd._desc(dk, BLOCK_N),
        hopper_fwd._desc(dv, BLOCK_N), _dq_desc(dq_acc, causal), _row_desc(lse.contiguous()),
        _row_desc(delta.contiguous()),
        seqlen, nheads, nheads // nheads_k, heads_per_group, softmax_scale * LOG2E,
        softmax_scale,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES,
        num_warps=8)
    dq.copy_(dq_acc)
    return dq, dk, dv
