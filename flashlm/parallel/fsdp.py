"""FSDP2 for flashlm's ``GPT``: sharding, the full weights back, and what a rank holds in memory.

``apply_fsdp(model, mesh, mp_policy)`` turns a plain model into a sharded one in place, as
torchtitan's parallelize functions do: every ``Block`` becomes one ``fully_shard`` unit, and the
root unit holds the rest (embedding, final norm, LM head; a tied LM head is the embedding's own
parameter, so it lives in one unit). Each parameter is a ``DTensor`` sharded on dim 0 over the
mesh. A unit's parameters are all-gathered in its forward pre-hook and freed after its forward,
all-gathered again in its pre-backward hook, and its gradients are reduce-scattered when its
backward is done; the next unit's all-gather is prefetched meanwhile.

The model needs nothing for this: every per-layer path (plain, chunked MLP, checkpointed with
bf16 or offloaded inputs and kept attention) runs inside ``Block.__call__``, so the layer sees
its unsharded parameters in the forward pass, and a checkpointed layer's recomputation in the
backward pass runs after the pre-backward hook has gathered them again.

Precision (``mixed_precision_policy``): bf16 compute with fp32 master weights, fp32 gradients
and an fp32 reduce-scatter. Under this policy the layers compute on bf16 parameters, so no
autocast is needed; the RoPE tables are not cast (``cast_forward_inputs=False``) and stay fp32.

Gradient clipping on sharded parameters takes the global norm: each rank's partial sum of
squares is all-reduced in fp32 (``torch.nn.utils.get_total_norm`` on DTensor gradients, which
Accelerate's ``clip_grad_norm_`` calls), never a per-shard norm.

Training through Accelerate: the launch config asks for FSDP2 (``distributed_type: FSDP``,
``fsdp_version: 2``: ``recipes/accelerate/fsdp2.yaml``, ``cpu_2proc_fsdp2.yaml``) and
``fsdp2_enabled`` reads that request; the loop then shards the model itself with
``apply_fsdp`` before building the optimizer, and ``prepare_sharded`` hands both to Accelerate.
flashlm shards rather than Accelerate's plugin because Accelerate 1.16 (a) turns FSDP on only
for GPU-like backends: a CPU launch of an FSDP config runs as plain multi-CPU DDP, and (b) its
FSDP2 policy reduces gradients in the compute dtype (bf16), not fp32. Accelerate's
``clip_grad_norm_`` (the global norm over DTensor gradients), ``backward`` and ``reduce`` work on
the sharded model either way; checkpoints go through ``flashlm.training.sharded_checkpoint``
(Accelerate's own layout, written the same way on CPU and GPU).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from flashlm.model import GPT
from flashlm.profiling import LiveTensorBytes

_COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """FSDP2's precision for Accelerate's ``mixed_precision`` ("no", "bf16" or "fp16").

    "bf16"/"fp16": parameters all-gathered and used in that dtype, gradients reduce-scattered
    and kept in fp32 (the master weights and the optimizer stay fp32). "no": fp32 throughout.
    Floating-point layer inputs are never cast, so the fp32 RoPE tables keep their precision.
    """
    if mixed_precision not in _COMPUTE_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected one of {sorted(_COMPUTE_DTYPES)}")
    compute = _COMPUTE_DTYPES[mixed_precision]
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=None if compute is None else torch.float32,
                                cast_forward_inputs=False)


def apply_fsdp(model: GPT, mesh, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True) -> GPT:
    """Shard ``model`` in place with FSDP2: one unit per decoder block, plus the root.

    Args:
        model: a plain ``GPT`` (not yet sharded) on ``mesh``'s device type.
        mesh: a 1-D ``DeviceMesh`` of the ranks that shard the parameters: the data-parallel
            ranks, or with context parallelism the flattened data-shard x context-parallel mesh
            (every rank of it holds a shard, as in torchtitan).
        mp_policy: ``mixed_precision_policy(...)``; None: fp32.
        reshard_after_forward: free each block's gathered parameters after its forward pass
            (gathered again for the backward pass). The last block keeps them, since the
            backward pass starts with it; the root always keeps its own.

    Returns:
        ``model`` itself, now also an ``FSDPModule``.
    """
    if is_sharded(model):
        raise ValueError("apply_fsdp: the model is already sharded")
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp: mesh must be 1-D (the data-parallel ranks), got {mesh.ndim}-D {mesh}")
    mp_policy = mp_policy or mixed_precision_policy("no")
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward and i < last)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def is_sharded(model) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``apply_fsdp``)."""
    return isinstance(model, FSDPModule)


