"""Fused RMSNorm (forward and backward in Triton) and the pure-PyTorch reference it must match."""

from .reference import rms_norm_reference
from .rms_norm import rms_norm

__all__ = ["rms_norm", "rms_norm_reference"]
