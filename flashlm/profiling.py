"""Profiling helpers for tests and sweeps: memory accounting that works without a GPU."""

import re
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created inside the ``with`` block and still alive, and
    their peak: on a CPU, a stand-in for ``torch.cuda.max_memory_allocated`` (which counts the
    same storages, rounded up to the allocator's blocks). Tensors created before the block
    (parameters, say) are not counted; views share their base's storage and count once.

        with LiveTensorBytes() as meter:
            model(input_ids, labels=input_ids).loss.backward()
        meter.peak, meter.current
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live = {}

    def _free(self, key):
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._live and storage.nbytes():
                    self._live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


# Dense bf16 tensor-core peaks, FLOP/s per device, for MFU. Checked in order: "H100 PCIe"
# before "H100".
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device that MFU is measured against; None on other
    devices and on GPUs not in ``PEAK_BF16_FLOPS``."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


# What a kernel (or, on a CPU, an operator) does, from its name: the first pattern that matches.
# Names seen on Hopper: cuBLAS (nvjet, sm90_xmma, cutlass), flashlm's Triton and Gluon kernels,
# liger-kernel's, SDPA's (flash, cuDNN), Inductor's fused kernels and ATen's elementwise ones.
KERNEL_CATEGORIES = [
    ("attention", re.compile(r"attn|flash|fmha|sdpa|scaled_dot_product|hopper_(fwd|bwd)|bwd_preprocess", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|wgmma|^aten::(mm|addmm|bmm|matmul|linear)$", re.I)),
    ("loss", re.compile(r"cross_entropy|element_mul_kernel|log_softmax|nll_loss", re.I)),
    ("norm", re.compile(r"rms_?norm|layer_norm", re.I)),
    ("rope", re.compile(r"rope|rotary", re.I)),
    ("activation", re.compile(r"swiglu|silu|gelu", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("compiled", re.compile(r"^triton_(poi|red|per)_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|fill|^aten::(cat|to|_to_copy|contiguous|clone|zero_|index.*)$", re.I)),
    ("elementwise", re.compile(r"elementwise|reduce_kernel|^aten::", re.I)),
]


def kernel_category(name: str) -> str:
    """``KERNEL_CATEGORIES``' name for a kernel or operator name; "other" when none matches."""
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def _union_us(intervals):
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def time_breakdown(profile, steps: int, top: int = 12) -> dict:
    """Where a profiled run's device time goes, per step, from a ``torch.profiler.profile`` of
    ``steps`` steps: milliseconds by ``kernel_category``, the busy time (the union of the
    kernels' intervals, so overlapping streams count once) and the ``top`` kernels by time.
    With CUDA in the profile the kernels are the device events; on a CPU, the operators' own
    time stands in for them (busy time is then their sum)."""
    # Device events are the kernels, copies and fills; the ranges record_function draws on the
    # GPU's timeline (Optimizer.step, say) are annotations that span other kernels: left out.
    events = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False)]
    averages = profile.key_averages()
    if events:
        source = "cuda kernels"
        spans = [(e.name, e.time_range.end - e.time_range.start, 1) for e in events]
        busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in events])
    elif any(getattr(e, "self_device_time_total", 0) > 0 for e in averages):
        # Kernels not listed as events of their own (a profiler version that only attributes
        # them): each operator's own device time.
        source = "cuda time by operator"
        spans = [(e.key, e.self_device_time_total, e.count) for e in averages if e.self_device_time_total > 0]
        busy_us = sum(us for _, us, _ in spans)
    else:
        source = "cpu operators"
        spans = [(e.key, e.self_cpu_time_total, e.count) for e in averages if e.self_cpu_time_total > 0]
        busy_us = sum(us for _, us, _ in spans)
    by_category, by_name = {}, {}
    for name, us, count in spans:
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + us
        total, calls = by_name.get(name, (0.0, 0))
        by_name[name] = (total + us, calls + count)
    ms = 1e-3 / steps
    heaviest = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {"steps": steps, "source": source,
            "busy_ms": busy_us * ms,
            "category_ms": {c: t * ms for c, t in sorted(by_category.items(), key=lambda item: -item[1])},
            "top": [{"name": name[:120], "category": kernel_category(name), "ms": t * ms, "calls": n / steps}
                    for name, (t, n) in heaviest]}
