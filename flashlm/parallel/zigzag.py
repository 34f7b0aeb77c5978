"""The zigzag layout of a sequence over a context-parallel group.

A sequence of ``S`` tokens is cut into ``2N`` equal chunks for a group of ``N`` ranks; rank
``r`` holds chunks ``r`` and ``2N - 1 - r``, concatenated in that order. Under a causal mask the
work of a query chunk grows with its position, so pairing an early chunk with the mirrored late
one gives every rank the same work.

The ranks' shards laid end to end (rank 0's two chunks, then rank 1's, ...) form the
*rank-major* order of the sequence, which is what an all-gather produces;
`to_positions` and `to_rank_major` convert between it and the position order.
"""

import functools

import torch
import torch.distributed as dist

from flashlm.parallel.collectives import all_gather_single


def zigzag_chunks(rank, world_size):
    """The two chunk indices (of ``2 * world_size``) that ``rank`` holds, in local order."""
    return rank, 2 * world_size - 1 - rank


def rank_major_chunks(world_size):
    """Chunk indices in rank-major order: [0, 2N-1, 1, 2N-2, ...]."""
    return [c for rank in range(world_size) for c in zigzag_chunks(rank, world_size)]


def check_sequence_length(fn, seqlen, world_size):
    """Raise unless ``seqlen`` splits into ``2 * world_size`` equal chunks."""
    if seqlen % (2 * world_size) != 0:
        raise ValueError(
            f"{fn}: sequence length {seqlen} is not divisible by 2 * world_size = "
            f"{2 * world_size}; the zigzag layout cuts the sequence into 2 chunks per rank "
            "(pad the sequence to a multiple of 2 * world_size)")


def shard_of(x, rank, world_size, dim=1):
    """Rank ``rank``'s zigzag shard of the full tensor ``x`` along ``dim``, without communication
    (what `shard_sequence` returns on that rank)."""
    check_sequence_length("shard_sequence", x.shape[dim], world_size)
    chunks = x.chunk(2 * world_size, dim=dim)
    first, second = zigzag_chunks(rank, world_size)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def _permute_chunks(x, world_size, dim, order):
    """``x`` with its ``2 * world_size`` chunks along ``dim`` reordered: chunk ``i`` of the
    result is chunk ``order[i]`` of ``x``."""
    dim = dim % x.dim()
    nchunks = 2 * world_size
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
    slot = {chunk: i for i, chunk in enumerate(rank_major_chunks(world_size))}
    return _permute_chunks(x, world_size, dim, [slot[c] for c in range(2 * world_size)])


def to_rank_major(x, world_size, dim=1):
    """The inverse of `to_positions`: a sequence in position order put in rank-major order."""
    return _permute_chunks(x, world_size, dim, rank_major_chunks(world_size))


def shard_sequence(x, group, dim=1):
    """This rank's zigzag shard of a full sequence tensor.

    Args:
        x: a tensor whose dimension ``dim`` is the sequence (``S`` tokens), e.g. token ids
            (batch, S) or activations (batch, S, ...), the same on every rank of ``group``.
        group: the context-parallel process group (``N`` ranks).
        dim: the sequence dimension.

    Returns:
        The chunks ``r`` and ``2N - 1 - r`` of ``x`` along ``dim`` (``S / N`` tokens),
        concatenated, for this rank ``r``. A local operation, differentiable.

    ``S`` must be a multiple of ``2N``.
    """
    return shard_of(x, dist.get_rank(group), dist.get_world_size(group), dim)


class _Unshard(torch.autograd.Function):
    """All-gather of the shards; the backward keeps this rank's shard of the gradient (the full
    tensor is replicated, so every rank holds the same gradient of it)."""

    @staticmethod
    def forward(ctx, x_local, group, dim):
        ctx.group, ctx.dim = group, dim
        world_size = dist.get_world_size(group)
        send = x_local.movedim(dim, 0).contiguous()
        gathered = send.new_empty((world_size * send.shape[0], *send.shape[1:]))
        all_gather_single(gathered, send, group=group)
        return to_positions(gathered, world_size, dim=0).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return shard_sequence(grad, ctx.group, ctx.dim), None, None


def unshard_sequence(x_local, group, dim=1):
    """The full sequence from every rank's zigzag shard: the inverse of `shard_sequence`.

    Args:
        x_local: this rank's shard, ``S / N`` tokens along ``dim``; same shape on every rank.
        group: the context-parallel process group.
        dim: the sequence dimension.

    Returns:
        The full tensor (``S`` tokens along ``dim``, in position order), on every rank. One
        all-gather. Differentiable: the gradient of the (replicated) result is taken to be the
        same on every rank, and each rank keeps its shard of it.
    """
    return _Unshard.apply(x_local, group, dim)
