"""Pure-PyTorch attention that defines what the flash kernels must compute.

It materializes the full score matrix, so it is only for tests and small shapes. The
semantics match FlashAttention-2 (>= 2.1):

- layout (batch, seqlen, heads, head_dim) for q, k, v and the output;
- grouped-query attention: query head ``h`` reads key/value head ``h // (nheads // nheads_k)``;
- causal masking aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``;
- a query row that sees no key (possible when causal and ``seqlen_q > seqlen_k``) gets a zero
  output and a log-sum-exp of ``+inf``, so that its gradient is zero.
"""

import math

import torch


def attention_reference(q, k, v, softmax_scale=None, causal=False):
    """Attention computed in the inputs' dtype (upcast them for a high-precision reference).

    Args:
        q: (batch, seqlen_q, nheads, head_dim).
        k, v: (batch, seqlen_k, nheads_k, head_dim), ``nheads % nheads_k == 0``.
        softmax_scale: multiplies the scores; defaults to ``1 / sqrt(head_dim)``.
        causal: bottom-right aligned causal mask.

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
    if causal:
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        visible = cols <= rows + (seqlen_k - seqlen_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse
