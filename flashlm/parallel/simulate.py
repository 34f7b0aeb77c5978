"""Context parallelism simulated on one device: each rank's share of the work, run one rank
after another with no communication, and the bytes each method would send.

This measures what a single GPU can tell about a method before a multi-GPU run: whether the
ranks get equal kernel work (the zigzag balance, the steps a mask skips) and how many bytes per
layer each rank puts on the wire. Communication time is not simulated; with overlap it hides
behind the kernel time when ``bytes / link bandwidth`` is smaller.

The per-rank work is the same code the distributed methods run (`ring.ring_step_forward`, ...),
fed from the full tensors instead of from the network. The per-rank results are laid back in
position order, so a caller can check that the shares add up to the full attention.
"""

import time
from dataclasses import dataclass

import torch

from flashlm.parallel import schedule as sch
from flashlm.parallel.allgather import allgather_backward, allgather_forward
from flashlm.parallel.block_attention import block_backward, block_forward, finish_merge
from flashlm.parallel.context_parallel import IMPLS, resolve_options
from flashlm.parallel.ring import ring_step_backward, ring_step_forward
from flashlm.parallel.ulysses import ulysses_heads
from flashlm.parallel.zigzag import shard_of, to_positions


def communication_bytes(impl, world_size, batch, seqlen, nheads, nheads_k, head_dim,
                        element_size, ring_hops=None, lse_grad=False):
    """Bytes one rank sends per attention layer, as ``{"forward": ..., "backward": ...}``.

    With ``L = seqlen / N`` local tokens, ``e`` the element size and ``kv = 2 B L H_k D e``
    (this rank's K and V):

    - ring (``T`` hops, ``N - 1`` unless a window ends the ring early): forward ``T kv``;
      backward ``T kv`` plus the fp32 dK/dV accumulator ``T + 1`` times (once more to go
      home), ``(T + 1) 2 B L H_k D 4`` (0 when ``T = 0``).
    - allgather (ring all-gather / reduce-scatter, ``(N - 1) / N`` of the full buffer):
      forward ``(N - 1) kv``; backward ``(N - 1) kv`` (gathered again) plus the fp32
      reduce-scatter ``(N - 1) 2 B L H_k D 4``.
    - ulysses (all-to-all: ``(N - 1) / N`` of each buffer leaves the rank): forward q, K/V, out
      and the fp32 lse, ``(N - 1) / N (2 B L H D e + 2 B L H_k' D e + B L H 4)``; backward
      dout, dQ and dK/dV, ``(N - 1) / N (2 B L H D e + 2 B L H_k' D e')`` (plus the fp32 dlse
      when ``lse_grad``), where ``H_k' = H_k`` and ``e' = e`` when ``H_k >= N``, and
      ``H_k' = N`` (one replicated head per destination) with fp32 gradients ``e' = 4``
      otherwise.
    """
    n = world_size
    rows = seqlen // n
    kv = 2 * batch * rows * nheads_k * head_dim
    if impl == "ring":
        hops = n - 1 if ring_hops is None else ring_hops
        grads = (hops + 1) * kv * 4 if hops else 0
        return {"forward": hops * kv * element_size,
                "backward": hops * kv * element_size + grads}
    if impl == "allgather":
        return {"forward": (n - 1) * kv * element_size,
                "backward": (n - 1) * kv * element_size + (n - 1) * kv * 4}
    if impl != "ulysses":
        raise ValueError(f"communication_bytes: impl={impl!r} is not one of {IMPLS}")
    share = (n - 1) / n
    q = batch * rows * nheads * head_dim * element_size
    lse = batch * rows * nheads * 4
    replicated = nheads_k < n
    kv_sent = 2 * batch * rows * (n if replicated else nheads_k) * head_dim
    forward = share * (2 * q + kv_sent * element_size + lse)
    backward = share * (2 * q + kv_sent * (4 if replicated else element_size)
                        + (lse if lse_grad else 0))
    return {"forward": round(forward), "backward": round(backward)}


@dataclass(kw_only=True)
class Simulation:
    """What `simulate_context_parallel` measured.

    ``forward_s``/``backward_s``: per-rank seconds (median of ``repeats``), index = rank.
    ``calls``: per-rank number of kernel calls in the forward. ``bytes``: per-rank bytes sent per
    layer (`communication_bytes`). ``out``, ``lse``, ``dq``, ``dk``, ``dv``: the ranks' results
    laid back in position order (full-sequence shapes; gradients of ``(out * dout).sum()``)."""

    impl: str
    world_size: int
    forward_s: list
    backward_s: list
    calls: list
    bytes: dict
    out: torch.Tensor
    lse: torch.Tensor
    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None


