"""The flashlm model: a Llama-architecture decoder that runs its attention on flashlm's kernel.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm ->
SwiGLU MLP, then a final RMSNorm and an LM head (tied to the embedding or not). The numerics
follow transformers' ``LlamaForCausalLM`` (RMSNorm in fp32, RoPE in transformers' half-rotation
layout with cos/sin in fp32), so Hugging Face checkpoints load without any permutation and the
logits match.

Activations keep one layout end to end: (batch, seqlen, heads, head_dim), the flash kernel's.

``config.fused_ops`` picks how the elementwise ops run: RMSNorm, RoPE and SwiGLU each as one
Triton kernel (``flashlm.kernels.rms_norm``, ``.rope``, ``.swiglu``; the default for CUDA inputs)
or as the PyTorch compositions written out here (any device; the reference).
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.kernels.attention import flash_attn_func, flash_attn_replay, flash_attn_varlen_func
from flashlm.kernels.rms_norm import rms_norm
from flashlm.kernels.rope import rotary_embedding
from flashlm.kernels.swiglu import swiglu
from flashlm.model.checkpointing import (ActivationOffload, CheckpointOptions, block_forward, checkpoint_block,
                                         output_linear, tape_linear, taped)
from flashlm.model.config import GPTConfig
from flashlm.model.loss import next_token_loss
from flashlm.model.plan import LayerPlan, config_plan, parse_plan

logger = logging.getLogger(__name__)


def fused_ops_enabled(config, device):
    """Whether RMSNorm, RoPE and SwiGLU run as Triton kernels for inputs on ``device``:
    ``config.fused_ops`` "triton", or "auto" on a CUDA device."""
    return config.fused_ops == "triton" or (config.fused_ops == "auto" and device.type == "cuda")


def deterministic_attention(config):
    """Whether attention's backward must be bit-for-bit reproducible: ``config.attention_deterministic``,
    or with "auto" whether ``torch.use_deterministic_algorithms(True)`` is in effect, read at
    each call as PyTorch's own ops read it."""
    if config.attention_deterministic == "auto":
        return torch.are_deterministic_algorithms_enabled()
    return config.attention_deterministic


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back, like transformers' ``LlamaRMSNorm``.

    ``feeds_matmul``: the output only feeds linear layers, so under autocast the fused kernel
    returns it in the autocast dtype: the value autocast's cast would give, without the fp32
    tensor or the extra pass. The config is read at each call (``fused_ops`` may change).
    """

    def __init__(self, config, feeds_matmul=False):
        super().__init__()
        self.config = config
        self.eps = config.rms_norm_eps
        self.feeds_matmul = feeds_matmul
        self.weight = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x):
        if fused_ops_enabled(self.config, x.device):
            device_type = x.device.type
            autocast = self.feeds_matmul and torch.is_autocast_enabled(device_type)
            return rms_norm(x, self.weight, self.eps, torch.get_autocast_dtype(device_type) if autocast else None)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same formula as one op (the residual stream under autocast is fp32): on CUDA a
            # fused kernel whose backward keeps x and the inverse RMS, not the normalized tensor.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(config):
    """Rotary inverse frequencies and the cos/sin scale for ``config``'s RoPE and scaling.

    Returns:
        inv_freq: (head_dim // 2,) fp32.
        attention_scaling: float that multiplies cos and sin (1.0 except for yarn).
    """
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    rope_type, factor = scaling["rope_type"], scaling["factor"]
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    return _yarn_frequencies(config, scaling)


def _llama3_frequencies(inv_freq, scaling):
    # Llama 3.1: long wavelengths are divided by the factor, short ones kept, and the band in
    # between interpolated smoothly.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_frequencies(config, scaling):
    # YaRN (arXiv 2309.00071): interpolate the low frequencies, extrapolate the high ones with a
    # linear ramp between, and scale cos/sin by an attention temperature.
    dim, base, factor = config.head_dim, config.rope_theta, scaling["factor"]
    old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_scaling = scaling.get("attention_factor")
    if attention_scaling is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_scaling = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_scaling


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions given, in fp32.

    The frequencies are a plain fp32 tensor, not a buffer, so that ``model.to(torch.bfloat16)``
    cannot round them; a copy is kept per device.
    """

    def __init__(self, config):
        super().__init__()
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            self.inv_freq, self.attention_scaling = rope_frequencies(config)
        self._inv_freq_on = {}

    def forward(self, position_ids):
        """position_ids (batch or 1, seqlen) -> cos, sin: (batch or 1, seqlen, 1, head_dim // 2) fp32."""
        device = position_ids.device
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        freqs = position_ids[..., None].float() * self._inv_freq_on[device]
        return (freqs.cos() * self.attention_scaling)[:, :, None], (freqs.sin() * self.attention_scaling)[:, :, None]


def apply_rotary(x, cos, sin):
    """Rotate (batch, seqlen, heads, head_dim) by RoPE in the half-rotation layout, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@dataclass
class AttentionMask:
    """Which keys each query sees, in the form its backend takes; built once per forward pass.

    Attention is always causal. On top of that a sliding window keeps only the last W keys, and
    packed documents (``cu_seqlens``) keep a query inside its own document.

    window_size: the kernels' (left, right): (W - 1, 0) with a window, else (-1, 0).
    cu_seqlens: (documents + 1,) int32 on the inputs' device, offsets of the documents in the
        batch flattened to batch * seqlen tokens (flash only); None without documents.
    max_seqlen: the longest document (flash only).
    dense: (batch or 1, seqlen, seqlen) bool, True where query i sees key j (sdpa and eager);
        None for plain causal attention.
    """

    window_size: tuple[int, int] = (-1, 0)
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    dense: torch.Tensor | None = None
    context_parallel: object | None = None  # flashlm.parallel.ContextParallel: the ranks sharing a sequence


def check_cu_seqlens(cu_seqlens, batch, seqlen, max_seqlen=None):
    """Validate packed-document offsets against a (batch, seqlen) input; returns them on the CPU.

    ``cu_seqlens`` must be a 1-D int32 tensor that starts at 0, never decreases (empty documents
    are allowed), ends at ``batch * seqlen``, and has every row start ``b * seqlen`` among its
    values (a document never spans two rows). ``max_seqlen``, if given, must be at least the
    longest document. Raises ValueError naming the first violation.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        described = (f"a {cu_seqlens.dim()}-D {cu_seqlens.dtype} tensor" if isinstance(cu_seqlens, torch.Tensor)
                     else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of document offsets, got {described}")
    cu = cu_seqlens.cpu()
    total = batch * seqlen
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens={_preview(cu)} does not match the input: it must start at 0 and end at "
                         f"batch * seqlen = {batch} * {seqlen} = {total}")
    lengths = cu.diff()
    if (lengths < 0).any():
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens={_preview(cu)} is not monotone: cu_seqlens[{i + 1}]={int(cu[i + 1])} is "
                         f"below cu_seqlens[{i}]={int(cu[i])}")
    row_starts = torch.arange(0, total, seqlen, dtype=cu.dtype)
    crossing = ~torch.isin(row_starts, cu)
    if crossing.any():
        b = int(crossing.nonzero()[0, 0])
        raise ValueError(f"cu_seqlens={_preview(cu)} has a document that spans rows {b - 1} and {b}: every row "
                         f"start b * seqlen (here {b * seqlen}) must be a document boundary")
    longest = int(lengths.max())
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest document in cu_seqlens ({longest} tokens)")
    return cu


