"""Fused SwiGLU activation (forward and backward in Triton) and its pure-PyTorch reference."""

from .reference import swiglu_reference
from .swiglu import swiglu

__all__ = ["swiglu", "swiglu_reference"]
