"""Pure-PyTorch attention that defines what the flash kernels must compute.

It materializes the full score matrix, so it is only for tests and small shapes. The
semantics match FlashAttention-2 (>= 2.1):

- layout (batch, seqlen, heads, head_dim) for q, k, v and the output;
- grouped-query attention: query head ``h`` reads key/value head ``h // (nheads // nheads_k)``;
- masks aligned bottom-right: with ``d = seqlen_k - seqlen_q``, query ``i`` sees key ``j`` iff
  ``j <= i + d + right`` and ``j >= i + d - left`` for ``window_size = (left, right)`` (-1 is
  unbounded; ``causal`` sets ``right = 0``);
- packed variable-length batches attend within each sequence only;
- a query row that sees no key (possible when causal and ``seqlen_q > seqlen_k``) gets a zero
  output and a log-sum-exp of ``+inf``, so that its gradient is zero.
"""

import math

import torch


def attention_reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """Attention computed in the inputs' dtype (upcast them for a high-precision reference).

    Args:
        q: (batch, seqlen_q, nheads, head_dim).
        k, v: (batch, seqlen_k, nheads_k, head_dim), ``nheads % nheads_k == 0``.
        softmax_scale: multiplies the scores; defaults to ``1 / sqrt(head_dim)``.
        causal: bottom-right aligned causal mask.
        window_size: (left, right) sliding window, -1 for an unbounded side.

    Returns:
        out: (batch, seqlen_q, nheads, head_dim), dtype of ``q``.
        lse: (batch, nheads, seqlen_q), natural-log log-sum-exp of the scaled scores, in the
            dtype of ``q`` (``+inf`` for rows that see no key).
    """
    seqlen_q, nheads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = nheads // nheads_k
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    left, right = window_size
    if causal:
        right = 0
    rows = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if right >= 0:
        visible &= cols <= rows + right
    if left >= 0:
        visible &= cols >= rows - left
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None,
                               causal=False, window_size=(-1, -1)):
    """Packed-sequence attention, one `attention_reference` call per sequence.

    Args:
        q: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim).
        cu_seqlens_q, cu_seqlens_k: (num_sequences + 1,) offsets.

    Returns:
        out: (total_q, nheads, head_dim); lse: (nheads, total_q).
    """
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out, lse = attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                       softmax_scale, causal, window_size)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)
