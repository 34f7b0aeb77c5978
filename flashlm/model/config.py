"""The model configuration: one typed dataclass, named size presets, and their validation.

Architecture fields carry Hugging Face ``LlamaConfig`` names (``hidden_size``,
``num_key_value_heads``, ``rope_theta``, ``rope_scaling``, ...) so that exporting a model is a
copy of values, not a translation. The remaining fields are flashlm's run-time choices: the
attention backend and the memory levers used for long context.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from flashlm.validation import check

ATTN_BACKENDS = ("flash", "sdpa", "eager", "auto")
LOSS_IMPLS = ("chunked", "liger")
CHECKPOINT_DTYPES = (None, "bfloat16")
FUSED_OPS = ("auto", "triton", "torch")

# Keys each RoPE scaling accepts, as transformers' Llama reads them: (required, optional).
ROPE_SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": (
        {"factor"},
        {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim", "truncate"},
    ),
}


@dataclass(kw_only=True)
class GPTConfig:
    """A Llama-architecture decoder.

    Architecture (Hugging Face ``LlamaConfig`` names and meanings):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads
        (grouped-query attention: ``num_attention_heads`` must be a multiple of it),
        intermediate_size (SwiGLU width), rms_norm_eps, rope_theta, max_position_embeddings.
        rope_scaling: None, or a dict in transformers' format whose ``rope_type`` is "linear",
            "llama3" or "yarn", e.g. ``{"rope_type": "linear", "factor": 4.0}``.
        tie_word_embeddings: the LM head shares the token embedding matrix.
        initializer_range: std of the normal init; residual output projections use
            ``initializer_range / sqrt(2 * num_hidden_layers)``.
        bos_token_id, eos_token_id, pad_token_id: written to the exported configs.
        sliding_window: None (full causal attention), or W: each query attends to itself and
            the W - 1 tokens before it (Mistral's ``sliding_window``; exported as Mistral).

    Run-time choices (not part of the exported checkpoint):
        attn_backend: "flash" (flashlm's Triton kernel), "sdpa" (torch), "eager" (materialized
            softmax, the reference), or "auto": flash for CUDA inputs, sdpa otherwise.
        fused_ops: how RMSNorm, RoPE and SwiGLU run: "triton" (one fused kernel each, fp32
            arithmetic; the norms before the projections return the autocast dtype directly),
            "torch" (the PyTorch compositions, any device), or "auto": triton for CUDA inputs,
            torch otherwise.
        gradient_checkpointing: true: recompute every decoder layer in the backward pass from
            its input; false: keep every layer's activations; "auto": a per-layer plan (keep the
            layer whole, recompute it, or recompute it from an input in host memory; keep chosen
            ops of a recomputed layer) with the least recomputation whose estimated peak fits
            ``checkpoint_memory_budget``, resolved once at start for the run's micro-batch and
            device (``flashlm.model.plan``; ``GPT.set_checkpoint_plan`` sets one by hand).
        checkpoint_memory_budget: with gradient_checkpointing "auto", the peak memory the plan
            must fit, weights, gradients and optimizer state included: GiB above 1, or a fraction
            in (0, 1] of the device's memory. Unset otherwise.
        loss_chunk_size: with labels, compute the LM head and cross-entropy this many tokens at
            a time so the full (tokens, vocab) logits never exist; 0 disables.
        loss_impl: the fused LM head + cross-entropy used when ``loss_chunk_size > 0``:
            "chunked" (flashlm's, PyTorch, any device) or "liger" (liger-kernel's Triton kernel,
            CUDA only, imported on first use; it picks its own chunking).
        checkpoint_dtype: None, or "bfloat16": keep each checkpointed layer input in bf16 (the
            residual stream is fp32 under autocast over fp32 weights); the recomputation then
            starts from the rounded input. Needs gradient_checkpointing (true or "auto").
        checkpoint_offload: keep the checkpointed layer inputs in pinned CPU memory, copied on a
            side CUDA stream while the GPU computes. Needs gradient_checkpointing true ("auto"
            plans offloading per layer).
        checkpoint_keep_attention: keep each checkpointed layer's flash-attention output and
            lse from the forward pass, so the recomputation in the backward pass skips
            attention's forward kernel (at long context the costliest op of a layer), for one
            (tokens, hidden) tensor in the compute dtype per layer. Other attention backends
            recompute as before. Needs gradient_checkpointing true ("auto" plans it per layer).
        attention_deterministic: whether flash attention's backward is bit-for-bit
            reproducible. "auto" (the default) follows PyTorch: deterministic exactly when
            ``torch.use_deterministic_algorithms(True)`` is in effect, read at each call; true
            forces the reproducible backward, false lets Hopper GPUs run the fused backward,
            which sums dQ with atomics in a varying order and is faster (see
            ``flash_attn_func``).
        mlp_chunk_size: run the MLP this many tokens at a time, so that at most that many tokens
            of (tokens, intermediate_size) activations exist; free under gradient_checkpointing,
            one extra gate/up projection without it; 0 disables.
        compile: regional ``torch.compile`` of the decoder blocks (``flashlm.model.compile``),
            applied by the training loop at start: true, false (the default until it is
            measured faster on the GPU), or "auto": on for CUDA, off elsewhere.

    Derived:
        head_dim: hidden_size // num_attention_heads.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None
    attn_backend: str = "auto"
    fused_ops: str = "auto"
    gradient_checkpointing: bool | str = False
    checkpoint_memory_budget: float | None = None
    loss_chunk_size: int = 0
    loss_impl: str = "chunked"
    checkpoint_dtype: str | None = None
    checkpoint_offload: bool = False
    checkpoint_keep_attention: bool = False
    attention_deterministic: bool | str = "auto"
    mlp_chunk_size: int = 0
    compile: bool | str = False
    head_dim: int = field(init=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, getattr(self, name),
                   "a positive integer")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            _check(_is_number(value) and value > 0 and math.isfinite(value), name, value,
                   "a positive finite number")
        _check(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
               f"a multiple of num_attention_heads={self.num_attention_heads}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        _check(self.head_dim % 2 == 0, "hidden_size", self.hidden_size,
               f"such that head_dim = hidden_size / num_attention_heads is even for RoPE, "
               f"got head_dim={self.head_dim}")
        _check(self.sliding_window is None or (_is_int(self.sliding_window) and self.sliding_window > 0),
               "sliding_window", self.sliding_window, "None or a positive integer (tokens a query sees, itself included)")
        _check(self.attn_backend in ATTN_BACKENDS, "attn_backend", self.attn_backend, f"one of {ATTN_BACKENDS}")
        _check(self.fused_ops in FUSED_OPS, "fused_ops", self.fused_ops, f"one of {FUSED_OPS}")
        _check(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
               "a bool")
        _check(_is_auto_or_bool(self.gradient_checkpointing), "gradient_checkpointing",
               self.gradient_checkpointing, "true, false or 'auto'")
        auto = self.gradient_checkpointing == "auto"
        budget = self.checkpoint_memory_budget
        if auto:
            _check(_is_number(budget) and budget > 0 and math.isfinite(budget), "checkpoint_memory_budget", budget,
                   "with gradient_checkpointing 'auto', the peak memory to plan for: GiB above 1, or a fraction "
                   "in (0, 1] of the device's memory")
        else:  # kept for a later "auto" (a checkpoint of an "auto" run loaded with checkpointing on or off)
            _check(budget is None or (_is_number(budget) and budget > 0), "checkpoint_memory_budget", budget,
                   "None or a positive number")
        _check(_is_int(self.loss_chunk_size) and self.loss_chunk_size >= 0, "loss_chunk_size",
               self.loss_chunk_size, "a non-negative integer (0 disables chunking)")
        _check(self.loss_impl in LOSS_IMPLS, "loss_impl", self.loss_impl, f"one of {LOSS_IMPLS}")
        _check(self.loss_impl == "chunked" or self.loss_chunk_size > 0, "loss_impl", self.loss_impl,
               "'chunked' unless loss_chunk_size > 0 (loss_chunk_size=0 materializes the logits)")
        _check(self.checkpoint_dtype in CHECKPOINT_DTYPES, "checkpoint_dtype", self.checkpoint_dtype,
               f"one of {CHECKPOINT_DTYPES}")
        _check(isinstance(self.checkpoint_offload, bool), "checkpoint_offload", self.checkpoint_offload, "a bool")
        _check(isinstance(self.checkpoint_keep_attention, bool), "checkpoint_keep_attention",
               self.checkpoint_keep_attention, "a bool")
        _check(_is_auto_or_bool(self.attention_deterministic), "attention_deterministic",
               self.attention_deterministic, "true, false or 'auto' (deterministic when "
               "torch.use_deterministic_algorithms(True) is in effect)")
        _check(bool(self.gradient_checkpointing) or not self.checkpoint_dtype, "checkpoint_dtype",
               self.checkpoint_dtype, "unset unless gradient_checkpointing is true or 'auto' (it applies to "
               "checkpointed layer inputs)")
        for name in ("checkpoint_offload", "checkpoint_keep_attention"):
            _check(self.gradient_checkpointing is True or not getattr(self, name), name, getattr(self, name),
                   "unset unless gradient_checkpointing is true (it applies to checkpointed layer inputs; "
                   "with 'auto' the plan chooses it per layer)")
        _check(_is_auto_or_bool(self.compile), "compile", self.compile,
               "true, false or 'auto' (compiled blocks on CUDA)")
        _check(_is_int(self.mlp_chunk_size) and self.mlp_chunk_size >= 0, "mlp_chunk_size",
               self.mlp_chunk_size, "a non-negative integer (0 disables chunking)")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value < self.vocab_size), name, value,
                   f"None or a token id in [0, vocab_size={self.vocab_size})")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        _check(all(t is None or (_is_int(t) and 0 <= t < self.vocab_size) for t in eos), "eos_token_id",
               self.eos_token_id, f"None, a token id or a list of token ids in [0, vocab_size={self.vocab_size})")
        self._check_rope_scaling()

    def _check_rope_scaling(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        _check(isinstance(scaling, dict), "rope_scaling", scaling, 'None or a dict with a "rope_type" key')
        rope_type = scaling.get("rope_type")
        _check(rope_type in ROPE_SCALING_KEYS, "rope_scaling", scaling,
               f'a dict whose "rope_type" is one of {sorted(ROPE_SCALING_KEYS)}')
        required, optional = ROPE_SCALING_KEYS[rope_type]
        keys = set(scaling) - {"rope_type"}
        _check(required <= keys, "rope_scaling", scaling,
               f"a {rope_type!r} scaling with the keys {sorted(required)} (missing {sorted(required - keys)})")
        _check(keys <= required | optional, "rope_scaling", scaling,
               f"a {rope_type!r} scaling with only the keys {sorted(required | optional)} "
               f"(unknown {sorted(keys - required - optional)})")
        _check(_is_number(scaling["factor"]) and scaling["factor"] >= 1, "rope_scaling", scaling,
               'a scaling whose "factor" is a number >= 1')
        if rope_type == "llama3":
            _check(scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0, "rope_scaling", scaling,
                   'a llama3 scaling with high_freq_factor > low_freq_factor > 0')

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named size preset (see ``PRESETS``), with any field replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; the presets are {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values):
        """Build a config from ``to_dict()``'s output; an unknown key is an error that names it."""
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - fields)
        if unknown:
            derived = " (head_dim is derived from hidden_size and num_attention_heads)" if "head_dim" in unknown else ""
            raise ValueError(f"unknown model config key(s) {unknown}{derived}; the valid keys are {sorted(fields)}")
        return cls(**values)

    def to_dict(self):
        """The settable fields as plain JSON-able values (derived fields left out)."""
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}


def _copy(value):
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_auto_or_bool(value):
    return isinstance(value, bool) or value == "auto"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok, name, value, expected):
    check(ok, f"GPTConfig.{name}", value, f"expected {expected}")


_LLAMA_DEFAULTS = dict(rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.02)

# The 100m and 1b shapes are the ones measured in docs/peers.md. bos/eos/pad ids
# belong to the tokenizer, so recipes set them.
PRESETS = {
    # Small enough for CPU tests and the CPU quick start.
    "debug": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, max_position_embeddings=1024,
                  tie_word_embeddings=True, **_LLAMA_DEFAULTS),
    "100m": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=4096,
                 tie_word_embeddings=True, **_LLAMA_DEFAULTS),
    "350m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=2816, max_position_embeddings=4096,
                 tie_word_embeddings=True, **_LLAMA_DEFAULTS),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8, intermediate_size=5632, max_position_embeddings=4096,
               tie_word_embeddings=False, **_LLAMA_DEFAULTS),
}
