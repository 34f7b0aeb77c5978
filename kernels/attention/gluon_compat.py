"""The Gluon names that the Hopper attention kernels (``hopper_fwd.py``, ``hopper_bwd.py``) use,
the same on every triton that has Gluon.

Gluon ships with triton >= 3.5; on older tritons ``gluon`` is None, `available` is False and
the Hopper kernels are never taken. Between triton 3.6 (the GPU machine's) and the newest:

- the TMA copies are ``tma.async_copy_global_to_shared`` / ``async_copy_shared_to_global`` in
  3.6 and ``tma.async_load`` / ``async_store`` later (the old names then raise): `tma_load`,
  `tma_store`;
- the barrier over a partition's warps is ``gl.thread_barrier`` in 3.6 and ``gl.barrier``
  later: `sync_warps`;
- the TMA reduce-add is ``tma.async_atomic_add`` in newer tritons; 3.6 has the operation but
  no Python wrapper, so it is built here from the IR builder: `tma_add`.
"""

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401 (re-exported)
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
except ImportError:  # pragma: no cover - depends on the installed triton
    gluon = None


def available():
    """Whether this triton has Gluon (and so the Hopper kernels can be built)."""
    return gluon is not None


if gluon is not None:
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin

    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    sync_warps = getattr(gl, "barrier", None) or gl.thread_barrier

    @builtin
    def _tma_add_36(tensor_desc, coord, src, _semantic=None):
        """TMA reduce-add of a shared-memory tile into global memory (triton 3.6)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                  tensor_desc.handle, coord, src.handle)

    tma_add = getattr(tma, "async_atomic_add", None) or _tma_add_36
