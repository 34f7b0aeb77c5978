"""The per-layer activation plan: which decoder layers keep their activations, which are
recomputed in the backward pass from a kept input (on the device or in host memory), and which
ops a recomputed layer keeps instead of running again; the memory and cost model of each
choice; and the planner that picks the plan with the least recomputation whose estimated peak
memory fits a budget (``gradient_checkpointing: auto``).

A plan holds one ``LayerPlan`` per layer and is written as runs of equal layers, first layer
first::

    "4*offload,8*checkpoint+attention,4*none"

Modes:
    none        the layer keeps its activations for the backward pass: nothing is recomputed;
    checkpoint  the layer keeps only its input, and runs its forward again in the backward pass;
    offload     checkpoint, with the kept input in pinned host memory (CUDA) while it waits.
Kept ops of a recomputed layer (torchtitan's selective checkpointing, by op):
    attention   flash attention's output and lse: the recomputation replays them instead of
                running the attention forward (flash backend only; others recompute);
    qkv         the q|k|v projection's output: the recomputation skips that matmul;
    gate_up     the gate|up projection's output: it skips the MLP's largest matmul.

Memory model (bytes; ``ActivationModel`` computes each term). Per token of the micro-batch,
with h = hidden_size, kv = num_key_value_heads * head_dim, I = intermediate_size,
H = num_attention_heads, a = bytes of the compute dtype (2 under bf16 autocast), r = bytes of
the residual stream (4 under autocast over fp32 weights), s = bytes of a kept layer input
(2 with ``checkpoint_dtype: bfloat16``, else r), m = 3 a I with the fused SwiGLU kernel and
4 a I with PyTorch's (gate|up and the product; PyTorch also keeps silu(gate)), n = 4 per norm
(its fp32 inverse RMS; PyTorch's RMSNorm on a CPU also keeps the fp32 normalized x, + r h):

    whole layer ("none")  r h  (input, for the norm)   + a h   (normed, for q|k|v)
                        + a (h + 2 kv)  (rotated q, k and v)  + a h + 4 H  (attention out, lse)
                        + r h  (mid-layer residual)     + a h   (normed, for gate|up)  + m
                        + 2 n  (a chunked MLP keeps only the mid-layer residual of its half)
    checkpoint            s h;  offload: 0 on the device
    + kept ops            attention a h + 4 H (flash only);  qkv a (h + 2 kv);  gate_up 2 a I

Per layer, independent of tokens: a whole layer keeps the compute-dtype copies of its
concatenated q|k|v and gate|up weights, and under autocast the cast o_proj and down_proj
weights, which autocast caches until the forward pass ends (so every layer holds those until
then). Outside the layers: the RoPE tables, the last layer's output (for the final norm) and
the loss: with ``loss_chunk_size`` the gradients of the final hidden states (r h per token)
and of the LM head, computed in the forward pass one chunk of logits at a time; without it
fp32 log-probabilities, (tokens, vocab).

Peak: weights and optimizer state, plus the largest of (a) the end of the forward pass: every
layer's kept bytes, the autocast weight cache and the loss's kept bytes and chunk; (b) the
loss's backward pass; (c) the backward pass of each layer j: the kept bytes of the layers below
j, the gradients of the parameters above j, and layer j's working set: its whole-layer bytes
(kept, or recomputed: the MLP a chunk at a time when chunked) and the gradients in flight
(2 r h per token, plus the larger of the MLP's, 3 a I per MLP token, and the attention half's,
a (3 h + 2 kv) per token). The layers with most memory go last: their activations are freed
first, before any recomputation runs.

Cost model (FLOP-equivalents per step): matmul and attention FLOPs of what is recomputed,
plus the bytes the recomputed elementwise ops move times ``flops_per_byte`` (an H100's dense
bf16 FLOP/s over its memory bandwidth, about 300): at short context those ops, not the
matmuls, are much of a layer's time. A recomputation never runs the layer's last product
(down_proj), whose value nobody reads; a whole layer with a chunked MLP recomputes the MLP's
gate|up product and SwiGLU. Offload costs what checkpoint does plus 1% of a layer's
forward (the copies overlap the compute; the extra only makes the planner keep inputs on the
device when both fit).

Calibration: on the CPU the kept bytes and the peak are within 12% of
``flashlm.profiling.LiveTensorBytes`` for whole, recomputed and mixed plans
(tests/test_memory.py); the peaks of the committed H100 sweep (results/memory, 1b at 4K-128K
and 100m at 128K, every layer offloaded, with and without kept attention) are within -1% to
+4% of the estimate. The planner's own plans are measured on the GPU by
``scripts/bench/memory_sweep.py --rows flashlm_auto --budget GIB``.

Splitting the micro-batch (``plan_split``): a micro-batch of B rows may run as ``split`` equal
sub-batches, each forward and backward in turn, their gradients accumulating (as
``grad_accum_steps`` does, inside the micro-batch). Each holds 1/split of the activations, so
within the same budget more layers stay whole and less is recomputed: per token, the cost of a
step is its forward and backward, which do not change, plus the recomputation, which does. A
sub-batch keeps at least ``MIN_SPLIT_TOKENS`` tokens, and a split must save at least
``MIN_SPLIT_GAIN`` of a forward pass per token: each sub-batch reads every weight and launches
every kernel again, which these floors stand in for (they are rules, not a measured cost).
Every pass after the first runs with all the parameter gradients already held (so does every
micro-step of ``grad_accum_steps`` > 1): the peak then counts them whole, like the weights
(``accumulating``), not building up during the backward pass as in a single pass. On the H100
the first split plan, made without that, peaked at its estimate plus the 1b model's 3.3 GiB of
gradients; the corrected plan peaked within 0.1 GiB of its estimate, but ran slower than the
whole batch (1b at 4K and 8K), so the trainer splits only when asked (``micro_batch_split``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from dataclasses import dataclass, field

import torch

MODES = ("none", "checkpoint", "offload")
KEEPS = ("attention", "qkv", "gate_up")
GIB = 2**30
MIN_SPLIT_TOKENS = 8192
MIN_SPLIT_GAIN = 0.05


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps from its forward pass: ``mode`` (see ``MODES``) and, for a
    recomputed layer, the ops whose outputs it keeps (a subset of ``KEEPS``)."""

    mode: str = "none"
    keep: frozenset[str] = frozenset()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown layer mode {self.mode!r}; the modes are {list(MODES)}")
        unknown = sorted(set(self.keep) - set(KEEPS))
        if unknown:
            raise ValueError(f"unknown kept op(s) {unknown}; the ops a layer can keep are {list(KEEPS)}")
        if self.mode == "none" and self.keep:
            raise ValueError(f"a layer of mode 'none' keeps everything; '+{'+'.join(sorted(self.keep))}' applies "
                             "to checkpoint and offload layers")
        object.__setattr__(self, "keep", frozenset(self.keep))

    @property
    def recomputed(self) -> bool:
        return self.mode != "none"

    def __str__(self):
        return "+".join([self.mode, *(k for k in KEEPS if k in self.keep)])


