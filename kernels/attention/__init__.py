"""Triton FlashAttention: forward, backward, and the pure-PyTorch reference they must match."""

from .flash_attn import flash_attn_func
from .reference import attention_reference

__all__ = ["flash_attn_func", "attention_reference"]
