"""flashlm: small Llama-architecture language models trained at long context on Triton FlashAttention.

The package follows the data path: ``data`` (sources -> documents or chat examples -> packed
batches -> loaders), ``model`` (config, decoder, loss, activation checkpointing), ``training``
(loop, optimizer, checkpoints, evaluation), ``parallel`` (context parallelism), ``hf``
(Hugging Face conversion, attention hook, export), and ``kernels`` (the Triton kernels).
"""

from flashlm.kernels.attention import flash_attn_func, flash_attn_varlen_func
from flashlm.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "HF_ATTN_IMPLEMENTATION", "flash_attn_func", "flash_attn_varlen_func"]
__version__ = "0.1.0"


def __getattr__(name):
    # HF_ATTN_IMPLEMENTATION is the name under which flashlm's kernel is registered with transformers.
    # Reading it registers the kernel, so that `import flashlm` does not import transformers (seconds).
    if name == "HF_ATTN_IMPLEMENTATION":
        from flashlm.hf.attention import register_attention

        return register_attention()
    raise AttributeError(f"module 'flashlm' has no attribute {name!r}")