@functools.lru_cache(maxsize=64)
def parse_plan(spec: str, num_layers: int) -> tuple[LayerPlan, ...]:
    """The layers of a plan string (``"2*offload,checkpoint+attention,5*none"``), checked to
    cover exactly ``num_layers`` layers. Raises ValueError naming the bad item."""
    layers = []
    for item in spec.split(","):
        item = item.strip()
        count, star, body = item.partition("*")
        if not star:
            count, body = "1", item
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"plan item {item!r}: expected [COUNT*]MODE[+OP...] with a positive COUNT")
        mode, *keep = [part.strip() for part in body.split("+")]
        try:
            layer = LayerPlan(mode, frozenset(keep))
        except ValueError as e:
            raise ValueError(f"plan item {item!r}: {e}") from None
        layers += [layer] * int(count)
    if len(layers) != num_layers:
        raise ValueError(f"plan {spec!r} covers {len(layers)} layers, the model has {num_layers}")
    return tuple(layers)


def format_plan(layers) -> str:
    """The plan string of a sequence of ``LayerPlan``: one ``COUNT*MODE+OPS`` run per group."""
    runs = [(layer, len(list(group))) for layer, group in itertools.groupby(layers)]
    return ",".join(f"{n}*{layer}" if n > 1 else str(layer) for layer, n in runs)


