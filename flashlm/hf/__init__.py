"""Hugging Face interop: conversion to and from Llama directories, the transformers attention
hook, and the ``flashlm export`` command.

- ``convert``: the declared name map, config translation, sharded save and load, Hub push;
- ``attention``: flashlm's kernel registered as a transformers attention implementation;
- ``export``: the command that turns a checkpoint (or a Hugging Face directory) into a
  plain Hugging Face directory.
"""

from flashlm.hf.attention import HF_ATTN_IMPLEMENTATION, register_attention
from flashlm.hf.convert import (UnsupportedCheckpointError, from_hf_config, load_pretrained, push_to_hub,
                                save_pretrained, to_hf_config)

__all__ = ["HF_ATTN_IMPLEMENTATION", "UnsupportedCheckpointError", "from_hf_config", "load_pretrained",
           "push_to_hub", "register_attention", "save_pretrained", "to_hf_config"]