def _timed(fn, warmup, repeats, cuda):
    """(median seconds, last result) of ``fn()`` run ``repeats`` times after ``warmup`` untimed
    runs; CUDA events time the device work when ``cuda``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def _ring_rank(rank, layout, q, shards, dout, steps, scale, det, with_backward):
    """Rank ``rank``'s ring work on shards of the full tensors: forward and backward closures.
    ``shards``: every rank's stacked K/V shard, shared by all the simulated ranks."""
    n = layout.world_size
    ql, dol = shard_of(q, rank, layout), shard_of(dout, rank, layout)
    state = {}

    def forward():
        out_acc = torch.zeros(ql.shape, dtype=torch.float32, device=ql.device)
        lse_acc = torch.full((ql.shape[0], ql.shape[2], ql.shape[1]), float("-inf"),
                             dtype=torch.float32, device=ql.device)
        for step, blocks in enumerate(steps):
            ring_step_forward(ql, shards[(rank - step) % n], blocks, out_acc, lse_acc, scale, det)
        state["out"], state["lse"] = finish_merge(out_acc, lse_acc, ql.dtype)
        return state["out"], state["lse"]

    def backward():
        dq_acc = torch.zeros(ql.shape, dtype=torch.float32, device=ql.device)
        dkv = [torch.zeros(s.shape, dtype=torch.float32, device=s.device) for s in shards]
        for step, blocks in enumerate(steps):
            src = (rank - step) % n
            part = ring_step_backward(dol, ql, shards[src], state["out"], state["lse"], None,
                                      blocks, dq_acc, scale, det)
            if part is not None:
                dkv[src] += part
        return dq_acc, dkv

    return forward, (backward if with_backward else None)


def _allgather_rank(rank, layout, q, k, v, dout, blocks, scale, det, with_backward):
    ql, dol = shard_of(q, rank, layout), shard_of(dout, rank, layout)
    state = {}

    def forward():
        out = torch.zeros_like(ql)
        lse = torch.full((ql.shape[0], ql.shape[2], ql.shape[1]), float("inf"),
                         dtype=torch.float32, device=ql.device)
        allgather_forward(ql, k, v, blocks, out, lse, scale, det)
        state["out"], state["lse"] = out, lse
        return out, lse

    def backward():
        dq = torch.zeros_like(ql)
        dk_full = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_full = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        allgather_backward(dol, ql, k, v, state["out"], state["lse"], None, blocks, dq, dk_full,
                           dv_full, scale, det)
        return dq, dk_full, dv_full

    return forward, (backward if with_backward else None)


def _ulysses_rank(rank, n, q, k, v, dout, block, scale, det, with_backward):
    q_heads, kv_heads = ulysses_heads(n, q.shape[2], k.shape[2], 1, q.device)
    qi, kvi = q_heads[0][rank], kv_heads[0][rank]
    qh, kh, vh, doh = q[:, :, qi], k[:, :, kvi], v[:, :, kvi], dout[:, :, qi]
    state = {}

    def forward():
        state["out"], state["lse"] = block_forward(qh, kh, vh, block, scale, det)
        return state["out"], state["lse"]

    def backward():
        return block_backward(doh, qh, kh, vh, state["out"], state["lse"], None, block, scale,
                              det)

    return forward, (backward if with_backward else None)


