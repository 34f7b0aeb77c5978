"""flashlm: small Llama-architecture language models trained at long context on Triton FlashAttention."""

from flashlm.kernels.attention import flash_attn_func

__all__ = ["flash_attn_func"]
__version__ = "0.1.0"