def config_plan(config) -> tuple[LayerPlan, ...] | None:
    """The layers' plan that ``gradient_checkpointing: true`` means: every layer recomputed,
    offloaded with ``checkpoint_offload``, keeping attention with ``checkpoint_keep_attention``.
    None for ``false`` (no layer recomputed) and for ``"auto"`` (the plan is resolved at start,
    ``GPT.set_checkpoint_plan``)."""
    if config.gradient_checkpointing is not True:
        return None
    layer = LayerPlan("offload" if config.checkpoint_offload else "checkpoint",
                      frozenset({"attention"}) if config.checkpoint_keep_attention else frozenset())
    return (layer,) * config.num_hidden_layers


def memory_budget_bytes(budget: float, device: torch.device | str) -> int:
    """``GPTConfig.checkpoint_memory_budget`` in bytes: a fraction in (0, 1] of the device's
    memory (a GPU's total memory; the host's physical memory for a CPU), or GiB above 1."""
    if budget > 1:
        return int(budget * GIB)
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(budget * total)


def layer_parameters(config) -> dict[str, int]:
    """Weights of one decoder layer's four matmuls (q|k|v, o, gate|up, down) and its norms."""
    h, kv, inter = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    return dict(qkv=h * (h + 2 * kv), o=h * h, gate_up=2 * inter * h, down=inter * h, norms=2 * h)


def parameter_count(config) -> int:
    """The model's parameters (a tied LM head once), as ``GPT.num_params`` counts them."""
    per_layer = sum(layer_parameters(config).values())
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + config.hidden_size + embeddings


def training_state_bytes(config, world_size: int = 1, param_bytes: int = 4,
                         optimizer_bytes: int = 8) -> tuple[int, int]:
    """(weights and optimizer state, gradients) per process: ``param_bytes`` per parameter for
    the weights and for the gradients, ``optimizer_bytes`` per parameter (AdamW's two fp32
    moments), divided over ``world_size`` ranks when they are sharded (FSDP2; pass 1 for DDP).
    Gradients exist only from the backward pass to the optimizer step."""
    params = parameter_count(config)
    return params * (param_bytes + optimizer_bytes) // world_size, params * param_bytes // world_size