def simulate_context_parallel(q, k, v, world_size, impl, causal=True, window_size=(-1, -1),
                              softmax_scale=None, cu_seqlens=None, backward=True,
                              deterministic=True, warmup=1, repeats=3, dout=None, assemble=True,
                              layout=None):
    """Run each rank's share of a context-parallel attention layer, one rank after another.

    Args:
        q: (batch, S, heads, head_dim); k, v: (batch, S, heads_k, head_dim): the *full*
            sequence on one device.
        world_size: the simulated group size ``N`` (``S`` a multiple of ``2N``).
        impl: "ring", "allgather" or "ulysses".
        causal, window_size, softmax_scale, cu_seqlens, deterministic: as in
            `context_parallel_attention` (``cu_seqlens`` of the full sequence, batch 1).
        backward: also time each rank's backward.
        warmup, repeats: untimed and timed runs per rank and pass; the median is kept.
        dout: the output gradient for the backward (random normal when None).
        assemble: keep the ranks' results and lay them back in position order (the outputs
            and gradients of the whole sequence: memory for long sequences); False returns the
            timings, calls and bytes only.
        layout: ring and allgather: a `zigzag.Layout` of ``world_size`` ranks (default the
            zigzag; `zigzag.document_layout` balances packed documents).

    Returns:
        A `Simulation`: per-rank forward/backward seconds, kernel calls and bytes per layer, and
        the assembled outputs and gradients.
    """
    if repeats < 1:
        raise ValueError(f"simulate_context_parallel: repeats={repeats} must be >= 1")
    n = world_size
    opts = resolve_options("simulate_context_parallel", impl, q, k, v, n, q.shape[1], causal,
                           window_size, softmax_scale, cu_seqlens, None, layout)
    layout = opts.layout
    batch, seqlen, nheads, head_dim = q.shape
    scale, docs, lo, hi = opts.scale, opts.docs, opts.lo, opts.hi
    if dout is None:
        dout = torch.randn_like(q)
    hops = None
    if impl == "ring":
        schedule = sch.ring_schedule(layout, seqlen, docs, lo, hi)
        hops = len(schedule[0]) - 1
        shards = [torch.stack([shard_of(k, r, layout), shard_of(v, r, layout)]) for r in range(n)]

        def make(r):
            return _ring_rank(r, layout, q, shards, dout, schedule[r], scale, deterministic, backward)
        calls = [sum(len(b) for b in steps) for steps in schedule]
    elif impl == "allgather":
        schedule = sch.allgather_schedule(layout, seqlen, docs, lo, hi)

        def make(r):
            return _allgather_rank(r, layout, q, k, v, dout, schedule[r], scale, deterministic, backward)
        calls = [len(b) for b in schedule]
    else:
        block = sch.whole_sequence_block(seqlen, docs, causal, opts.window)

        def make(r):
            return _ulysses_rank(r, n, q, k, v, dout, block, scale, deterministic, backward)
        calls = [1] * n
    forward_s, backward_s, outs, grads = [], [], [], []
    # One rank's closures (its shards, saved output, gradient buffers) at a time: at 1M tokens
    # all N ranks' copies at once do not fit in 80 GB.
    for r in range(n):
        forward, backward_fn = make(r)
        seconds, out = _timed(forward, warmup, repeats, q.is_cuda)
        forward_s.append(seconds)
        if assemble:
            outs.append(out)
        if backward_fn is not None:
            seconds, grad = _timed(backward_fn, warmup, repeats, q.is_cuda)
            backward_s.append(seconds)
            if assemble:
                grads.append(grad)
            del grad
        del out, forward, backward_fn
    out, lse, dq, dk, dv = _assemble(impl, layout, outs, grads, q, k) if assemble else (None,) * 5
    sent = communication_bytes(impl, n, batch, seqlen, nheads, k.shape[2], head_dim,
                               q.element_size(), ring_hops=hops)
    return Simulation(impl=impl, world_size=n, forward_s=forward_s, backward_s=backward_s,
                      calls=calls, bytes=sent, out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def _assemble(impl, layout, outs, grads, q, k):
    """The ranks' results in position order (full-sequence tensors)."""
    n = layout.world_size
    if impl == "ulysses":
        out = torch.cat([o for o, _ in outs], dim=2)
        lse = torch.cat([l_ for _, l_ in outs], dim=1)
        if not grads:
            return out, lse, None, None, None
        dq = torch.cat([g[0] for g in grads], dim=2).to(q.dtype)
        _, kv_heads = ulysses_heads(n, q.shape[2], k.shape[2], 1, k.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        for r, g in enumerate(grads):
            dk[:, :, kv_heads[0][r]] += g[1].float()
            dv[:, :, kv_heads[0][r]] += g[2].float()
        return out, lse, dq, dk.to(k.dtype), dv.to(k.dtype)
    out = to_positions(torch.cat([o for o, _ in outs], dim=1), layout, dim=1)
    lse = to_positions(torch.cat([l_ for _, l_ in outs], dim=2), layout, dim=2)
    if not grads:
        return out, lse, None, None, None
    dq = to_positions(torch.cat([g[0] for g in grads], dim=1), layout, dim=1).to(q.dtype)
    if impl == "ring":
        dkv = sum(torch.cat(g[1], dim=2) for g in grads)  # (2, batch, S rank-major, ...)
        dkv = to_positions(dkv, layout, dim=2)
        return out, lse, dq, dkv[0].to(k.dtype), dkv[1].to(k.dtype)
    dk = sum(g[1] for g in grads).to(k.dtype)
    dv = sum(g[2] for g in grads).to(k.dtype)
    return out, lse, dq, dk, dv
