"""Context-parallel attention: one sequence split over the ranks of a process group, each rank
running flashlm's kernel on its share (docs/context_parallel.md).

Three methods, one module each: ``ring`` (K/V shards travel around the group, partial results
merge through their log-sum-exp), ``allgather`` (Llama 3 style: K/V all-gathered, dK/dV
reduce-scattered) and ``ulysses`` (all-to-all from sequence shards to head shards and back).
All use the layouts of `zigzag` (the zigzag by default; ring and allgather also take a
`zigzag.document_layout`, which balances packed documents), the mask planning of `schedule`,
and overlap their communication with the kernel through ``async_op`` handles. This module
checks the arguments, plans, and dispatches.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashlm.parallel import schedule as sch
from flashlm.parallel.allgather import AllGatherAttention
from flashlm.parallel.block_attention import check_arguments
from flashlm.parallel.ring import RingAttention
from flashlm.parallel.ulysses import UlyssesAttention
from flashlm.parallel.zigzag import Layout, check_layout, check_sequence_length

IMPLS = ("ring", "allgather", "ulysses")


def _check_cu_seqlens(fn, cu_seqlens, batch, seqlen):
    if batch != 1:
        raise ValueError(f"{fn}: cu_seqlens describes one packed sequence, so batch must be 1, "
                         f"got batch={batch}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: cu_seqlens must be a 1-D int32 tensor of document offsets")
    docs = tuple(int(c) for c in cu_seqlens.tolist())
    if len(docs) < 2 or docs[0] != 0 or docs[-1] != seqlen or any(
            b < a for a, b in zip(docs, docs[1:])):
        raise ValueError(f"{fn}: cu_seqlens must start at 0, never decrease and end at the full "
                         f"sequence length {seqlen} (local length x world size), got "
                         f"{list(docs[:8])}{' ...' if len(docs) > 8 else ''}")
    return docs


def _head_chunks(fn, impl, head_chunks, nheads, nheads_k, world):
    """The number of head groups the collectives are pipelined over: ``head_chunks``, or the
    largest of 2 and 1 that divides the heads each stage needs."""
    if impl == "ring":
        if head_chunks not in (None, 1):
            raise ValueError(f"{fn}: head_chunks={head_chunks} applies to impl='allgather' and "
                             "'ulysses' only (the ring overlaps by steps)")
        return 1
    if impl == "allgather":
        need = [("heads_k", nheads_k)]
    else:
        need = [("heads / world_size", nheads // world)]
        if nheads_k >= world:
            need.append(("heads_k / world_size", nheads_k // world))
    if head_chunks is None:
        return 2 if all(n % 2 == 0 for _, n in need) else 1
    if head_chunks < 1 or any(n % head_chunks for _, n in need):
        raise ValueError(f"{fn}: head_chunks={head_chunks} must be >= 1 and divide "
                         + ", ".join(f"{name}={n}" for name, n in need))
    return head_chunks


@dataclass(frozen=True)
class Options:
    """Checked and normalized options: the kernel's ``window`` and ``scale``, the full
    ``seqlen``, document offsets ``docs``, the mask band ``(lo, hi)`` (`schedule.band`) and the
    pipeline depth ``chunks`` and the shards' ``layout``."""

    seqlen: int
    window: tuple[int, int]
    scale: float
    docs: tuple[int, ...]
    lo: int | None
    hi: int | None
    chunks: int
    layout: Layout


def resolve_options(fn, impl, q, k, v, world, seqlen, causal, window_size, softmax_scale,
                    cu_seqlens, head_chunks, layout=None):
    """Check the arguments of `context_parallel_attention` (``q``, ``k``, ``v`` are this rank's
    shards or, for a simulation, the full tensors; ``seqlen`` is the full length) and return
    them as `Options`; errors name the bad argument."""
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl={impl!r} is not one of {IMPLS}")
    window, scale = check_arguments(fn, q, k, v, window_size, softmax_scale)
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"{fn}: q and k/v must hold the same batch and tokens, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    layout = check_layout(fn, layout, world)
    if impl == "ulysses" and not layout.is_zigzag:
        raise ValueError(f"{fn}: impl='ulysses' keeps every rank's work equal by heads; it takes the "
                         "zigzag layout only (layout=None)")
    check_sequence_length(fn, seqlen, layout)
    nheads, nheads_k = q.shape[2], k.shape[2]
    if impl == "ulysses":
        if nheads % world:
            raise ValueError(f"{fn}: impl='ulysses' splits the heads over the group: heads="
                             f"{nheads} must be divisible by world_size={world}")
        if nheads_k % world and world % nheads_k:
            raise ValueError(f"{fn}: impl='ulysses' needs heads_k={nheads_k} to divide or be "
                             f"divisible by world_size={world}")
    chunks = _head_chunks(fn, impl, head_chunks, nheads, nheads_k, world)
    docs = sch.documents(None if cu_seqlens is None else
                         _check_cu_seqlens(fn, cu_seqlens, q.shape[0], seqlen), seqlen)
    lo, hi = sch.band(causal, window)
    return Options(seqlen=seqlen, window=window, scale=scale, docs=docs, lo=lo, hi=hi,
                   chunks=chunks, layout=layout)