@dataclass(frozen=True)
class ActivationModel:
    """Bytes and cost of each layer plan for one micro-batch; see the module docstring.

    config: the ``GPTConfig``; tokens: micro_batch_size * seq_len; seq_len: for attention FLOPs.
    compute_bytes, residual_bytes: a and r; param_bytes: bytes per weight (4 for fp32 master
    weights); backend: "flash", "sdpa" or "eager"; fused: Triton RMSNorm/RoPE/SwiGLU;
    device_type: "cuda" or "cpu" (PyTorch's RMSNorm on a CPU also keeps its fp32 normalized
    input, r h per token per norm; on CUDA it is one kernel that keeps x and the inverse RMS).
    flops_per_byte: the exchange rate of elementwise bytes into FLOPs in the cost.
    """

    config: object
    tokens: int
    seq_len: int
    compute_bytes: int = 2
    residual_bytes: int = 4
    param_bytes: int = 4
    backend: str = "flash"
    fused: bool = True
    device_type: str = "cuda"
    flops_per_byte: float = 300.0
    per_token: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        c = self.config
        a, r = self.compute_bytes, self.residual_bytes
        h, kv, inter = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size
        heads = c.num_attention_heads
        attention = 4 * heads  # the fp32 lse; eager attention keeps (heads, seqlen) probabilities per query
        if self.backend == "eager":
            attention += heads * self.seq_len * (4 + a)
        norm = 4 + (r * h if not self.fused and self.device_type != "cuda" else 0)  # inverse RMS (+ normalized x)
        mlp = norm + a * h + (3 if self.fused else 4) * a * inter  # normed input, gate|up, silu(gate), product
        terms = dict(
            input=r * h,
            attn_half=norm + a * h + a * (h + 2 * kv) + a * h + attention,
            mid=r * h,
            mlp_half=0 if self.chunked_mlp else mlp,
            mlp_recompute=mlp,
            attention=a * h + 4 * heads,
            qkv=a * (h + 2 * kv),
            gate_up=2 * a * inter,
            saved_input=2 * h if (c.checkpoint_dtype == "bfloat16" and r > 2) else r * h,
            # In flight in the backward pass: the gradients of the layer's output and input, and
            # the larger of the MLP's (its product and gate|up, per MLP token: a chunk of them
            # when chunked) and the attention half's (q, k, v, the output and the normed input).
            grads=2 * r * h,
            mlp_grads=3 * a * inter,
            attn_grads=a * (3 * h + 2 * kv),
        )
        object.__setattr__(self, "per_token", terms)

    @property
    def chunked_mlp(self) -> bool:
        return 0 < self.config.mlp_chunk_size < self.tokens

    @property
    def autocast(self) -> bool:
        return self.compute_bytes < self.param_bytes

    def _weights(self, keys):
        params = layer_parameters(self.config)
        return self.compute_bytes * sum(params[k] for k in keys)

    def whole_layer_bytes(self) -> int:
        """Bytes a whole layer keeps from its forward to its backward pass."""
        t = self.per_token
        per_token = t["input"] + t["attn_half"] + t["mid"] + t["mlp_half"]
        # The compute-dtype copies of the concatenated weights (the chunked MLP recomputes its own).
        weights = self._weights(["qkv"] + ([] if self.chunked_mlp else ["gate_up"]))
        return self.tokens * per_token + weights + self.weight_cache_bytes()

    def weight_cache_bytes(self) -> int:
        """The o_proj and down_proj weights autocast casts and caches until the forward ends."""
        return self._weights(["o", "down"]) if self.autocast else 0

    def kept_bytes(self, layer: LayerPlan) -> int:
        """Bytes ``layer`` keeps on the device from its forward to its backward pass."""
        if not layer.recomputed:
            return self.whole_layer_bytes()
        t = self.per_token
        per_token = (t["saved_input"] if layer.mode == "checkpoint" else 0) + sum(t[k] for k in self.kept_ops(layer))
        return self.tokens * per_token

    def kept_ops(self, layer: LayerPlan) -> frozenset[str]:
        """The ops ``layer`` really keeps: other attention backends than flash recompute."""
        return layer.keep if self.backend == "flash" else layer.keep - {"attention"}

    def host_bytes(self, layer: LayerPlan) -> int:
        """Bytes ``layer`` keeps in host memory (an offloaded input)."""
        return self.tokens * self.per_token["saved_input"] if layer.mode == "offload" else 0

    def working_bytes(self, layer: LayerPlan) -> int:
        """Bytes alive during ``layer``'s backward pass beyond what the layers below it keep and
        the parameter gradients: its activations (kept, or recomputed) and gradients in flight."""
        t = self.per_token
        # A chunked MLP recomputes and differentiates one chunk at a time, in either mode.
        mlp_tokens = self.config.mlp_chunk_size if self.chunked_mlp else self.tokens
        grads = self.tokens * t["grads"] + max(mlp_tokens * t["mlp_grads"], self.tokens * t["attn_grads"])
        mlp = t["mlp_recompute"] * mlp_tokens / self.tokens
        if not layer.recomputed:
            return self.whole_layer_bytes() + grads + (int(self.tokens * mlp) if self.chunked_mlp else 0)
        # Kept attention and gate|up results stand in for the recomputed ones; a kept q|k|v
        # product stays alive beside the rotated q and k made from it.
        per_token = t["input"] + t["attn_half"] + t["mid"] + mlp + (t["qkv"] if "qkv" in layer.keep else 0)
        return int(self.tokens * per_token) + self._weights(["qkv", "gate_up", "o", "down"]) + grads

    def outside_layers_bytes(self) -> tuple[int, int, int]:
        """(kept, forward transient, backward transient) bytes of the RoPE tables, the final
        norm and the loss: kept from the end of the forward pass until the loss's backward is
        done, the loss's peak on top of that in the forward pass, and in its backward pass."""
        c, n, a, r, p = self.config, self.tokens, self.compute_bytes, self.residual_bytes, self.param_bytes
        vocab, h = c.vocab_size, c.hidden_size
        lm_head_cast = vocab * h * a if self.autocast else 0
        kept = 4 * c.head_dim * self.seq_len + n * (r * h + 4)  # cos and sin; the final norm's input
        if c.loss_chunk_size > 0 or c.loss_impl == "liger":
            # The gradients of the hidden states and of the LM head are computed in the forward
            # pass, a chunk of logits at a time; the backward pass scales them into new tensors.
            chunk = min(n, c.loss_chunk_size or 4096)
            kept += n * r * h + vocab * h * p
            forward = chunk * vocab * (2 * a + 4) + lm_head_cast
            backward = n * r * h + vocab * h * p
        else:
            # fp32 log-probabilities, the LM head's input in the compute dtype and its weight.
            kept += n * vocab * 4 + n * a * h + lm_head_cast
            forward = n * vocab * (a + 4)
            backward = n * vocab * (a + 4) + vocab * h * p
        return kept, forward, backward

    def forward_flops(self) -> dict[str, float]:
        """FLOP-equivalents of one layer's forward pass, by part (matmuls, attention, elementwise)."""
        c, n, a, r = self.config, self.tokens, self.compute_bytes, self.residual_bytes
        params = layer_parameters(c)
        h, kv, inter = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size
        window = c.sliding_window
        keys = self.seq_len / 2  # keys a query sees on average, as in GPT.flops_per_token
        if window and window < self.seq_len:
            keys = window - window * (window - 1) / (2 * self.seq_len)
        elementwise_bytes = (2 * (r + a) * h          # two norms
                             + 2 * a * (h + kv) + 2 * a * kv  # RoPE on q and k, the copy of v
                             + 2 * (2 * r + a) * h)   # two residual adds
        return dict(qkv=2 * n * params["qkv"], attention=4 * n * h * keys, o=2 * n * params["o"],
                    gate_up=2 * n * params["gate_up"], down=2 * n * params["down"],
                    swiglu=n * 3 * a * inter * self.flops_per_byte,
                    elementwise=n * elementwise_bytes * self.flops_per_byte)

    def recompute_cost(self, layer: LayerPlan) -> float:
        """FLOP-equivalents ``layer`` recomputes in the backward pass. No recomputation ever
        runs the layer's last product (down_proj: only its gradient is needed,
        ``checkpointing.output_linear``). A whole layer recomputes nothing, unless its MLP is
        chunked: then the MLP's gate|up product and SwiGLU run again, a chunk at a time."""
        parts = self.forward_flops()
        if not layer.recomputed:
            return parts["gate_up"] + parts["swiglu"] if self.chunked_mlp else 0.0
        skipped = self.kept_ops(layer) | {"down"}
        cost = sum(v for k, v in parts.items() if k not in skipped)
        return cost * 1.01 if layer.mode == "offload" else cost


