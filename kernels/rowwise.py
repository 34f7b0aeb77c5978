"""Host-side helpers shared by the launchers of the row-wise kernels (RMSNorm, SwiGLU, RoPE).

These kernels treat a tensor as rows of its last dimension: the last dimension must have unit
stride, the rows may have any stride. The helpers check inputs with messages that name the
function and the argument, view tensors as rows without copying when they can, and size the
launches.
"""

import contextlib
import functools

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreted(kernel):
    """True when ``kernel`` runs under the Triton CPU interpreter (``TRITON_INTERPRET=1``)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_float_tensor(fn, name, t, min_dim=1):
    """Raise unless ``t`` is a tensor of at least ``min_dim`` dimensions in fp16, bf16 or fp32."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name}.dtype={t.dtype} is not supported; use torch.float16, "
                        "torch.bfloat16 or torch.float32")
    if t.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(t.shape)}")


def check_runnable(fn, kernel, **tensors):
    """Raise unless the named tensors share one device on which ``kernel`` can run: CUDA, or
    the CPU under the Triton interpreter."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        placed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{fn}: the inputs must be on one device, got {placed}")
    device = next(iter(devices.values()))
    if device.type == "cuda" or (device.type == "cpu" and is_interpreted(kernel)):
        return
    raise ValueError(f"{fn}: the inputs are on {device}, where the Triton kernel cannot run; move "
                     "them to a GPU, use fused_ops='torch' in the model config, or set "
                     "TRITON_INTERPRET=1 before importing flashlm to run the (slow) Triton "
                     "interpreter on the CPU")


def as_rows(t):
    """``t`` as a 2-D (rows, last dim) tensor with unit last stride: a view when possible."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def device_ctx(t):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def num_warps(block_elements):
    """Warps for a program that holds ``block_elements`` values: about eight values per thread
    (16-byte vector accesses in 16-bit dtypes), from 1 to 16 warps."""
    return min(max(block_elements // 256, 1), 16)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def loop_programs(device):
    """How many programs a kernel that loops over rows (accumulating per-program partial
    sums) launches: eight per SM, so a few run per SM at once and the waves that follow keep
    the tail short. Under the interpreter a small fixed number, so tests still split the work."""
    if device.type != "cuda":
        return 4
    return 8 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