def _preview(t, limit=8):
    values = t.tolist()
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)} values)"


def build_attention_mask(backend, batch, seqlen, device, sliding_window=None, cu_seqlens=None, max_seqlen=None,
                         context_parallel=None):
    """The ``AttentionMask`` for ``backend`` ("flash", "sdpa" or "eager").

    ``cu_seqlens`` (validated, on the CPU) marks packed documents; ``sliding_window`` is W or None.
    With ``context_parallel`` the sequence is split over ranks: its attention takes the window
    and the whole sequence's ``cu_seqlens`` (kept on the CPU) whatever the backend.
    """
    window_size = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    if context_parallel is not None:
        return AttentionMask(window_size=window_size, cu_seqlens=cu_seqlens, context_parallel=context_parallel)
    if backend == "flash":
        if cu_seqlens is None:
            return AttentionMask(window_size=window_size)
        longest = max_seqlen if max_seqlen is not None else int(cu_seqlens.diff().max())
        return AttentionMask(window_size=window_size, cu_seqlens=cu_seqlens.to(device), max_seqlen=longest)
    if cu_seqlens is None and not sliding_window:
        return AttentionMask(window_size=window_size)
    pos = torch.arange(seqlen, device=device)
    dense = (pos[None, :] <= pos[:, None])[None]
    if sliding_window:
        dense = dense & (pos[:, None] - pos[None, :] < sliding_window)
    if cu_seqlens is not None:
        doc = document_index(cu_seqlens).view(batch, seqlen).to(device)
        dense = dense & (doc[:, :, None] == doc[:, None, :])
    return AttentionMask(window_size=window_size, dense=dense)