def estimate(layers, model: ActivationModel, state_bytes: int = 0, grad_bytes: int = 0) -> tuple[int, float]:
    """(estimated peak bytes, recompute cost) of the per-layer plan ``layers``.

    ``state_bytes`` (weights and optimizer state) count throughout; ``grad_bytes`` (all the
    parameter gradients) build up in the backward pass: the LM head's first, then each layer's
    as its backward pass ends.
    """
    c = model.config
    params = layer_parameters(c)
    layer_grad = grad_bytes * sum(params.values()) // max(parameter_count(c), 1)
    head_grad = grad_bytes - c.num_hidden_layers * layer_grad
    kept = [model.kept_bytes(layer) for layer in layers]
    # A whole layer's kept bytes hold its autocast weight cache; a recomputed layer's cache lives
    # until the forward pass ends.
    forward_cache = model.weight_cache_bytes() * sum(layer.recomputed for layer in layers)
    outside, loss_forward, loss_backward = model.outside_layers_bytes()
    peak = max(sum(kept) + forward_cache + outside + loss_forward,
               sum(kept) + outside + loss_backward + head_grad)
    below = sum(kept)
    for j in reversed(range(len(layers))):
        below -= kept[j]
        grads = head_grad + (len(layers) - j - 1) * layer_grad
        peak = max(peak, below + model.working_bytes(layers[j]) + grads)
    peak = max(peak, grad_bytes)
    return state_bytes + peak, sum(model.recompute_cost(layer) for layer in layers)


