"""The zigzag layout of a sequence over a context-parallel group.

A sequence of ``S`` tokens is cut into ``2N`` equal chunks for a group of ``N`` ranks; rank
``r`` holds chunks ``r`` and ``2N - 1 - r``, concatenated in that order. Under a causal mask the
work of a query chunk grows with its position, so pairing an early chunk with the mirrored late
one gives every rank the same work.

The ranks' shards laid end to end (rank 0's two chunks, then rank 1's, ...) form the
*rank-major* order of the sequence, which is what an all-gather produces;
`to_positions` and `to_rank_major` convert between it and the position order.

Packed documents break the zigzag's balance: the work of a query is the number of keys it sees,
which restarts at every document, so a rank holding the tail of a long document does more. A
`Layout` generalizes the split: ``K`` equal chunks per rank, any of them, in position order
locally. `document_layout` cuts the sequence into ``4N``, ``8N`` or ``16N`` chunks and hands
them out by their work under the documents' causal masks, the largest first, each to the rank
with the least work so far that still has room. Every function here takes a `Layout` wherever
it takes a world size (a plain world size means the zigzag).
"""

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashlm.parallel.collectives import all_gather_single


@dataclass(frozen=True)
class Layout:
    """Which chunks of the sequence each rank holds: ``chunks[rank]`` are indices of equal
    chunks (``nchunks`` of them in all), ascending; every rank holds as many."""

    chunks: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.chunks)

    @property
    def nchunks(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def is_zigzag(self) -> bool:
        return self == zigzag_layout(self.world_size)

    def rank_major(self) -> tuple[int, ...]:
        """Chunk indices in rank-major order (the ranks' shards laid end to end)."""
        return tuple(c for rank_chunks in self.chunks for c in rank_chunks)


@functools.lru_cache(maxsize=64)
def zigzag_layout(world_size: int) -> Layout:
    """Chunks ``r`` and ``2N - 1 - r`` on rank ``r`` (the default layout)."""
    return Layout(tuple((r, 2 * world_size - 1 - r) for r in range(world_size)))


def as_layout(layout) -> Layout:
    """A `Layout` as given, or the zigzag layout of a world size."""
    return layout if isinstance(layout, Layout) else zigzag_layout(int(layout))


# A layout whose least-loaded rank has at least this share of the busiest one's work is kept;
# otherwise the sequence is cut finer (up to MAX_CHUNKS_PER_RANK chunks per rank).
BALANCE_TARGET = 0.95
MAX_CHUNKS_PER_RANK = 16


def document_layout(seqlen: int, world_size: int, cu_seqlens) -> Layout:
    """A layout that balances causal attention's work over the ranks for the packed documents
    ``cu_seqlens`` (boundary offsets ``0 ... seqlen``: a tensor or a sequence of ints; the work
    of a query is the number of keys it sees, its position in its document plus one).

    The zigzag when its balance (least work / most work) reaches ``BALANCE_TARGET``; else the
    sequence is cut into 4, 8, then 16 chunks per rank (as the length divides), each cut's
    chunks handed out largest first to the rank with the least work that has room, and the
    first cut that reaches the target is taken (the best one when none does). Finer chunks mean
    more, smaller kernel calls, so the coarsest cut that balances wins. Cached per document
    list: every rank and every user of one batch's shards gets the same layout."""
    docs = tuple(int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens))
    if len(docs) < 2 or docs[0] != 0 or docs[-1] != seqlen or any(b < a for a, b in zip(docs, docs[1:])):
        raise ValueError(f"document_layout: cu_seqlens must start at 0, never decrease and end at the sequence "
                         f"length {seqlen}, got {list(docs[:8])}{' ...' if len(docs) > 8 else ''}")
    check_sequence_length("document_layout", seqlen, zigzag_layout(world_size))
    return _document_layout(seqlen, world_size, docs)


@functools.lru_cache(maxsize=64)
def _document_layout(seqlen, world_size, docs):
    work = _token_work(seqlen, docs)
    best = zigzag_layout(world_size)
    best_balance = _balance(best, work)
    per_rank = 4
    while best_balance < BALANCE_TARGET and per_rank <= MAX_CHUNKS_PER_RANK:
        if seqlen % (per_rank * world_size) == 0:
            layout = _greedy_layout(work, world_size, per_rank)
            balance = _balance(layout, work)
            if balance > best_balance:
                best, best_balance = layout, balance
        per_rank *= 2
    return best


def _token_work(seqlen, docs):
    """Keys each query sees under a causal mask within its document: (seqlen,) int64."""
    bounds = torch.tensor(docs, dtype=torch.int64)
    starts = torch.repeat_interleave(bounds[:-1], bounds[1:] - bounds[:-1])
    return torch.arange(seqlen, dtype=torch.int64) - starts + 1


def _greedy_layout(work, world_size, per_rank):
    chunk_work = work.view(world_size * per_rank, -1).sum(1).tolist()
    loads, held = [0] * world_size, [[] for _ in range(world_size)]
    for chunk in sorted(range(len(chunk_work)), key=lambda c: (-chunk_work[c], c)):
        rank = min((r for r in range(world_size) if len(held[r]) < per_rank), key=lambda r: (loads[r], r))
        held[rank].append(chunk)
        loads[rank] += chunk_work[chunk]
    return Layout(tuple(tuple(sorted(h)) for h in held))


def _rank_work(layout, work):
    chunk_work = work.view(layout.nchunks, -1).sum(1).tolist()
    return [sum(chunk_work[c] for c in rank_chunks) for rank_chunks in layout.chunks]


def _balance(layout, work):
    loads = _rank_work(layout, work)
    return min(loads) / max(max(loads), 1)