def document_index(cu_seqlens):
    """(total,) int64: for each token of the flattened batch, the index of its document."""
    lengths = cu_seqlens.diff().long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def attention(q, k, v, backend, mask=None, deterministic=True):
    """Causal attention over (batch, seqlen, heads, head_dim) q and (batch, seqlen, kv_heads, head_dim) k, v.

    ``backend`` is "flash", "sdpa" or "eager"; ``mask`` (an ``AttentionMask`` built for that
    backend) adds a sliding window and/or document boundaries. ``deterministic=False`` lets the
    flash backend take its faster non-deterministic backward. The output has q's shape and dtype.
    """
    mask = mask or AttentionMask()
    if mask.context_parallel is not None:
        # The sequence is split over ranks: attention runs over the whole of it, from this
        # rank's shards (cu_seqlens, on the CPU, describe the whole sequence). Kept attention
        # outputs work as below where the method can replay them.
        cp, args = mask.context_parallel, (mask.window_size, mask.cu_seqlens, deterministic)
        tape = taped("attention") if cp.replayable else None
        if tape is not None and tape.replaying:
            return cp.replay(q, k, v, *tape.take("attention"), *args)
        if tape is not None:
            out, lse = cp.attention(q, k, v, *args, return_lse=True)
            tape.record("attention", out, lse)
            return out
        return cp.attention(q, k, v, *args)
    if backend == "flash":
        # Inside a checkpointed layer that keeps attention: record (out, lse) in the forward
        # pass, replay them in the recomputation instead of running the forward kernel again.
        tape = taped("attention")
        record = tape is not None and not tape.replaying
        batch, seqlen = q.shape[:2]
        packed = {}
        if mask.cu_seqlens is not None:
            cu, longest = mask.cu_seqlens, mask.max_seqlen
            q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
            packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest)
        if tape is not None and tape.replaying:
            out = flash_attn_replay(q, k, v, *tape.take("attention"), causal=True, window_size=mask.window_size,
                                    deterministic=deterministic, **packed)
        elif packed:
            # GPT.forward checked the offsets once (check_cu_seqlens); no per-layer read-back.
            out = flash_attn_varlen_func(q, k, v, **packed, causal=True, window_size=mask.window_size,
                                         check_cu_seqlens=False, return_lse=record,
                                         deterministic=deterministic)
        else:
            out = flash_attn_func(q, k, v, causal=True, window_size=mask.window_size, return_lse=record,
                                  deterministic=deterministic)
        if record:
            tape.record("attention", *out)
            out = out[0]
        return out.view(batch, seqlen, *out.shape[1:]) if packed else out
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
            is_causal=mask.dense is None, attn_mask=None if mask.dense is None else mask.dense[:, None],
        )
        return out.transpose(1, 2)
    # Materializes (batch, heads, seqlen, seqlen) scores: the reference, and the memory baseline.
    batch, seqlen, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.view(batch, seqlen, kv_heads, heads // kv_heads, head_dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * head_dim**-0.5
    if mask.dense is None:
        hidden = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
    else:
        hidden = ~mask.dense[:, None, None]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(batch, seqlen, heads, head_dim)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, backend, mask=None):
        batch, seqlen, _ = x.shape
        # One product for q, k and v: autocast casts the input once and the backward pass keeps
        # that one copy (three separate projections would each keep their own).
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        q, k, v = tape_linear(x, weight, "qkv").split([self.q_proj.out_features, self.k_proj.out_features,
                                                       self.v_proj.out_features], dim=-1)
        q = q.view(batch, seqlen, self.num_heads, self.head_dim)
        k = k.view(batch, seqlen, self.num_kv_heads, self.head_dim)
        # A copy of v of its own: a view would keep the whole q|k|v product alive until backward.
        v = v.reshape(batch, seqlen, self.num_kv_heads, self.head_dim).contiguous()
        if fused_ops_enabled(self.config, x.device):
            q, k = rotary_embedding(q, k, cos, sin)  # one launch, q and k read in place
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, backend, mask, deterministic_attention(self.config))
        return self.o_proj(out.reshape(batch, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        # gate and up as one product, for the same reason as Attention's q, k, v.
        gate_up = tape_linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]), "gate_up")
        if fused_ops_enabled(self.config, x.device):
            # Keeps only gate_up for backward and returns its gradient as one tensor.
            act = swiglu(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        # down_proj's product is skipped where only its gradient is needed (a recomputed MLP).
        return output_linear(act, self.down_proj.weight)


def attention_half(block, x, cos, sin, backend, mask=None):
    """The first residual half of a decoder layer: ``x + attn(attn_norm(x))``."""
    return x + block.attn(block.attn_norm(x), cos, sin, backend, mask)


def mlp_half(block, h):
    """The second residual half of a decoder layer: ``h + mlp(mlp_norm(h))``."""
    return h + block.mlp(block.mlp_norm(h))


class Block(nn.Module):
    """A pre-norm decoder layer: ``mlp_residual(attention_residual(x))``.

    The two halves (``attention_half``, ``mlp_half``) are the one place the residual formula is
    written. ``forward`` composes them with one of ``flashlm.model.checkpointing``'s layer paths
    (whole, MLP chunked, checkpointed with its levers), so that every path runs inside
    ``Block.__call__``: hooks on the layer, such as FSDP2's unshard before its forward and
    reshard after, wrap whichever path runs. After ``flashlm.model.compile.compile_blocks``
    each half runs as a compiled region (``self.compiled``) wherever no op of it is taped.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(config, feeds_matmul=True)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config, feeds_matmul=True)
        self.mlp = MLP(config)
        self.compiled = None  # flashlm.model.compile.CompiledHalves, shared by every block

    def attention_residual(self, x, cos, sin, backend, mask=None):
        if self.compiled is not None and self.compiled.runs_attention(mask):
            return self.compiled.attention_half(self, x, cos, sin, backend, mask)
        return attention_half(self, x, cos, sin, backend, mask)

    def mlp_residual(self, h):
        if self.compiled is not None and self.compiled.runs_mlp():
            return self.compiled.mlp_half(self, h)
        return mlp_half(self, h)

    def attention_parameters(self):
        """The parameters of ``attention_residual``, in a fixed order."""
        yield from self.attn_norm.parameters()
        yield from self.attn.parameters()

    def mlp_parameters(self):
        """The parameters of ``mlp_residual``, in a fixed order."""
        yield from self.mlp_norm.parameters()
        yield from self.mlp.parameters()

    def forward(self, x, cos, sin, backend, mask=None, checkpoint=None):
        """The layer on x: (batch, seqlen, hidden_size) -> the same shape and dtype.

        Args:
            cos, sin, backend, mask: what ``attention_residual`` takes after x.
            checkpoint: ``CheckpointOptions`` of this forward pass to keep only x for the backward
                pass and recompute the layer there (``checkpoint_block``); None runs the layer with
                its graph, the MLP ``config.mlp_chunk_size`` tokens at a time (``block_forward``;
                0: whole). The config is read at each call.
        """
        attn_args = (cos, sin, backend, mask)
        if checkpoint is not None:
            return checkpoint_block(self, x, attn_args, checkpoint)
        return block_forward(self, x, attn_args, self.config.mlp_chunk_size)


@dataclass
class GPTOutput:
    """``logits``: (batch, seqlen, vocab), None when the loss came from the chunked path;
    ``loss``: scalar fp32 mean next-token cross-entropy, None without labels."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class GPT(nn.Module):
    """A Llama-architecture causal language model; see ``GPTConfig`` for its fields."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        # Not feeds_matmul: the loss paths take the final hidden states in their own dtype.
        self.norm = RMSNorm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self._logged_backends = set()
        self._offload_streams = {}
        self.checkpoint_plan = None  # gradient_checkpointing="auto": set_checkpoint_plan
        # Set by flashlm.parallel.apply_context_parallel: the inputs are then this rank's shards
        # of sequences split over a group of ranks. The model itself never counts ranks.
        self.context_parallel = None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self):
        """Initialization for training from scratch: normal(0, initializer_range) weights, with the
        projections that write into the residual stream (o_proj, down_proj) scaled down by
        sqrt(2 * num_hidden_layers) so the residual variance does not grow with depth."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def attn_backend(self, device):
        """The attention backend used for inputs on ``device`` ("auto" resolved)."""
        backend = self.config.attn_backend
        if backend == "auto":
            backend = "flash" if device.type == "cuda" else "sdpa"
            if device.type not in self._logged_backends:
                self._logged_backends.add(device.type)
                logger.info("attn_backend=auto: using %s attention for %s inputs", backend, device.type)
        return backend

    def forward(self, input_ids, labels=None, position_ids=None, cu_seqlens=None, max_seqlen=None, targets=None):
        """Next-token logits and, with labels, the loss.

        Args:
            input_ids: (batch, seqlen) int64.
            labels: optional (batch, seqlen) int64 aligned with input_ids as in transformers: the
                loss at position t predicts labels[t + 1] from tokens up to t; -100 is ignored.
            position_ids: optional (batch, seqlen) or (1, seqlen) RoPE positions. They only move
                RoPE; which tokens attend to which is set by ``cu_seqlens``. Default: 0..seqlen-1,
                or each token's position in its document when ``cu_seqlens`` is given.
            cu_seqlens: optional (documents + 1,) int32 offsets of packed documents in the batch
                flattened to batch * seqlen tokens (FlashAttention's varlen layout, as
                ``flashlm.data`` batches carry them): attention never crosses a document
                boundary. Every row start must be a boundary. Bad offsets raise ValueError.
            max_seqlen: optional int, the longest document (computed from cu_seqlens if None).
            targets: instead of ``labels``, the targets already shifted: position t predicts
                targets[t] (``IGNORE_INDEX`` for none).

        Under context parallelism (``self.context_parallel``), input_ids, position_ids and
        labels or targets are this rank's shards of the sequences (``ContextParallel.shard``),
        while cu_seqlens describes the whole sequences; the loss is the mean over this rank's
        targets.

        Returns:
            GPTOutput with logits (batch, seqlen, vocab) in the activation dtype and loss (fp32).
            With labels and ``config.loss_chunk_size > 0`` the logits are None.
        """
        batch, seqlen = input_ids.shape
        device = input_ids.device
        cp = self.context_parallel
        full = seqlen * (cp.size if cp is not None else 1)  # the whole sequences' length
        if cu_seqlens is not None:
            cu_seqlens = check_cu_seqlens(cu_seqlens, batch, full, max_seqlen)
        if position_ids is None and cu_seqlens is not None:
            starts = cu_seqlens[:-1].long()[document_index(cu_seqlens)]
            position_ids = (torch.arange(batch * full) - starts).view(batch, full).to(device)
        elif position_ids is None:
            position_ids = torch.arange(full, device=device)[None]
        if cp is not None and position_ids.shape[-1] == full != seqlen:
            position_ids = cp.shard(position_ids, cu_seqlens=cu_seqlens)
        cos, sin = self.rope(position_ids)
        backend = self.attn_backend(device)
        mask = build_attention_mask(backend, batch, seqlen, device, self.config.sliding_window, cu_seqlens,
                                    max_seqlen, context_parallel=cp)
        x = self.embed(input_ids)
        c = self.config
        checkpointing = c.gradient_checkpointing and self.training and torch.is_grad_enabled()
        options = self._checkpoint_options(device) if checkpointing else [None] * c.num_hidden_layers
        for layer, checkpoint in zip(self.layers, options):
            x = layer(x, cos, sin, backend, mask, checkpoint=checkpoint)
        last = options[-1]
        if last is not None and last.offload is not None:
            last.offload.prefetch(last.offload.slots - 1)  # the backward pass starts there
        x = self.norm(x)
        if labels is None and targets is None:
            return GPTOutput(logits=self.lm_head(x))
        aligned = targets is not None
        loss, logits = next_token_loss(x, self.lm_head.weight, targets if aligned else labels, c.loss_chunk_size,
                                       c.loss_impl, aligned=aligned)
        return GPTOutput(logits=logits, loss=loss)

    def set_checkpoint_plan(self, plan):
        """Set the per-layer plan of ``gradient_checkpointing: auto`` (``flashlm.model.plan``):
        a plan string ("2*offload,6*checkpoint+attention,4*none") or one ``LayerPlan`` per
        layer. ``plan_for_training`` calls this with the plan it resolved; None unsets it."""
        c = self.config
        if c.gradient_checkpointing != "auto":
            raise ValueError(f"set_checkpoint_plan needs GPTConfig.gradient_checkpointing='auto', got "
                             f"{c.gradient_checkpointing!r} (true and false fix the plan themselves)")
        if isinstance(plan, str):
            plan = parse_plan(plan, c.num_hidden_layers)
        if plan is not None:
            plan = tuple(plan)
            if len(plan) != c.num_hidden_layers or not all(isinstance(lp, LayerPlan) for lp in plan):
                raise ValueError(f"a checkpoint plan is one LayerPlan per layer ({c.num_hidden_layers}), got {plan!r}")
        self.checkpoint_plan = plan

    def layer_plans(self):
        """One ``LayerPlan`` per layer for a training forward pass (``gradient_checkpointing``
        true: every layer recomputed with the config's levers; "auto": the plan set on the model)."""
        c = self.config
        if c.gradient_checkpointing != "auto":
            return config_plan(c) or (LayerPlan(),) * c.num_hidden_layers
        if self.checkpoint_plan is None:
            raise RuntimeError("gradient_checkpointing='auto' needs its plan before training: call "
                               "flashlm.model.plan.plan_for_training(model, ...) at start, or "
                               "model.set_checkpoint_plan(...)")
        return self.checkpoint_plan

    def _checkpoint_options(self, device):
        """The ``CheckpointOptions`` of each layer for one forward pass (None: the layer runs
        whole), with a fresh offload buffer each time."""
        c = self.config
        plans = self.layer_plans()
        offload = None
        if any(lp.mode == "offload" for lp in plans):
            stream = None
            if device.type == "cuda":
                # One side stream per device for the host copies, made on first use.
                stream = self._offload_streams.get(device)
                if stream is None:
                    stream = self._offload_streams[device] = torch.cuda.Stream(device)
            offload = ActivationOffload(stream)
        save_dtype = getattr(torch, c.checkpoint_dtype) if c.checkpoint_dtype else None
        options = {lp: None if not lp.recomputed else CheckpointOptions(
            save_dtype=save_dtype, offload=offload if lp.mode == "offload" else None,
            mlp_chunk_size=c.mlp_chunk_size, keep=lp.keep) for lp in set(plans)}
        return [options[lp] for lp in plans]

    def num_params(self, exclude_embeddings=False):
        """Parameter count, shared (tied) tensors once; ``exclude_embeddings`` leaves out the token
        embedding table (and so a tied LM head)."""
        count = sum(p.numel() for p in self.parameters())
        return count - self.embed.weight.numel() if exclude_embeddings else count

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token at context ``seq_len``, for MFU.

        6 * N for the matmul weights N (every linear layer and the LM head; the embedding lookup
        and norms do no matmul FLOPs), plus causal attention's score and value products:
        forward 2 * 2 * L * H * D * seq_len / 2 per token (QK^T and PV, half of them masked),
        tripled for forward + backward: 6 * L * H * D * seq_len. With a sliding window W < seq_len
        a query sees W - W * (W - 1) / (2 * seq_len) keys on average instead of about seq_len / 2.
        Recomputation (gradient checkpointing, flash's backward) and document masking (which
        depends on the data) are not counted.
        """
        c = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        per_key = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
        attention = per_key * seq_len // 2
        window = c.sliding_window
        if window is not None and window < seq_len:
            attention = per_key * (window - window * (window - 1) / (2 * seq_len))
        return 6 * matmul_params + attention
