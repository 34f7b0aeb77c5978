"""Host-side helpers shared by the kernels' launchers: one place for each check and constant.

- ``is_interpreted``: whether a kernel runs under the Triton CPU interpreter
  (``TRITON_INTERPRET=1``), where tests run and CPU tensors are allowed.
- ``check_float_tensor``, ``check_runnable``: input checks whose messages name the function,
  the argument and the way out.
- ``device_ctx``: launch on a tensor's GPU (Triton launches on the current device).
- ``unit_last``, ``as_rows``: views with unit stride along the last dimension, copied only when
  they cannot be had in place.
- ``num_warps``, ``sm_count``, ``loop_programs``: launch sizes.
- ``LOG2E``, ``FLOAT_DTYPES``: the constants the kernels share.

Importing it also mends one interpreter bug of older Triton (`_mend_old_interpreter`).

The kernels are imported as ``flashlm.kernels.<op>`` and nothing else: this module refuses to
load under another name (e.g. ``kernels.utils`` with the repository root on ``sys.path``), since
a second copy of the ops would register the ``flashlm::`` torch custom ops a second time.
"""

import contextlib
import functools
import os

import torch
import triton

if __name__ != "flashlm.kernels.utils":
    raise ImportError(f"flashlm's kernels must be imported as flashlm.kernels.<op>, not as "
                      f"{__name__.rsplit('.', 1)[0]}.<op>: a second copy would register the "
                      "flashlm:: torch ops twice. Install flashlm (pip install -e .) and import "
                      "flashlm.kernels")



def _mend_old_interpreter():
    """Triton before 3.9 interprets a scalar (a program id, a loop bound) as a one-element
    array and converts it to a Python int with ``int(array)``, which numpy 2.4 refuses for
    arrays that are not 0-d: every ``range(lo, hi, BLOCK)`` over computed bounds then fails.
    Under the interpreter on such a Triton, the conversion squeezes the array first, as newer
    Triton does. Compiled kernels are not touched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9):
        return
    import triton.runtime.interpreter as interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:  # an interpreter laid out otherwise: leave it as it is
        return

    def patch_with_squeeze(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_squeeze


_mend_old_interpreter()

# exp(x) = exp2(x * LOG2E): the kernels fold it into the softmax scale and use exp2.
LOG2E = 1.4426950408889634
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The way around the elementwise kernels (RMSNorm, RoPE, SwiGLU) that `check_runnable` names.
FUSED_OPS_FALLBACK = "use fused_ops='torch' in the model config"


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


def check_runnable(fn, kernel, fallback=None, **tensors):
    """Raise unless the named tensors share one device on which ``kernel`` can run: CUDA, or
    the CPU under the Triton interpreter. ``fallback`` names the non-Triton way out, if any."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        placed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{fn}: the inputs must be on one device, got {placed}")
    device = next(iter(devices.values()))
    if device.type == "cuda" or (device.type == "cpu" and is_interpreted(kernel)):
        return
    ways = "move them to a GPU, " + (f"{fallback}, " if fallback else "")
    raise ValueError(f"{fn}: the inputs are on {device}, where the Triton kernel cannot run; "
                     f"{ways}or set TRITON_INTERPRET=1 before importing flashlm to run the "
                     "(slow) Triton interpreter on the CPU")


def device_ctx(t):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def unit_last(t):
    """``t`` itself when its last dimension has unit stride, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t):
    """``t`` as a 2-D (rows, last dim) tensor with unit last stride: a view when possible."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def num_warps(block_elements):
    """Warps for a program that holds ``block_elements`` values: about eight values per thread
    (16-byte vector accesses in 16-bit dtypes), from 1 to 16 warps."""
    return min(max(block_elements // 256, 1), 16)


def sm_count(device):
    """Streaming multiprocessors of the CUDA ``device`` (the current one when it has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def loop_programs(device):
    """How many programs a kernel that loops over rows (accumulating per-program partial
    sums) launches: eight per SM, so a few run per SM at once and the waves that follow keep
    the tail short. Under the interpreter a small fixed number, so tests still split the work."""
    if device.type != "cuda":
        return 4
    return 8 * sm_count(device)
