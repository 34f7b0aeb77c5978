"""Ring attention: K/V shards travel around the group while each rank computes.

At ring step ``t`` rank ``r`` holds the K/V shard of rank ``r - t`` and runs the calls that
`schedule.ring_schedule` planned for that pair of shards; each call's partial output merges
into fp32 accumulators through its log-sum-exp. A step whose calls a mask leaves empty computes
nothing, and the ring stops after the last step any rank has work in (documents that end at
chunk boundaries end it at step 0; a sliding window still needs both neighbours, ``r - 1`` at
step 1 and ``r + 1`` at step ``N - 1``, so it keeps every hop but skips the steps between).

Overlap: one ``batch_isend_irecv`` per step sends the shard held now to ``r + 1`` and receives
the next one from ``r - 1`` into a second buffer (double buffering) *before* the step's kernels
are launched; the handles are waited on after them. With NCCL the transfers run on NCCL's
stream while the kernels run on the compute stream.

Backward: K/V travel the same way, and behind each shard its fp32 dK/dV accumulator, one step
late: rank ``r`` adds its contribution for the shard it holds to the accumulator that arrives
from ``r - 1`` (sent at the start of the step, so that transfer overlaps the step's kernels too)
and passes it on; after the last step the accumulator goes straight to the shard's owner. dQ
accumulates locally in fp32.
"""

import torch
import torch.distributed as dist

from flashlm.parallel.block_attention import (block_backward, block_forward, finish_merge,
                                              merge_partial)

_KV_TAG, _DKV_TAG = 0, 1


def ring_step_forward(q, kv, blocks, out_acc, lse_acc, scale, deterministic):
    """One ring step's compute: queries ``q`` against the shard ``kv`` (2, batch, rows, heads_k,
    dim), merged into the fp32 accumulators (see `merge_partial`)."""
    for blk in blocks:
        out, lse = block_forward(q, kv[0], kv[1], blk, scale, deterministic)
        merge_partial(out_acc, lse_acc, slice(blk.q0, blk.q1), out, lse)


def ring_step_backward(dout, q, kv, out, lse, dlse, blocks, dq_acc, scale, deterministic):
    """One ring step's backward: adds to the fp32 ``dq_acc`` and returns this rank's fp32
    gradient of the shard ``kv`` (same shape), or None when the step has no calls."""
    part = None
    for blk in blocks:
        dq, dk, dv = block_backward(dout, q, kv[0], kv[1], out, lse, dlse, blk, scale,
                                    deterministic)
        dq_acc[:, blk.q0:blk.q1] += dq
        if part is None:
            part = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        part[0, :, blk.k0:blk.k1] += dk
        part[1, :, blk.k0:blk.k1] += dv
    return part


def _exchange(group, sends, recvs):
    """Start point-to-point transfers; ``sends``/``recvs`` are ``(tensor, group_rank, tag)``."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer, tag=tag)
           for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer, tag=tag)
            for t, peer, tag in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works):
    for work in works:
        work.wait()


class RingAttention(torch.autograd.Function):
    """``apply(q, k, v, group, steps, scale, deterministic) -> (out, lse)`` on this rank's
    zigzag shards; ``steps`` is this rank's row of `schedule.ring_schedule`."""

    @staticmethod
    def forward(ctx, q, k, v, group, steps, scale, deterministic):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"),
                             dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # one message per step, and a buffer of our own to reuse
        spare = torch.empty_like(kv) if len(steps) > 1 else None
        for step, blocks in enumerate(steps):
            works = []
            if step + 1 < len(steps):
                works = _exchange(group, [(kv, nxt, _KV_TAG)], [(spare, prv, _KV_TAG)])
            ring_step_forward(q, kv, blocks, out_acc, lse_acc, scale, deterministic)
            _wait(works)
            if step + 1 < len(steps):
                kv, spare = spare, kv
        out, lse = finish_merge(out_acc, lse_acc, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.steps, ctx.scale, ctx.deterministic = group, steps, scale, deterministic
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, steps = ctx.group, ctx.steps
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        spare = torch.empty_like(kv) if len(steps) > 1 else None
        dkv = None  # fp32 gradient of the shard held now, summed over the ranks it visited
        for step, blocks in enumerate(steps):
            sends, recvs = [], []
            if step + 1 < len(steps):
                sends.append((kv, nxt, _KV_TAG))
                recvs.append((spare, prv, _KV_TAG))
            dkv_in = None
            if step > 0:
                # The previous step's accumulator follows its shard to r + 1; the accumulator of
                # the shard that just arrived comes from r - 1.
                dkv_in = torch.empty(kv.shape, dtype=torch.float32, device=q.device)
                sends.append((dkv, nxt, _DKV_TAG))
                recvs.append((dkv_in, prv, _DKV_TAG))
            works = _exchange(group, sends, recvs)
            part = ring_step_backward(dout, q, kv, out, lse, dlse, blocks, dq_acc, ctx.scale,
                                      ctx.deterministic)
            _wait(works)
            if dkv_in is not None:
                dkv = dkv_in if part is None else dkv_in.add_(part)
            else:
                dkv = part if part is not None else torch.zeros(kv.shape, dtype=torch.float32,
                                                                device=q.device)
            if step + 1 < len(steps):
                kv, spare = spare, kv
        hops = len(steps) - 1
        if hops:
            # The last shard's gradient goes straight home, to rank r - hops.
            home = torch.empty(kv.shape, dtype=torch.float32, device=q.device)
            _wait(_exchange(group, [(dkv, (rank - hops) % world, _DKV_TAG)],
                            [(home, (rank + hops) % world, _DKV_TAG)]))
            dkv = home
        return (dq_acc.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None)
