"""flashlm's attention kernel on one `Block`, and the fp32 merge of partial results.

This is the one module of ``flashlm.parallel`` that calls the kernel's autograd-free launchers
(``_Problem``, ``_flash_fwd_impl``, ``_flash_bwd_impl``) rather than `flash_attn_func`: context
parallelism needs the backward of one block given the *merged* output and log-sum-exp of the
whole row (FlashAttention-2's backward only needs q, k, v, dout and those two, through
``delta = rowsum(dout * out)``), so each method drives forward and backward itself from a
``torch.autograd.Function``.

Shapes: queries ``(batch, rows, heads, head_dim)``, keys and values ``(batch, rows, heads_k,
head_dim)`` (GQA: ``heads`` a multiple of ``heads_k``), lse ``(batch, heads, rows)`` fp32. A
varlen block (packed documents) needs batch 1.
"""

import functools

import torch

from flashlm.kernels.attention import flash_attn as fa


def check_arguments(fn, q, k, v, window_size, softmax_scale):
    """The kernel's own checks (dtypes, devices, head dims, GQA ratio, window, scale); returns
    ``(window_size, softmax_scale)`` normalized (the scale defaults to ``1 / sqrt(head_dim)``)."""
    fa._check_tensors(fn, q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    return fa._check_window(fn, window_size), fa._check_scale(fn, softmax_scale, q.shape[-1])


@functools.lru_cache(maxsize=1024)
def _offsets(offsets, device):
    """Packed-segment offsets on the device, made once per plan: a fresh host-to-device copy
    at every call would make the host wait for the GPU."""
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _problem(blk, q, k, scale, deterministic):
    cu_q = cu_k = None
    if blk.cu_q is not None:
        cu_q, cu_k = _offsets(blk.cu_q, q.device), _offsets(blk.cu_k, q.device)
    pb = fa._Problem(q, k, cu_q, blk.max_q, blk.max_k, scale, False, blk.window, deterministic)
    return pb, cu_q, cu_k


def _packed(blk, *tensors):
    """A varlen block's tensors without their batch dimension of 1."""
    return tensors if blk.cu_q is None else tuple(t[0] for t in tensors)


def block_forward(q, k, v, blk, scale, deterministic=True):
    """Forward of rows ``blk.q0:blk.q1`` of ``q`` against rows ``blk.k0:blk.k1`` of ``k``/``v``.

    Returns ``(out, lse)``: out ``(batch, q1 - q0, heads, head_dim)`` in q's dtype, lse
    ``(batch, heads, q1 - q0)`` fp32 (``+inf`` for a row that sees no key)."""
    q, k, v = q[:, blk.q0:blk.q1], k[:, blk.k0:blk.k1], v[:, blk.k0:blk.k1]
    q, k, v = _packed(blk, q, k, v)
    pb, cu_q, cu_k = _problem(blk, q, k, scale, deterministic)
    out, lse = fa._flash_fwd_impl(q, k, v, cu_q, cu_k, pb)
    return (out, lse) if blk.cu_q is None else (out[None], lse[None])


def block_backward(dout, q, k, v, out, lse, dlse, blk, scale, deterministic=True):
    """Gradients of one block given the merged ``out`` and ``lse`` of the full rows (and the
    gradient ``dlse`` of that lse, or None), all indexed by the local query rows.

    Returns ``(dq, dk, dv)`` for rows ``q0:q1`` and ``k0:k1``, fp32 when ``deterministic``
    (the kernel stores its fp32 accumulators without rounding them to a 16-bit dtype first), in
    q's dtype otherwise (the fused Hopper backward writes only its own dtype)."""
    rows = slice(blk.q0, blk.q1)
    q, dout, out = q[:, rows], dout[:, rows], out[:, rows]
    k, v = k[:, blk.k0:blk.k1], v[:, blk.k0:blk.k1]
    lse = lse[:, :, rows].contiguous()
    dlse = None if dlse is None else dlse[:, :, rows].contiguous()
    grads = None
    if deterministic:
        grads = tuple(torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    q, k, v, dout, out, lse = _packed(blk, q, k, v, dout, out, lse)
    if dlse is not None:
        (dlse,) = _packed(blk, dlse)
    if grads is not None:
        grads = _packed(blk, *grads)
    pb, cu_q, cu_k = _problem(blk, q, k, scale, deterministic)
    dq, dk, dv = fa._flash_bwd_impl(dout, q, k, v, out, lse, dlse, cu_q, cu_k, pb, grads=grads)
    return (dq, dk, dv) if blk.cu_q is None else (dq[None], dk[None], dv[None])


def merge_partial(out_acc, lse_acc, rows, out, lse):
    """Fold a partial result over ``rows`` into fp32 accumulators, in place.

    ``out_acc`` (batch, rows, heads, head_dim) fp32 and ``lse_acc`` (batch, heads, rows) fp32
    start as zeros and ``-inf``; the partial ``(out, lse)`` is a kernel result in which a row
    that saw no key has lse ``+inf``. The log-sum-exp of the union is
    ``logaddexp(lse_acc, lse)`` and each side is weighted by ``exp(its lse - union lse)``."""
    acc_o, acc_l = out_acc[:, rows], lse_acc[:, :, rows]
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))
    union = torch.logaddexp(acc_l, lse)
    shift = union.masked_fill(union == float("-inf"), 0.0)   # rows still empty: weights 0
    w_acc = torch.exp(acc_l - shift).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)
    acc_o.mul_(w_acc).add_(out.float() * w_new)
    acc_l.copy_(union)


def finish_merge(out_acc, lse_acc, dtype):
    """The merged ``(out, lse)`` in the kernel's conventions: out in ``dtype``, lse ``+inf``
    for rows that saw no key."""
    return out_acc.to(dtype), lse_acc.masked_fill(lse_acc == float("-inf"), float("inf"))
