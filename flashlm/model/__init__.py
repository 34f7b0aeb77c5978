"""The model: its config and presets, the decoder, the loss, and the activation-memory levers.

- ``config``: ``GPTConfig`` (Hugging Face ``LlamaConfig`` field names) and the size presets;
- ``model``: RMSNorm -> RoPE -> attention (flash, sdpa, eager; masks for windows and packed
  documents) -> SwiGLU MLP -> decoder block -> ``GPT``;
- ``loss``: next-token cross-entropy, chunked so the logits never exist whole;
- ``checkpointing``: per-layer activation checkpointing, CPU offload, kept op outputs (attention,
  projections), and the chunked MLP;
- ``plan``: which layers to recompute, offload or keep, and the planner that fits that to a
  memory budget (``gradient_checkpointing: auto``);
- ``compile``: regional ``torch.compile`` of the decoder blocks.
"""

from flashlm.model.config import PRESETS, GPTConfig
from flashlm.model.loss import IGNORE_INDEX
from flashlm.model.model import GPT, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput", "IGNORE_INDEX", "PRESETS"]