def context_parallel_attention(q, k, v, group, impl="ring", causal=True, window_size=(-1, -1),
                               softmax_scale=None, cu_seqlens=None, return_lse=False,
                               deterministic=True, head_chunks=None, layout=None):
    """Attention over a sequence split across the ranks of ``group`` (context parallelism).

    Every rank of ``group`` calls this with its shards (`shard_sequence`, with the same
    ``layout``) and the same options; the result equals `flash_attn_func` (or
    `flash_attn_varlen_func`) on the full sequence, restricted to this rank's shard.

    Args:
        q: (batch, S / N, heads, head_dim) this rank's queries, in `flash_attn_func`'s layout.
        k, v: (batch, S / N, heads_k, head_dim); ``heads`` a multiple of ``heads_k`` (GQA).
        group: the context-parallel process group (``N`` ranks).
        impl: "ring", "allgather" or "ulysses" (docs/context_parallel.md says which to pick).
        causal, window_size, softmax_scale: as in `flash_attn_func`, on full-sequence positions.
        cu_seqlens: (num_docs + 1,) int offsets of packed documents over the *full* sequence
            (batch must be 1); documents may cross chunk and rank boundaries. The offsets are
            read on the host to plan the kernel calls: a CPU tensor avoids a device sync.
        return_lse: also return the log-sum-exp (batch, heads, S / N), fp32.
        deterministic: as in `flash_attn_func`; the methods' own reductions always run in a
            fixed order.
        head_chunks: allgather and ulysses only: how many head groups the collectives are
            pipelined over (the next group's communication runs during this group's kernel);
            defaults to 2 where the heads divide, else 1.
        layout: ring and allgather: the `zigzag.Layout` the shards were made with
            (`shard_sequence`'s); default the zigzag. `zigzag.document_layout` balances packed
            documents.

    Returns:
        out (batch, S / N, heads, head_dim), or ``(out, lse)``; differentiable in q, k, v.

    Raises ValueError for ``S`` not divisible by ``2N`` (local length odd), for Ulysses when
    ``heads`` is not divisible by ``N`` or ``heads_k`` neither divides nor is divided by ``N``.
    """
    fn = "context_parallel_attention"
    world = dist.get_world_size(group)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # kernel layout
    opts = resolve_options(fn, impl, q, k, v, world, q.shape[1] * world, causal, window_size,
                           softmax_scale, cu_seqlens, head_chunks, layout)
    deterministic = bool(deterministic)
    if impl in REPLAYABLE:
        function, args = _planned(impl, group, opts, deterministic)
        out, lse = function.apply(q, k, v, *args)
    else:
        block = sch.whole_sequence_block(opts.seqlen, opts.docs, causal, opts.window)
        out, lse = UlyssesAttention.apply(q, k, v, group, block, opts.scale, deterministic,
                                          opts.chunks)
    return (out, lse) if return_lse else out


# The methods whose backward needs only the inputs, the (merged) output and lse, and the plan:
# their forward can be replayed from a kept output (``replay_context_parallel_attention``).
# Ulysses keeps head-sharded copies made by its all-to-alls, so it runs its forward again.
REPLAYABLE = ("ring", "allgather")


def _planned(impl, group, opts, deterministic):
    """(autograd Function, its arguments after q, k, v) for ``impl`` on this rank."""
    rank = dist.get_rank(group)
    if impl == "ring":
        steps = sch.ring_schedule(opts.layout, opts.seqlen, opts.docs, opts.lo, opts.hi)[rank]
        return RingAttention, (group, steps, opts.scale, deterministic)
    blocks = sch.allgather_schedule(opts.layout, opts.seqlen, opts.docs, opts.lo, opts.hi)[rank]
    return AllGatherAttention, (group, blocks, opts.scale, deterministic, opts.chunks, opts.layout)


class _Replayed(torch.autograd.Function):
    """A ring or allgather attention whose forward already ran: returns the kept output, and
    differentiates it with the method's own backward (fed the same saved state its forward
    would have kept)."""

    @staticmethod
    def forward(ctx, q, k, v, kept, plan):
        out, lse = kept
        function, args = plan
        ctx.function, ctx.args = function, args
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        function, args = ctx.function, ctx.args
        state = _SavedState(ctx.saved_tensors, function, args)
        dq, dk, dv = function.backward(state, dout, None)[:3]
        return dq, dk, dv, None, None


class _SavedState:
    """What ``RingAttention``/``AllGatherAttention`` keep on their ctx in the forward, rebuilt
    from the kept output, for their backward."""

    def __init__(self, saved, function, args):
        self.saved_tensors = saved
        if function is RingAttention:
            self.group, self.steps, self.scale, self.deterministic = args
        else:
            self.group, self.blocks, self.scale, self.deterministic, self.chunks, self.layout = args


def replay_context_parallel_attention(q, k, v, out, lse, group, impl="ring", causal=True, window_size=(-1, -1),
                                      softmax_scale=None, cu_seqlens=None, deterministic=True, head_chunks=None,
                                      layout=None):
    """`context_parallel_attention` (ring or allgather) whose forward already ran: ``out`` and
    ``lse`` are what it returned (``return_lse=True``) for the same shards and options. Returns
    ``out`` on the autograd graph of q, k, v, with the method's usual backward: activation
    checkpointing replays attention this way instead of running its forward (and its
    communication) again. Nothing checks that ``out`` came from these inputs."""
    fn = "replay_context_parallel_attention"
    if impl not in REPLAYABLE:
        raise ValueError(f"{fn}: impl={impl!r} cannot replay a kept output; one of {REPLAYABLE} can")
    world = dist.get_world_size(group)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    opts = resolve_options(fn, impl, q, k, v, world, q.shape[1] * world, causal, window_size,
                           softmax_scale, cu_seqlens, head_chunks, layout)
    return _Replayed.apply(q, k, v, (out, lse), _planned(impl, group, opts, bool(deterministic)))
