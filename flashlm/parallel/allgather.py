"""All-gather attention (Llama 3 style): all K/V gathered, local queries against all keys.

Each rank gathers every rank's K/V (``heads_k`` heads, no GQA repetition), puts them in position
order and runs `schedule.allgather_schedule`'s calls: one per query chunk against the keys up
to its end (a causal chunk ``i`` reads ``(i + 1)`` chunks of keys; the kernel's bottom-right
alignment makes that the exact causal mask). Every query row is in exactly one call, so outputs
are written, never merged. Backward: the K/V are gathered again (activation memory stays
``S / N``), each rank computes dQ and the gradient of the *whole* K/V from its queries, and a
reduce-scatter in fp32 sums those gradients onto the ranks that own the shards.

Overlap (`overlap.prefetched`): the work is cut into ``chunks`` groups of K/V heads (and their
query heads). The all-gather of group ``g + 1`` is started before the kernels of group ``g``
run; in the backward the reduce-scatter of group ``g`` runs during the kernels of group
``g + 1``.
"""

import torch
import torch.distributed as dist

from flashlm.parallel.collectives import all_gather_single, reduce_scatter_single
from flashlm.parallel.block_attention import block_backward, block_forward
from flashlm.parallel.overlap import prefetched, wait_all
from flashlm.parallel.zigzag import to_positions, to_rank_major


def head_groups(nheads, chunks):
    """``chunks`` equal slices of ``nheads`` heads."""
    size = nheads // chunks
    return [slice(g * size, (g + 1) * size) for g in range(chunks)]


def allgather_forward(q, k_full, v_full, blocks, out, lse, scale, deterministic):
    """Local compute: queries ``q`` (batch, rows, heads, dim) against the whole sequence's
    ``k_full``/``v_full`` (batch, S, heads_k, dim); writes ``out`` and ``lse`` (views allowed)."""
    for blk in blocks:
        o, l_ = block_forward(q, k_full, v_full, blk, scale, deterministic)
        out[:, blk.q0:blk.q1] = o
        lse[:, :, blk.q0:blk.q1] = l_


def allgather_backward(dout, q, k_full, v_full, out, lse, dlse, blocks, dq, dk_full, dv_full,
                       scale, deterministic):
    """Local backward: writes ``dq`` and adds this rank's gradient of the whole K/V into
    ``dk_full``/``dv_full`` (fp32)."""
    for blk in blocks:
        dq_b, dk_b, dv_b = block_backward(dout, q, k_full, v_full, out, lse, dlse, blk, scale,
                                          deterministic)
        dq[:, blk.q0:blk.q1] = dq_b
        dk_full[:, blk.k0:blk.k1] += dk_b
        dv_full[:, blk.k0:blk.k1] += dv_b


def _start_gather(k, v, heads, group):
    """All-gather K/V heads ``heads`` of every rank (async). The send buffer is laid out
    (rows, batch, 2, heads, dim), so the gathered rows form one rank-major sequence dimension
    that a single copy puts in position order."""
    world = dist.get_world_size(group)
    send = torch.stack([k[:, :, heads], v[:, :, heads]], dim=2).transpose(0, 1).contiguous()
    recv = send.new_empty((world * send.shape[0], *send.shape[1:]))
    return all_gather_single(recv, send, group=group, async_op=True), recv


def _finish_gather(gather, layout):
    """K and V (batch, S, heads, dim) of the whole sequence in position order (strided views of
    one buffer), once the gather has arrived; ``layout``: the shards' `zigzag.Layout`."""
    (recv,) = wait_all([gather])
    full = to_positions(recv, layout, dim=0)
    return full[:, :, 0].transpose(0, 1), full[:, :, 1].transpose(0, 1)


class AllGatherAttention(torch.autograd.Function):
    """``apply(q, k, v, group, blocks, scale, deterministic, chunks, layout) -> (out, lse)``;
    ``blocks`` is this rank's entry of `schedule.allgather_schedule` for the shards' ``layout``."""

    @staticmethod
    def forward(ctx, q, k, v, group, blocks, scale, deterministic, chunks, layout):
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("inf"),
                         dtype=torch.float32, device=q.device)
        kv_heads, q_heads = head_groups(k.shape[2], chunks), head_groups(q.shape[2], chunks)
        for g, gather in prefetched(lambda g: _start_gather(k, v, kv_heads[g], group), chunks):
            k_full, v_full = _finish_gather(gather, layout)
            heads = q_heads[g]
            allgather_forward(q[:, :, heads], k_full, v_full, blocks, out[:, :, heads],
                              lse[:, heads], scale, deterministic)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.blocks, ctx.scale = group, blocks, scale
        ctx.deterministic, ctx.chunks, ctx.layout = deterministic, chunks, layout
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, chunks = ctx.group, ctx.chunks
        world = dist.get_world_size(group)
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq = torch.zeros_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        kv_heads, q_heads = head_groups(k.shape[2], chunks), head_groups(q.shape[2], chunks)
        scatters = []
        for g, gather in prefetched(lambda g: _start_gather(k, v, kv_heads[g], group), chunks):
            k_full, v_full = _finish_gather(gather, ctx.layout)
            # The whole K/V's gradient from this rank's queries, in the gather's layout.
            dkv_full = torch.zeros((k_full.shape[1], k_full.shape[0], 2, *k_full.shape[2:]),
                                   dtype=torch.float32, device=q.device)
            heads = q_heads[g]
            allgather_backward(dout[:, :, heads], q[:, :, heads], k_full, v_full,
                               out[:, :, heads], lse[:, heads],
                               None if dlse is None else dlse[:, heads], ctx.blocks,
                               dq[:, :, heads], dkv_full[:, :, 0].transpose(0, 1),
                               dkv_full[:, :, 1].transpose(0, 1), ctx.scale, ctx.deterministic)
            send = to_rank_major(dkv_full, ctx.layout, dim=0)
            recv = send.new_empty((send.shape[0] // world, *send.shape[1:]))
            work = reduce_scatter_single(recv, send, group=group, async_op=True)
            scatters.append(((work, recv), kv_heads[g]))
        for scatter, heads in scatters:
            (recv,) = wait_all([scatter])
            dk[:, :, heads] = recv[:, :, 0].transpose(0, 1)
            dv[:, :, heads] = recv[:, :, 1].transpose(0, 1)
        return dq, dk, dv, None, None, None, None, None, None
