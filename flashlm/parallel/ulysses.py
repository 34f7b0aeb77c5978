"""Ulysses attention (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards.

Rank ``n`` receives, from every rank, its rows of query heads ``[n H / N, (n + 1) H / N)`` and
of the K/V heads those read, so it holds the whole sequence for ``H / N`` heads; one copy puts
the rows in position order and the unmodified kernel runs the full-sequence problem (causal,
window, packed documents: `schedule.whole_sequence_block`). Outputs (and lse) go back by the
inverse all-to-all. With ``heads_k >= N`` each rank receives ``heads_k / N`` K/V heads (no GQA
repetition); with ``heads_k < N`` (``N`` a multiple of ``heads_k``) each K/V head goes to the
``N / heads_k`` ranks whose query heads read it, and its gradients come back in fp32 and are
summed.

Overlap (`overlap.prefetched`): the heads are cut into ``chunks`` pipeline stages. The
all-to-alls of stage ``g + 1`` start before the kernel of stage ``g`` runs, and stage ``g``'s
outputs start home right after its kernel, during the next stage's kernel. Replicated K/V heads
(``heads_k < N``) go in stage 0 only and their gradients return after the last stage.
"""

import functools

import torch
import torch.distributed as dist

from flashlm.parallel.block_attention import block_backward, block_forward
from flashlm.parallel.overlap import prefetched, wait_all
from flashlm.parallel.zigzag import to_positions, to_rank_major


