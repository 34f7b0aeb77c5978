"""flashlm: small Llama-architecture language models trained at long context on Triton FlashAttention."""

from flashlm.config import GPTConfig
from flashlm.kernels.attention import flash_attn_func, flash_attn_varlen_func
from flashlm.model import GPT

__all__ = ["GPT", "GPTConfig", "HF_ATTN_IMPLEMENTATION", "flash_attn_func", "flash_attn_varlen_func"]
__version__ = "0.1.0"


def __getattr__(name):
    # HF_ATTN_IMPLEMENTATION is the name under which flashlm's kernel is registered with transformers.
    # Reading it registers the kernel, so that `import flashlm` does not import transformers (seconds).
    if name == "HF_ATTN_IMPLEMENTATION":
        from flashlm.hf import register_attention

        return register_attention()
    raise AttributeError(f"module 'flashlm' has no attribute {name!r}")