def layout_work(layout, seqlen: int, docs: tuple[int, ...]) -> list[int]:
    """Causal attention work (visible query-key pairs) of each rank under ``layout`` (a
    `Layout` or a world size) for the documents ``docs``."""
    return _rank_work(as_layout(layout), _token_work(seqlen, docs))


def check_sequence_length(fn, seqlen, world_size):
    """Raise unless ``seqlen`` splits into the layout's equal chunks."""
    layout = as_layout(world_size)
    if seqlen % layout.nchunks == 0:
        return
    if layout.is_zigzag:
        raise ValueError(
            f"{fn}: sequence length {seqlen} is not divisible by 2 * world_size = "
            f"{layout.nchunks}; the zigzag layout cuts the sequence into 2 chunks per rank "
            f"(pad the sequence to a multiple of {layout.nchunks})")
    raise ValueError(
        f"{fn}: sequence length {seqlen} is not divisible by the layout's {layout.nchunks} chunks "
        f"({layout.nchunks // layout.world_size} per rank for {layout.world_size} ranks)")


def shard_of(x, rank, world_size, dim=1):
    """Rank ``rank``'s shard of the full tensor ``x`` along ``dim`` under ``world_size``'s layout
    (a `Layout`, or a world size: the zigzag), without communication (what `shard_sequence`
    returns on that rank)."""
    layout = as_layout(world_size)
    check_sequence_length("shard_sequence", x.shape[dim], layout)
    chunks = x.chunk(layout.nchunks, dim=dim)
    return torch.cat([chunks[c] for c in layout.chunks[rank]], dim=dim)


def _permute_chunks(x, world_size, dim, order):
    """``x`` with its layout's chunks along ``dim`` reordered: chunk ``i`` of the result is
    chunk ``order[i]`` of ``x``."""
    dim = dim % x.dim()
    nchunks = as_layout(world_size).nchunks
    shape = x.shape
    x = x.reshape(*shape[:dim], nchunks, shape[dim] // nchunks, *shape[dim + 1:])
    return x.index_select(dim, _index(tuple(order), x.device)).reshape(shape)


@functools.lru_cache(maxsize=256)
def _index(order, device):
    """An index tensor made once per device (a host-to-device copy per call would make the host
    wait for the GPU)."""
    return torch.tensor(order, device=device)


def to_positions(x, world_size, dim=1):
    """A sequence in rank-major order along ``dim`` (the shards of all ranks concatenated, as
    an all-gather leaves them) put in position order (one copy)."""
    layout = as_layout(world_size)
    slot = {chunk: i for i, chunk in enumerate(layout.rank_major())}
    return _permute_chunks(x, layout, dim, [slot[c] for c in range(layout.nchunks)])


def to_rank_major(x, world_size, dim=1):
    """The inverse of `to_positions`: a sequence in position order put in rank-major order."""
    return _permute_chunks(x, world_size, dim, as_layout(world_size).rank_major())


def shard_sequence(x, group, dim=1, layout=None):
    """This rank's zigzag shard of a full sequence tensor.

    Args:
        x: a tensor whose dimension ``dim`` is the sequence (``S`` tokens), e.g. token ids
            (batch, S) or activations (batch, S, ...), the same on every rank of ``group``.
        group: the context-parallel process group (``N`` ranks).
        dim: the sequence dimension.
        layout: a `Layout` of ``N`` ranks (`document_layout` for packed documents); default
            the zigzag. `context_parallel_attention` and `unshard_sequence` must get the same.

    Returns:
        The chunks ``r`` and ``2N - 1 - r`` of ``x`` along ``dim`` (``S / N`` tokens),
        concatenated, for this rank ``r`` (the layout's chunks of this rank, in position
        order). A local operation, differentiable.

    ``S`` must be a multiple of ``2N`` (of the layout's chunk count).
    """
    world_size = dist.get_world_size(group)
    return shard_of(x, dist.get_rank(group), check_layout("shard_sequence", layout, world_size), dim)


def check_layout(fn, layout, world_size):
    """``layout`` checked against the group's size; None means the zigzag."""
    if layout is None:
        return zigzag_layout(world_size)
    if not isinstance(layout, Layout) or layout.world_size != world_size:
        raise ValueError(f"{fn}: layout must be a zigzag.Layout of world_size={world_size} ranks, got {layout!r}")
    return layout


class _Unshard(torch.autograd.Function):
    """All-gather of the shards; the backward keeps this rank's shard of the gradient (the full
    tensor is replicated, so every rank holds the same gradient of it)."""

    @staticmethod
    def forward(ctx, x_local, group, dim, layout):
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        world_size = dist.get_world_size(group)
        send = x_local.movedim(dim, 0).contiguous()
        gathered = send.new_empty((world_size * send.shape[0], *send.shape[1:]))
        all_gather_single(gathered, send, group=group)
        return to_positions(gathered, layout, dim=0).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return shard_sequence(grad, ctx.group, ctx.dim, ctx.layout), None, None, None


def unshard_sequence(x_local, group, dim=1, layout=None):
    """The full sequence from every rank's zigzag shard: the inverse of `shard_sequence`.

    Args:
        x_local: this rank's shard, ``S / N`` tokens along ``dim``; same shape on every rank.
        group: the context-parallel process group.
        dim: the sequence dimension.
        layout: the `Layout` the shards were made with (default: the zigzag).

    Returns:
        The full tensor (``S`` tokens along ``dim``, in position order), on every rank. One
        all-gather. Differentiable: the gradient of the (replicated) result is taken to be the
        same on every rank, and each rank keeps its shard of it.
    """
    return _Unshard.apply(x_local, group, dim, check_layout("unshard_sequence", layout, dist.get_world_size(group)))