def fsdp2_enabled(accelerator) -> bool:
    """Whether this run was launched to train with FSDP2: Accelerate's FSDP2 is on (a GPU
    launch), or the launcher asked for it (``ACCELERATE_USE_FSDP`` and ``FSDP_VERSION=2``, set by
    ``accelerate launch`` from the config) on a backend that Accelerate runs as plain multi-CPU."""
    if accelerator.is_fsdp2:
        return True
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return requested and os.environ.get("FSDP_VERSION", "1") == "2" and accelerator.num_processes > 1


def data_parallel_mesh(accelerator):
    """A 1-D ``DeviceMesh`` over all of ``accelerator``'s processes, on its device type."""
    return init_device_mesh(accelerator.device.type, (accelerator.num_processes,), mesh_dim_names=("dp_shard",))


def prepare_sharded(accelerator, model, optimizer):
    """``accelerator.prepare`` for a model that ``apply_fsdp`` sharded and its optimizer.

    Under Accelerate's FSDP2 both go in (it keeps the sharded model as it is and switches its
    ``no_sync`` to FSDP's); on a multi-CPU backend only the optimizer does, since Accelerate
    would wrap DDP around the model. Returns (model, optimizer).
    """
    if accelerator.is_fsdp2:
        return accelerator.prepare(model, optimizer)
    return model, accelerator.prepare(optimizer)


def all_finite(tensors) -> bool:
    """Whether every element of ``tensors`` is finite (no NaN or inf). Sharded tensors (DTensor)
    are checked shard by shard and the verdict all-reduced over their mesh: a collective when
    any tensor is sharded, which every rank must call with the same tensors."""
    tensors = list(tensors)
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    # One device for the verdicts (an optimizer's step counts may sit on the CPU), the
    # accelerator's when there is one: the one its collectives run on.
    device = next((t.device for t in local if t.device.type != "cpu"), torch.device("cpu"))
    verdict = torch.ones((), dtype=torch.int32, device=device)
    if local:
        verdict = torch.stack([t.isfinite().all().to(device) for t in local]).all().to(torch.int32)
    for mesh in {t.device_mesh for t in tensors if isinstance(t, DTensor)}:
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=mesh.get_group())
    return bool(verdict)


def full_state_dict(model, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's full (gathered) weights as plain tensors, by parameter name.

    A collective: every rank of a sharded model must call it. With ``rank0_only`` the tensors
    come to rank 0's CPU memory and the other ranks get an empty dict; otherwise every rank gets
    them on the model's device. A plain model's own weights come back as they are.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model) -> GPT | None:
    """A plain fp32 ``GPT`` on the CPU with ``model``'s full weights, for export and evaluation
    in one process. A collective for a sharded model: rank 0 gets the copy, the others None."""
    state = full_state_dict(model, rank0_only=is_sharded(model))
    if not state:
        return None
    plain = GPT(model.config)
    plain.load_state_dict({name: t.float() for name, t in state.items()})
    return plain


@dataclass
class MemoryReport:
    """Bytes one rank holds: its shards of the weights, gradients and optimizer state, and the
    activations a forward pass kept for backward (None when not measured)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int | None = None

    def summary(self) -> str:
        terms = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer)]
        if self.activations is not None:
            terms.append(("activations", self.activations))
        return ", ".join(f"{name} {value / 2**30:.3f} GiB" for name, value in terms)


def _local_bytes(t) -> int:
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def memory_report(model, optimizer=None, activations: int | None = None) -> MemoryReport:
    """What this rank holds for ``model`` and ``optimizer`` right now, counting only its local
    shards of sharded tensors (a tied weight once). ``activations``: bytes measured with
    ``activation_memory``."""
    params = list(model.parameters())
    state = optimizer.state.values() if optimizer is not None else ()
    return MemoryReport(
        weights=sum(_local_bytes(p) for p in params),
        gradients=sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        optimizer=sum(_local_bytes(v) for s in state for v in s.values() if isinstance(v, torch.Tensor)),
        activations=activations,
    )


class _Measured:
    bytes: int | None = None


@contextlib.contextmanager
def activation_memory(device: torch.device):
    """Measures the bytes that the code inside leaves allocated on ``device``, e.g. what a forward
    pass keeps for its backward pass; read ``.bytes`` after the block.

    On CUDA, the change in allocated memory; on the CPU, the storages created inside and still
    alive (``LiveTensorBytes``), so only tensors the block made are counted.

        with activation_memory(device) as kept:
            loss = model(**batch).loss
        memory_report(model, optimizer, activations=kept.bytes)
    """
    measured = _Measured()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        yield measured
        measured.bytes = torch.cuda.memory_allocated(device) - before
        return
    with LiveTensorBytes() as meter:
        yield measured
    measured.bytes = meter.current
