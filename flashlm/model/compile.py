"""Regional ``torch.compile`` of the decoder blocks: each residual half of a ``Block``
(``attention_half``: norm, q|k|v, RoPE, attention, o_proj, residual add; ``mlp_half``: norm,
gate|up, SwiGLU, down_proj, residual add) is one compiled region, shared by every block.

Why the halves and not ``Block.forward``: the layer paths around them (activation
checkpointing, the chunked MLP, CPU offload, the layer tapes) are autograd Functions whose
backward passes call ``torch.autograd.grad`` and keep Python state; they stay eager, and call
the compiled halves in the forward pass and again in the recomputation, so every path (whole,
checkpointed, offloaded, chunked) runs the same compiled code. A half with a taped op (a
checkpointed layer that keeps its attention output or a projection's product) runs eagerly,
since the tape's record and replay are Python side effects.

What is in the graph: flash attention is a torch custom op with a fake implementation
(``flashlm::flash_attn_fwd``/``_bwd``), opaque to the compiler; SDPA and the PyTorch
RMSNorm/RoPE/SwiGLU compositions are traced and fused by Inductor. The Triton RMSNorm, RoPE and
SwiGLU kernels (``fused_ops: triton``) are autograd Functions that launch user-defined Triton
kernels, not custom ops: Dynamo traces those launches on CUDA (checked on the GPU by
tests/test_speed_levers.py), but not under the CPU interpreter, whose kernels it cannot see.

Shapes: ``dynamic=True``: each half compiles once with its batch and sequence dimensions
symbolic (parameters stay static, and dimensions of size 1 are specialized), so a ladder of
lengths, the eval batches and the chunked MLP's last chunk reuse one graph per half, grad mode
(a checkpointed layer's forward runs without one) and input rank (the chunked MLP's pieces are
flat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from flashlm.model.checkpointing import current_layer_tape
from flashlm.model.model import attention_half, mlp_half


def compile_enabled(config, device) -> bool:
    """Whether ``config.compile`` asks for compiled blocks on ``device``: true, or "auto" on CUDA."""
    return config.compile is True or (config.compile == "auto" and torch.device(device).type == "cuda")


@dataclass(frozen=True)
class CompiledHalves:
    """The two compiled halves every block of a model calls (``Block.compiled``)."""

    attention_half: Callable[..., Any]
    mlp_half: Callable[..., Any]

    @staticmethod
    def runs_attention(mask) -> bool:
        """Whether the attention half may run compiled: not taped, not already being compiled,
        and not split over ranks (context parallelism communicates inside attention)."""
        if torch.compiler.is_compiling() or (mask is not None and mask.context_parallel is not None):
            return False
        tape = current_layer_tape()
        return tape is None or not ({"attention", "qkv"} & tape.keep)

    @staticmethod
    def runs_mlp() -> bool:
        """Whether the MLP half may run compiled: not taped, not already being compiled."""
        if torch.compiler.is_compiling():
            return False
        tape = current_layer_tape()
        return tape is None or "gate_up" not in tape.keep


def compile_blocks(model, backend: str = "inductor", mode: str | None = None, fullgraph: bool = True,
                   dynamic: bool | None = True) -> CompiledHalves:
    """Compile the two residual halves once and make every block of ``model`` call them.

    Args:
        model: a ``GPT`` (before or after FSDP2 wraps its blocks: the halves are called from
            inside ``Block.__call__``).
        backend, mode, dynamic: as in ``torch.compile`` ("eager" or "aot_eager" for fast CPU
            tests).
        fullgraph: a graph break is an error (the default), not a silent slowdown.

    Returns:
        The ``CompiledHalves`` set on each block; ``uncompile_blocks`` undoes it.
    """
    options = dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    halves = CompiledHalves(torch.compile(attention_half, **options), torch.compile(mlp_half, **options))
    for block in model.layers:
        block.compiled = halves
    return halves


def uncompile_blocks(model) -> None:
    """Make every block of ``model`` run its halves eagerly again."""
    for block in model.layers:
        block.compiled = None
