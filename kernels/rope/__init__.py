"""Rotary position embedding of q and k in one Triton launch, and its pure-PyTorch reference."""

from .reference import rotary_reference
from .rope import rotary_embedding

__all__ = ["rotary_embedding", "rotary_reference"]