@dataclass(frozen=True)
class CheckpointPlan:
    """A per-layer plan and what the model says it costs.

    layers: one ``LayerPlan`` per layer; peak_bytes: estimated peak (state included);
    state_bytes: weights, optimizer state and gradients; budget_bytes: the budget it was
    planned for; recompute: FLOP-equivalents recomputed per sub-batch; forward: those of a
    plain forward pass of the layers on a sub-batch; fits: whether peak_bytes <= budget_bytes;
    split: the sub-batches each micro-batch runs as (``plan_split``; 1: the micro-batch whole).
    """

    layers: tuple[LayerPlan, ...]
    peak_bytes: int
    state_bytes: int
    budget_bytes: int
    recompute: float
    forward: float
    host_bytes: int = 0
    split: int = 1

    @property
    def recompute_share(self) -> float:
        """Recomputation per token, as a share of a forward pass of the layers."""
        return self.recompute / self.forward if self.forward else 0.0

    @property
    def spec(self) -> str:
        return format_plan(self.layers)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def describe(self) -> str:
        """A readable account of the plan, for the log at start."""
        lines = [f"activation checkpointing plan: {self.spec}"]
        start = 0
        for layer, group in itertools.groupby(self.layers):
            n = len(list(group))
            span = f"layer {start}" if n == 1 else f"layers {start}-{start + n - 1}"
            lines.append(f"  {span:<14} {_MEANING[layer.mode]}"
                         + (f", keeping {', '.join(k for k in KEEPS if k in layer.keep)}" if layer.keep else ""))
            start += n
        lines.append(f"  estimated peak {self.peak_bytes / GIB:.2f} GiB ({self.state_bytes / GIB:.2f} GiB weights, "
                     f"gradients and optimizer state) against a budget of {self.budget_bytes / GIB:.2f} GiB"
                     + ("" if self.fits else ": DOES NOT FIT, the plan with the least memory was chosen"))
        host = f"; {self.host_bytes / GIB:.2f} GiB of inputs in pinned host memory" if self.host_bytes else ""
        lines.append(f"  recomputed: {self.recompute_share:.0%} of a forward pass of the layers{host}")
        if self.split > 1:
            lines.append(f"  each micro-batch runs as {self.split} sub-batches, one after another (their "
                         f"gradients accumulate): each holds 1/{self.split} of the activations")
        return "\n".join(lines)


_MEANING = {"none": "whole (activations kept)", "checkpoint": "recomputed from its input",
            "offload": "recomputed from its input, kept in host memory"}


def candidate_layers(backend: str, allow_offload: bool) -> list[LayerPlan]:
    """Every layer plan the planner may choose among."""
    keeps = [k for k in KEEPS if k != "attention" or backend == "flash"]
    subsets = [frozenset(c) for n in range(len(keeps) + 1) for c in itertools.combinations(keeps, n)]
    modes = ["checkpoint"] + (["offload"] if allow_offload else [])
    return [LayerPlan("none")] + [LayerPlan(m, s) for m in modes for s in subsets]