@functools.lru_cache(maxsize=64)
def ulysses_heads(world, nheads, nheads_k, chunks, device):
    """Per pipeline stage, the heads each rank receives, as (world, h) index tensors on
    ``device``: query heads (``chunks`` stages of ``H / (N * chunks)`` heads) and K/V heads
    (per stage, or one replicated head per rank in stage 0 when ``nheads_k < world``)."""
    per_rank, per_stage = nheads // world, nheads // (world * chunks)
    q_heads = [torch.tensor([[n * per_rank + g * per_stage + j for j in range(per_stage)]
                             for n in range(world)], device=device) for g in range(chunks)]
    if nheads_k >= world:
        per_rank, per_stage = nheads_k // world, nheads_k // (world * chunks)
        kv_heads = [torch.tensor([[n * per_rank + g * per_stage + j for j in range(per_stage)]
                                  for n in range(world)], device=device) for g in range(chunks)]
    else:
        replicas = world // nheads_k
        kv_heads = [torch.tensor([[n // replicas] for n in range(world)], device=device)]
    return q_heads, kv_heads


def _a2a(send, group):
    """Start an all-to-all of ``send`` (world, ...): slice ``i`` goes to rank ``i``."""
    recv = torch.empty_like(send)
    return dist.all_to_all_single(recv, send, group=group, async_op=True), recv


def _to_heads_send(x, heads):
    """Send buffer (world, rows, batch, h, ...) from the local shard ``x`` (batch, rows, H,
    ...); ``heads`` (world, h) are the heads each rank receives."""
    picked = x[:, :, heads.flatten()].unflatten(2, heads.shape)  # (batch, rows, world, h, ...)
    return picked.permute(2, 1, 0, *range(3, picked.dim())).contiguous()


def _whole_sequence(recv, world):
    """A received (world, rows, batch, h, ...) buffer as the whole sequence of a head shard,
    (batch, S, h, ...) in position order (one copy; a strided view of it)."""
    return to_positions(recv.flatten(0, 1), world, dim=0).transpose(0, 1)


def _to_seq_send(x, world):
    """Send buffer (world, rows, batch, h, ...) from a head shard ``x`` (batch, S, h, ...) in
    position order: rank ``i`` gets its zigzag rows."""
    return to_rank_major(x.transpose(0, 1), world, dim=0).unflatten(0, (world, -1))


def _from_seq_recv(recv):
    """A buffer received back from the head shards, (world, rows, batch, h, ...), as (batch,
    rows, world * h, ...) in the order of ``heads.flatten()``."""
    return recv.permute(2, 1, 0, *range(3, recv.dim())).flatten(2, 3)


class UlyssesAttention(torch.autograd.Function):
    """``apply(q, k, v, group, block, scale, deterministic, chunks) -> (out, lse)``; ``block``
    is the whole-sequence call."""

    @staticmethod
    def forward(ctx, q, k, v, group, block, scale, deterministic, chunks):
        world = dist.get_world_size(group)
        q_heads, kv_heads = ulysses_heads(world, q.shape[2], k.shape[2], chunks, q.device)
        kv = torch.stack([k, v], dim=3)  # (batch, rows, heads_k, 2, dim): one message

        def start(g):
            works = [_a2a(_to_heads_send(q, q_heads[g]), group)]
            if g < len(kv_heads):
                works.append(_a2a(_to_heads_send(kv, kv_heads[g]), group))
            return works

        out = torch.empty_like(q)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32,
                          device=q.device)
        saved, returns = [], []
        k_h = v_h = None
        for g, works in prefetched(start, chunks):
            received = wait_all(works)
            q_h = _whole_sequence(received[0], world)
            if len(received) > 1:
                kv_h = _whole_sequence(received[1], world)
                k_h, v_h = kv_h[:, :, :, 0], kv_h[:, :, :, 1]
            o_h, l_h = block_forward(q_h, k_h, v_h, block, scale, deterministic)
            saved += [q_h, k_h, v_h, o_h, l_h]
            returns.append((_a2a(_to_seq_send(o_h, world), group),
                            _a2a(_to_seq_send(l_h.transpose(1, 2), world), group)))
        for g, works in enumerate(returns):
            r_o, r_l = wait_all(works)
            out[:, :, q_heads[g].flatten()] = _from_seq_recv(r_o)
            lse[:, q_heads[g].flatten()] = _from_seq_recv(r_l).transpose(1, 2)
        ctx.save_for_backward(*saved)
        ctx.group, ctx.block, ctx.scale, ctx.deterministic = group, block, scale, deterministic
        ctx.heads, ctx.kv_shape, ctx.dtype = (q_heads, kv_heads), kv.shape, q.dtype
        ctx.replicated = k.shape[2] < world
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        group = ctx.group
        world = dist.get_world_size(group)
        q_heads, kv_heads = ctx.heads
        chunks = len(q_heads)
        stages = [ctx.saved_tensors[5 * g:5 * g + 5] for g in range(chunks)]
        batch, rows, nheads_k, _, head_dim = ctx.kv_shape
        nheads = sum(h.numel() for h in q_heads)
        device = stages[0][0].device
        if dout is None:  # only lse was used
            dout = torch.zeros((batch, rows, nheads, head_dim), dtype=ctx.dtype, device=device)

        def start(g):
            works = [_a2a(_to_heads_send(dout, q_heads[g]), group)]
            if dlse is not None:
                works.append(_a2a(_to_heads_send(dlse.transpose(1, 2), q_heads[g]), group))
            return works

        dq = torch.empty((batch, rows, nheads, head_dim), dtype=ctx.dtype, device=device)
        dkv = torch.empty(ctx.kv_shape, dtype=ctx.dtype, device=device)
        returns, dkv_replicated = [], None
        for g, works in prefetched(start, chunks):
            q_h, k_h, v_h, o_h, l_h = stages[g]
            received = wait_all(works)
            do_h = _whole_sequence(received[0], world)
            dl_h = None if dlse is None else _whole_sequence(received[1], world).transpose(1, 2)
            dq_h, dk_h, dv_h = block_backward(do_h, q_h, k_h, v_h, o_h, l_h, dl_h, ctx.block,
                                              ctx.scale, ctx.deterministic)
            dkv_h = torch.stack([dk_h, dv_h], dim=3)
            # dQ and unreplicated dK/dV are complete here: rounded once, sent in the input dtype.
            back_q = _a2a(_to_seq_send(dq_h.to(ctx.dtype), world), group)
            back_kv = None
            if ctx.replicated:
                dkv_replicated = (dkv_h.float() if dkv_replicated is None
                                  else dkv_replicated.add_(dkv_h))
            else:
                back_kv = _a2a(_to_seq_send(dkv_h.to(ctx.dtype), world), group)
            returns.append((back_q, back_kv))
        if ctx.replicated:
            # Rank n held K/V head n // replicas: the replicas of a head are adjacent slices.
            (recv,) = wait_all([_a2a(_to_seq_send(dkv_replicated, world), group)])
            per_head = recv.unflatten(0, (nheads_k, -1)).sum(1)  # (heads_k, rows, batch, 1, 2, dim)
            dkv = per_head.squeeze(3).permute(2, 1, 0, 3, 4)
        for g, (back_q, back_kv) in enumerate(returns):
            (r_q,) = wait_all([back_q])
            dq[:, :, q_heads[g].flatten()] = _from_seq_recv(r_q)
            if back_kv is not None:
                (r_kv,) = wait_all([back_kv])
                dkv[:, :, kv_heads[g].flatten()] = _from_seq_recv(r_kv)
        return (dq, dkv[:, :, :, 0].to(ctx.dtype), dkv[:, :, :, 1].to(ctx.dtype),
                None, None, None, None, None)
