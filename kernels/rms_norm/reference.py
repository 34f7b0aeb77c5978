"""Pure-PyTorch RMSNorm that defines what the fused kernel must compute.

``y = weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, every step in the inputs'
dtype (upcast them for a high-precision reference; keep them low for plain PyTorch's own
low-precision error, which the kernel's tolerance is measured against).
"""

import torch


def rms_norm_reference(x, weight, eps):
    """RMSNorm of x (..., hidden) with weight (hidden,), computed in their promoted dtype.

    Returns:
        (..., hidden) tensor of ``torch.promote_types(x.dtype, weight.dtype)``.
    """
    dtype = torch.promote_types(x.dtype, weight.dtype)
    x = x.to(dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