def plan_checkpointing(config, seq_len: int, micro_batch_size: int, budget_bytes: int, dtype_bytes: int = 2, *,
                       residual_bytes: int = 4, param_bytes: int = 4, backend: str = "flash", fused: bool = True,
                       device_type: str = "cuda", allow_offload: bool = True,
                       state_bytes: tuple[int, int] | None = None, flops_per_byte: float = 300.0,
                       accumulating: bool = False) -> CheckpointPlan:
    """The per-layer plan with the least recomputation whose estimated peak fits the budget.

    Args:
        config: the ``GPTConfig`` (its mlp_chunk_size, loss_chunk_size and checkpoint_dtype
            are taken as set).
        seq_len, micro_batch_size: the shape of one micro-batch.
        budget_bytes: the peak memory the step may reach, state included.
        dtype_bytes: bytes of the compute dtype (2 for bf16 autocast, 4 for fp32).
        residual_bytes: bytes of the residual stream (4 under autocast over fp32 weights; 2
            when the weights themselves are bf16, as under FSDP2's bf16 policy).
        param_bytes: bytes of a master weight.
        backend: the resolved attention backend ("flash", "sdpa", "eager").
        fused: RMSNorm/RoPE/SwiGLU as Triton kernels.
        device_type: "cuda" or "cpu" (see ``ActivationModel``).
        allow_offload: may offload layer inputs to host memory (CUDA only: on a CPU it saves
            nothing).
        state_bytes: (weights and optimizer state, gradients) as ``training_state_bytes``
            returns them, its value for one process by default.
        flops_per_byte: see ``ActivationModel``.
        accumulating: several forward and backward passes make one step (gradient accumulation,
            or a split micro-batch): every pass after the first runs with all the gradients
            already held, so they count throughout, like the weights.

    Returns:
        A ``CheckpointPlan``. The candidates are plans whose first layers take one layer plan
        and the last k layers another (layer plans sorted by the memory they keep; every pair
        and every k): with identical layers the best mix of the layer plans on the lower
        convex hull of (memory, cost) uses at most two of them. Among the plans that fit it
        returns the one with the least recomputation, ties going to the smaller peak; if none
        fits, the one with the smallest peak, ties going to less recomputation (``fits`` is
        False). The choice is monotone: a
        larger budget never gives more recomputation or a smaller estimated peak.
    """
    model = ActivationModel(config, micro_batch_size * seq_len, seq_len, dtype_bytes, residual_bytes, param_bytes,
                            backend, fused, device_type, flops_per_byte)
    state, grads = training_state_bytes(config, 1, param_bytes) if state_bytes is None else state_bytes
    if accumulating:
        state, grads = state + grads, 0
    layers_n = config.num_hidden_layers
    candidates = _pareto(candidate_layers(backend, allow_offload), model)
    best = None
    for low, high in itertools.combinations_with_replacement(candidates, 2):
        for k in range(layers_n + 1 if low != high else 1):
            layers = (low,) * (layers_n - k) + (high,) * k
            spec = format_plan(layers)
            peak, cost = estimate(layers, model, state, grads)
            fits = peak <= budget_bytes
            key = (not fits, cost, peak, spec) if fits else (True, peak, cost, spec)
            if best is None or key < best[0]:
                best = (key, layers, peak, cost)
    _, layers, peak, cost = best
    forward = sum(model.forward_flops().values()) * layers_n
    host = sum(model.host_bytes(layer) for layer in layers)
    return CheckpointPlan(layers, peak, state + grads, budget_bytes, cost, forward, host)


