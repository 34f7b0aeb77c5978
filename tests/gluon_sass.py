"""Compile flashlm's Gluon forward for sm_90 on any machine and print its SASS.

Usage: python tests/gluon_sass.py HEAD_DIM CAUSAL. Exit status 3 (with the reason on stdout)
when this triton cannot do it: no Gluon, compile internals moved, or no cuobjdump.
Used by tests/test_attention.py; run outside the Triton interpreter.
"""

import os
import subprocess
import sys
import tempfile

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flashlm.kernels.attention import hopper_fwd  # noqa: E402


def skip(reason):
    print(reason)
    sys.exit(3)


def main(head_dim, causal):
    if not hopper_fwd.available():
        skip("this triton has no Gluon")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.runtime.jit import mangle_type
    except ImportError as exc:
        skip(f"triton's compile internals moved: {exc}")
    q = torch.empty(1, 1024, 16, head_dim, dtype=torch.bfloat16)
    desc = mangle_type(hopper_fwd._desc(q, hopper_fwd.BLOCK_M))
    kernel = hopper_fwd._hopper_fwd_kernel
    consts = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=hopper_fwd.BLOCK_M,
                  BLOCK_N=hopper_fwd.BLOCK_N, STAGES=hopper_fwd.STAGES[head_dim], num_warps=8)
    types = {"lse_ptr": "*fp32", "qk_scale": "fp32"}
    signature = {n: "constexpr" if n in consts else desc if n.endswith("_desc")
                 else types.get(n, "i32") for n in kernel.arg_names}
    src = GluonASTSource(kernel, signature,
                         constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    if not os.path.exists(cuobjdump):
        skip("no cuobjdump in this triton to read the SASS")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    print(sass)


if __name__ == "__main__":
    main(int(sys.argv[1]), bool(int(sys.argv[2])))
