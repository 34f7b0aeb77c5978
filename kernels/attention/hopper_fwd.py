"""The attention forward for Hopper GPUs, written in Gluon (Triton's warp-level dialect).

Plain Triton schedules each ``wgmma`` wait itself: a block's P @ V is never in flight while
the next block's softmax runs (NOTES.md, v6). This kernel states the schedule itself:

- one loader warp streams K and V tiles with TMA into a ring of shared-memory stages, and a
  second warp tells the compute warps when each tile has landed;
- two compute warpgroups (8 warps, 64 query rows each) take turns on the tensor cores
  (FlashAttention-3's ping-pong): warpgroup 0 issues the scores of key block j and P @ V of
  block j-1, hands the turn to warpgroup 1 and runs its softmax while warpgroup 1's products
  run, and so on. P goes to the second product from registers, never through shared memory;
- with a causal mask up to 8K tokens, each program takes two mirrored query tiles (a heavy
  one and a light one, the same total work for every program); the second tile's first key
  blocks stream in while the first tile finishes, instead of a new program starting cold.

The warpgroups and the loader synchronize through named hardware barriers (``bar.sync`` /
``bar.arrive`` in inline assembly), not through Gluon's mbarrier waits and arrives: for those,
Triton adds a barrier over all 256 compute threads, once per step, which kept the two
warpgroups in lockstep (NOTES.md, v9). Only the signalling warp waits on the TMA mbarriers;
it then tells each warpgroup that the stage has landed. It is a warp of its own because the
loader blocks on each stage's release: when one warp did both, block j+1's signal waited for
the release of block j-1 by the other warpgroup, and the tensor cores idled each step
(NOTES.md, v11). Named barriers used here: 2-9 (stage ready, one per warpgroup), 10-13 (stage
free again), 14-15 (whose turn it is); Triton's warp specialization uses 0 and 1.

Runs on triton 3.6 (measured on the H100) and compiles for sm_90 with the newest triton, where
the TMA copies were renamed (``gluon_compat.py`` holds the names for both;
``tests/test_attention.py`` compiles it on the CPU and reads the SASS).

Scope: dense (batch, seqlen, heads, head_dim) fp16/bf16 tensors on compute capability 9.x,
head dims 64 and 128, seqlen_q == seqlen_k a multiple of the 128-row block, causal or full
attention without a sliding window. Everything else takes the portable kernel in
``flash_attn.py``; both write the same ``out`` and natural-log ``lse`` (batch, heads, seqlen),
so the backward is shared.
"""

import functools

import torch

from ..utils import LOG2E
from .gluon_compat import available, gluon

if gluon is not None:
    from .gluon_compat import (TensorDescriptor, fence_async_shared, gl, mbarrier, sync_warps, tma,
                               tma_load, tma_store, warpgroup_mma, warpgroup_mma_wait)

BLOCK_M = 128
BLOCK_N = 128


