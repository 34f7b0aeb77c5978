"""Pure-PyTorch SwiGLU that defines what the fused kernel must compute.

``silu(gate) * up`` with gate and up the two halves of the last dimension of one tensor,
computed in its dtype (upcast it for a high-precision reference).
"""

import torch.nn.functional as F


def swiglu_reference(gate_up):
    """gate_up (..., 2 * inter) -> silu(gate_up[..., :inter]) * gate_up[..., inter:]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
