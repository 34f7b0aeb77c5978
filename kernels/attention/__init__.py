"""Triton FlashAttention: forward, backward, and the pure-PyTorch reference they must match."""

from .flash_attn import flash_attn_func, flash_attn_replay, flash_attn_varlen_func
from .reference import attention_reference, varlen_attention_reference

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_replay", "attention_reference",
           "varlen_attention_reference"]