if gluon is not None:

    def _asm(op, count, who, fence=False):
        """PTX for ``op`` (bar.sync or bar.arrive) with ``count`` threads on named barrier $1:
        that barrier ("fixed"), $1 + the calling thread's warpgroup ("own"), $1 + the other
        warpgroup ("other"), or $1 from warpgroup 1 or 0 only ("wg1", "wg0")."""
        wg = "mov.u32 t, %tid.x; shr.u32 t, t, 7; "
        body = {"fixed": f"{op} $1, {count};",
                "own": f"{wg}add.u32 t, t, $1; {op} t, {count};",
                "other": f"{wg}xor.b32 t, t, 1; add.u32 t, t, $1; {op} t, {count};",
                "wg1": f"{wg}setp.eq.u32 p, t, 1; @p {op} $1, {count};",
                "wg0": f"{wg}setp.eq.u32 p, t, 0; @p {op} $1, {count};"}[who]
        if fence:
            # Wrapped in a loop that never repeats (barrier ids stay below 16): ptxas does not
            # move instructions across it. Without it ptxas issued the next step's scores
            # during this step's softmax, two score tiles were live, and 200 bytes spilled.
            body = f"retry: {body} setp.eq.u32 p, $1, 99; @p bra.uni retry;"
        return gl.constexpr("{ .reg .u32 t; .reg .pred p; " + body + " mov.b32 $0, 0; }")

    _LOAD_READY = _asm("bar.arrive", 160, "fixed")
    _LOAD_RELEASED = _asm("bar.sync", 288, "fixed")
    _WAIT_READY = _asm("bar.sync", 160, "own", fence=True)
    _RELEASE_STAGE = _asm("bar.arrive", 288, "fixed")
    _WAIT_TURN = _asm("bar.sync", 256, "own")
    _GIVE_TURN = _asm("bar.arrive", 256, "other")
    _FIRST_TURN = _asm("bar.arrive", 256, "wg1")
    _LAST_TURN = _asm("bar.sync", 256, "wg0")
    _READY = gl.constexpr(2)     # 2 + 2 s + w: stage s has landed, for warpgroup w
    _RELEASE = gl.constexpr(10)  # 10 + s: both warpgroups are done with stage s
    _TURN = gl.constexpr(14)     # 14 + w: warpgroup w may issue its products

    @gluon.jit
    def _bar(base, NTHREADS: gl.constexpr, ASM: gl.constexpr):
        """Run ASM (a named-barrier operation on barrier ``base``) once in each of the
        NTHREADS threads of the partition. Inline assembly, so Triton adds no CTA barrier."""
        ids = gl.full([NTHREADS], 0, gl.int32,
                      gl.BlockedLayout([1], [32], [NTHREADS // 32], [0])) + base
        gl.inline_asm_elementwise(ASM, "=r,r", [ids], gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_row, kv_col, g0, k_lo, k_hi,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Key blocks k_lo..k_hi-1 of a tile whose first block is ring step g0: each into its
        stage once both warpgroups have released the block STAGES ring steps before it."""
        nbytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
        for k in range(k_lo, k_hi):
            g = g0 + k
            sk = g % STAGES
            if g >= STAGES:
                _bar(_RELEASE + sk, 32, _LOAD_RELEASED)
            mbarrier.expect(kv_ready.index(sk), nbytes)
            tma_load(k_desc, [kv_row + k * BLOCK_N, kv_col], kv_ready.index(sk), k_smem.index(sk))
            tma_load(v_desc, [kv_row + k * BLOCK_N, kv_col], kv_ready.index(sk), v_smem.index(sk))

    @gluon.jit
    def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_free, kv_ready,
                        q_row_a, q_row_b, kv_row, q_col, kv_col, n_a, n_b,
                        BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Issue the TMA loads: tile a's Q and key blocks, then tile b's (n_b == 0: none). Tile
        b's first key blocks stream in while tile a finishes; its Q waits until tile a's
        output, staged in Q's buffer, has left."""
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [q_row_a, q_col], q_bar, q_smem)
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_row, kv_col, 0, 0, n_a,
                 BLOCK_N, STAGES)
        if n_b > 0:
            ahead = gl.minimum(n_b, STAGES)
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_row, kv_col, n_a, 0, ahead,
                     BLOCK_N, STAGES)
            mbarrier.wait(q_free, 0)
            mbarrier.expect(q_bar, q_desc.block_type.nbytes)
            tma_load(q_desc, [q_row_b, q_col], q_bar, q_smem)
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_row, kv_col, n_a, ahead, n_b,
                     BLOCK_N, STAGES)
        # Take the releases not waited for above, so that every named barrier ends balanced.
        total = n_a + n_b
        for g in range(gl.maximum(total - STAGES, 0), total):
            _bar(_RELEASE + g % STAGES, 32, _LOAD_RELEASED)

    @gluon.jit
    def _signal_partition(kv_ready, n_blocks, STAGES: gl.constexpr):
        """Tell both warpgroups, on their named barriers, when each key block has landed. A warp
        of its own, so that no wait for a stage's release delays the next block's signal."""
        for j in range(n_blocks):
            s = j % STAGES
            mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
            _bar(_READY + 2 * s, 32, _LOAD_READY)
            _bar(_READY + 2 * s + 1, 32, _LOAD_READY)

    @gluon.jit
    def _softmax(s, m_i, l_i, qk_scale, diag, p_layout: gl.constexpr, dtype: gl.constexpr):
        """One online-softmax step in the log2 domain: P (as the P @ V register operand), the
        factor that rescales the running output, and the new row max and sum. ``diag`` masks
        the keys above the causal diagonal (query and key blocks start at the same row)."""
        rows = gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, s.type.layout))
        cols = gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        if diag:
            # -1e30 above the diagonal, 0 on and below, without a predicate per element (64
            # live predicates per thread cost the registers the wgmma pipeline needs).
            above = gl.minimum((rows[:, None] - cols[None, :]).to(gl.float32), 0.0)
            s = s + above * 1.0e30
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i

    @gluon.jit
    def _step(j, p, acc, m_i, l_i, q_smem, k_smem, v_smem, s_zero,
              qk_scale, diag, STAGES: gl.constexpr, p_layout: gl.constexpr,
              row_o: gl.constexpr):
        """Scores of block j, P @ V of block j-1 (P given) and the softmax of block j. The two
        products are issued in this warpgroup's turn; its softmax then runs while the other
        warpgroup's products are on the tensor cores."""
        s = j % STAGES
        sp = (j - 1) % STAGES
        _bar(_READY + 2 * s, 256, _WAIT_READY)
        _bar(_TURN, 256, _WAIT_TURN)
        s_tok = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        acc_tok = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
        _bar(_TURN, 256, _GIVE_TURN)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        p_new, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, diag, p_layout, q_smem.dtype)
        acc, p = warpgroup_mma_wait(0, deps=[acc_tok, p])
        _bar(_RELEASE + sp, 256, _RELEASE_STAGE)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        return p_new, acc, m_i, l_i

    @gluon.jit
    def _attend_tile(q_smem, k_smem, v_smem, q_bar, q_phase, g0, o_desc, lse_ptr, q_row, q_col,
                     lse_off, n_blocks, qk_scale,
                     CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        """One 128-row query tile, its key blocks at ring steps g0, g0 + 1, ..."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

        _bar(_TURN, 256, _FIRST_TURN)  # warpgroup 0 issues first
        mbarrier.wait(q_bar, q_phase)
        _bar(_READY + 2 * (g0 % STAGES), 256, _WAIT_READY)
        _bar(_TURN, 256, _WAIT_TURN)
        s_tok = warpgroup_mma(q_smem, k_smem.index(g0 % STAGES).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
        _bar(_TURN, 256, _GIVE_TURN)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, CAUSAL and n_blocks == 1, p_layout,
                                      dtype)
        # The last block may straddle the causal diagonal. No branch may sit between issuing
        # a product and waiting for it (ptxas waits at every block boundary), so the masked
        # last step is peeled rather than chosen at run time inside the loop. Steps go in
        # pairs (two register sets for P; NOTES.md, v7).
        for i in range((n_blocks - 2) // 2):
            j = 1 + 2 * i
            p, acc, m_i, l_i = _step(g0 + j, p, acc, m_i, l_i, q_smem, k_smem, v_smem, s_zero,
                                     qk_scale, False, STAGES, p_layout, row_o)
            p, acc, m_i, l_i = _step(g0 + j + 1, p, acc, m_i, l_i, q_smem, k_smem, v_smem,
                                     s_zero, qk_scale, False, STAGES, p_layout, row_o)
        if n_blocks % 2 == 1 and n_blocks > 1:  # an odd number of unmasked steps
            p, acc, m_i, l_i = _step(g0 + n_blocks - 2, p, acc, m_i, l_i, q_smem, k_smem, v_smem,
                                     s_zero, qk_scale, False, STAGES, p_layout, row_o)
        if n_blocks > 1:
            p, acc, m_i, l_i = _step(g0 + n_blocks - 1, p, acc, m_i, l_i, q_smem, k_smem, v_smem,
                                     s_zero, qk_scale, CAUSAL, STAGES, p_layout, row_o)

        st = (g0 + n_blocks - 1) % STAGES
        _bar(_TURN, 256, _WAIT_TURN)
        acc_tok = warpgroup_mma(p, v_smem.index(st), acc, is_async=True)
        _bar(_TURN, 256, _GIVE_TURN)
        acc, p = warpgroup_mma_wait(0, deps=[acc_tok, p])
        _bar(_RELEASE + st, 256, _RELEASE_STAGE)
        _bar(_TURN, 256, _LAST_TURN)  # balance warpgroup 1's last turn signal

        acc = acc / gl.convert_layout(l_i, row_o)[:, None]
        # Both warpgroups are past every product that read Q: its buffer stages the output.
        sync_warps()
        q_smem.store(acc.to(dtype))
        fence_async_shared()
        tma_store(o_desc, [q_row, q_col], q_smem)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # log2 -> natural log: times ln 2
        gl.store(lse_ptr + lse_off + gl.arange(0, BLOCK_M, layout=row_s), lse)
        tma.store_wait(0)

    @gluon.jit
    def _compute_partition(q_smem, k_smem, v_smem, q_bar, q_free, o_desc, lse_ptr, q_row_a,
                           q_row_b, q_col, lse_off_a, lse_off_b, n_a, n_b, qk_scale,
                           CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        _attend_tile(q_smem, k_smem, v_smem, q_bar, 0, 0, o_desc, lse_ptr, q_row_a, q_col,
                     lse_off_a, n_a, qk_scale, CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                     num_warps)
        if n_b > 0:
            # Tile a's output has left Q's buffer (its TMA store was waited for): the loader
            # may bring tile b's Q.
            mbarrier.arrive(q_free)
            _attend_tile(q_smem, k_smem, v_smem, q_bar, 1, n_a, o_desc, lse_ptr, q_row_b, q_col,
                         lse_off_b, n_b, qk_scale, CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                         num_warps)

    @gluon.jit
    def _hopper_fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, seqlen, nheads, group,
                           qk_scale, CAUSAL: gl.constexpr, PAIRED: gl.constexpr,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, num_warps: gl.constexpr):
        n_m = seqlen // BLOCK_M
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // nheads
        h = bh % nheads
        kv_row = b * seqlen
        q_col = h * HEAD_DIM
        kv_col = (h // group) * HEAD_DIM
        if PAIRED:
            # Two causal query tiles per program, a heavy one and its light mirror: every
            # program does n_m + 1 key blocks (the middle tile alone when n_m is odd).
            m_a = n_m - 1 - pid
            m_b = pid
            if m_b < m_a:
                n_b = (m_b + 1) * BLOCK_M // BLOCK_N
            else:
                n_b = 0
        else:
            m_a = n_m - 1 - pid  # heaviest causal tiles first
            m_b = m_a
            n_b = 0
        if CAUSAL:
            n_a = (m_a + 1) * BLOCK_M // BLOCK_N
        else:
            n_a = seqlen // BLOCK_N
        q_row_a = b * seqlen + m_a * BLOCK_M
        q_row_b = b * seqlen + m_b * BLOCK_M
        lse_off_a = bh.to(gl.int64) * seqlen + m_a * BLOCK_M
        lse_off_b = bh.to(gl.int64) * seqlen + m_b * BLOCK_M

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_free, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_compute_partition, (q_smem, k_smem, v_smem, q_bar, q_free, o_desc, lse_ptr,
                                  q_row_a, q_row_b, q_col, lse_off_a, lse_off_b, n_a, n_b,
                                  qk_scale, CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                  num_warps)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_free,
                               kv_ready, q_row_a, q_row_b, kv_row, q_col, kv_col, n_a, n_b,
                               BLOCK_N, STAGES)),
            (_signal_partition, (kv_ready, n_a + n_b, STAGES)),
        ], [1, 1], [24, 24])


STAGES = {64: 4, 128: 3}  # K and V ring depth: what fits in 227 KB beside the Q tile
# Causal lengths up to this run two mirrored query tiles per program (NOTES.md, v11): +1-4%
# from 2K to 8K on the H100; at 16K the halved grid's last wave cost 1-2%.
PAIRED_MAX_SEQLEN = 8192
# Where this kernel beat the portable Triton forward on the H100: at head dim 128 since v7; at
# head dim 64 since the signalling warp (NOTES.md, v11: 1-8% faster, it was 6-13% slower).
DEFAULT_HEAD_DIMS = (64, 128)


def supports(q, k, v, out):
    """Whether the Gluon forward can take these dense (batch, seqlen, heads, head_dim) tensors
    (see the module docstring for the scope); the caller checks the mask."""
    if gluon is None or not q.is_cuda or not _is_hopper(q.device.index):
        return False
    if q.dim() != 4 or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in STAGES:
        return False
    batch, seqlen, nheads, head_dim = q.shape
    if k.shape[1] != seqlen or seqlen % BLOCK_M or nheads % k.shape[2]:
        return False
    for t in (q, k, v, out):
        # Rows (batch * seqlen) of width heads * head_dim must be one strided 2-D matrix.
        if t.stride(3) != 1 or t.stride(2) != head_dim or t.stride(0) != seqlen * t.stride(1):
            return False
        if t.data_ptr() % 16 or (t.stride(1) * t.element_size()) % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _is_hopper(index):
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.lru_cache(maxsize=None)
def _tile_layout(rows, cols, dtype):
    """The shared-memory layout of a (rows, cols) tile of a torch dtype. Building one costs
    about as much host time as the tensor descriptor that carries it, and every launch needs
    four to nine of them; layouts are immutable, so each is built once."""
    gl_dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
                torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)


def _desc(t, rows):
    batch, seqlen, nheads, head_dim = t.shape
    return TensorDescriptor(t, [batch * seqlen, nheads * head_dim], [t.stride(1), 1],
                            [rows, head_dim], _tile_layout(rows, head_dim, t.dtype))


def hopper_fwd(q, k, v, out, lse, softmax_scale, causal):
    """Fill ``out`` (like q, contiguous) and ``lse`` (batch, heads, seqlen) fp32."""
    batch, seqlen, nheads, head_dim = q.shape
    n_m = seqlen // BLOCK_M
    paired = causal and seqlen <= PAIRED_MAX_SEQLEN
    grid = ((n_m + 1) // 2 if paired else n_m, batch * nheads)
    _hopper_fwd_kernel[grid](
        _desc(q, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), _desc(out, BLOCK_M), lse,
        seqlen, nheads, nheads // k.shape[2], softmax_scale * LOG2E,
        CAUSAL=causal, PAIRED=paired, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        STAGES=STAGES[head_dim], num_warps=8)
    return out, lse
