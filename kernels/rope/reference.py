"""Pure-PyTorch rotary embedding that defines what the fused kernel must compute.

transformers' half-rotation layout: a head ``x`` is split into halves ``x1, x2`` and becomes
``cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``. Every step runs in the dtype of the tensor
rotated, cos and sin cast to it (upcast the inputs for a high-precision reference).
"""

import torch


def rotary_reference(x, cos, sin):
    """Rotate x (batch, seqlen, heads, head_dim) by cos, sin (batch or 1, seqlen, 1, head_dim // 2).

    Returns:
        A tensor shaped and typed like x.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