def plan_split(config, seq_len: int, micro_batch_size: int, budget_bytes: int, *,
               min_tokens: int = MIN_SPLIT_TOKENS, **kwargs) -> CheckpointPlan:
    """The plan and the split of the micro-batch into sub-batches (see the module's notes).

    Tries every divisor of ``micro_batch_size`` whose sub-batches keep ``min_tokens`` tokens,
    fewest sub-batches first, planning each with ``plan_checkpointing`` (``kwargs`` go
    to it). A split that fits beats one that does not; among those that fit, more sub-batches
    are taken only if they cut the recomputation by ``MIN_SPLIT_GAIN`` of a forward pass per
    token; if none fits, the plan with the smallest peak. Returns the ``CheckpointPlan`` of the
    chosen sub-batch, with its ``split``.
    """
    accumulating = kwargs.pop("accumulating", False)
    best = None
    for split in range(1, micro_batch_size + 1):
        rows = micro_batch_size // split
        if micro_batch_size % split or (split > 1 and rows * seq_len < min_tokens):
            continue
        plan = dataclasses.replace(plan_checkpointing(config, seq_len, rows, budget_bytes,
                                                      accumulating=accumulating or split > 1, **kwargs), split=split)
        if best is None or (plan.fits and not best.fits):
            best = plan
        elif plan.fits and plan.recompute_share < best.recompute_share - MIN_SPLIT_GAIN:
            best = plan
        elif not plan.fits and not best.fits and plan.peak_bytes < best.peak_bytes:
            best = plan
    return best


def _pareto(layers: list[LayerPlan], model: ActivationModel) -> list[LayerPlan]:
    """The layer plans no other beats on both kept memory and recompute cost, by memory."""
    scored = sorted(((model.kept_bytes(lp), model.recompute_cost(lp), str(lp)), lp) for lp in layers)
    front, best_cost = [], math.inf
    for (_, cost, _), lp in scored:
        if cost < best_cost:
            front.append(lp)
            best_cost = cost
    return front


_MIXED_PRECISION_BYTES = {"bf16": (2, 4), "fp16": (2, 4), "no": (4, 4)}


def plan_for_training(model, *, seq_len: int, micro_batch_size: int, device, mixed_precision: str = "bf16",
                      world_size: int = 1, sharded: bool = False, budget_bytes: int | None = None,
                      split: bool = False, grad_accum_steps: int = 1) -> CheckpointPlan:
    """Resolve ``gradient_checkpointing: auto`` for a training run and set the plan on ``model``.

    Args:
        model: the unwrapped ``GPT`` (before FSDP2 or DDP wraps it).
        seq_len, micro_batch_size: the run's micro-batch.
        device: where it trains; its memory is what a fractional budget is a fraction of.
        mixed_precision: Accelerate's "bf16", "fp16" or "no".
        world_size, sharded: processes, and whether FSDP2 shards the weights, gradients and
            optimizer state over them (then the layers also compute in the compute dtype).
        budget_bytes: the memory the plan must fit, in place of the config's
            ``checkpoint_memory_budget`` (the memory sweep matches another run's peak with it).
        split: may run each micro-batch as sub-batches (``plan_split``); the caller runs them.
        grad_accum_steps: micro-batches per optimizer step; above 1 the gradients are held
            through every pass after the first (``plan_checkpointing``'s ``accumulating``).

    Returns:
        The ``CheckpointPlan`` now set on the model (its ``split``: the sub-batches per
        micro-batch); ``describe()`` is the text to log.
    """
    config = model.config
    device = torch.device(device)
    compute, residual = _MIXED_PRECISION_BYTES[mixed_precision]
    if sharded and compute < residual:
        residual = compute  # FSDP2's bf16 weights: no autocast, the residual stream is bf16 too
    backend = model.attn_backend(device)
    fused = config.fused_ops == "triton" or (config.fused_ops == "auto" and device.type == "cuda")
    state = training_state_bytes(config, world_size if sharded else 1)
    if budget_bytes is None:
        budget_bytes = memory_budget_bytes(config.checkpoint_memory_budget, device)
    planner = plan_split if split else plan_checkpointing
    plan = planner(config, seq_len, micro_batch_size, budget_bytes, dtype_bytes=compute, residual_bytes=residual,
                   backend=backend, fused=fused, device_type=device.type, allow_offload=device.type == "cuda",
                   state_bytes=state, accumulating=grad_accum_steps > 1)
    model.set_checkpoint_plan(plan.layers)
    return plan
