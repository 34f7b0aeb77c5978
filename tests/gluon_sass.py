"""Compile one of flashlm's Gluon kernels for sm_90 on any machine and print its SASS.

Usage: python tests/gluon_sass.py fwd|bwd HEAD_DIM CAUSAL. Exit status 3 (with the reason on stdout)
when this triton cannot do it: no Gluon, compile internals moved, or no cuobjdump.
Used by tests/test_attention.py; run outside the Triton interpreter.
"""

import os
import subprocess
import sys
import tempfile

import torch
import triton

from flashlm.kernels.attention import hopper_bwd, hopper_fwd


def skip(reason):
    print(reason)
    sys.exit(3)


def _forward(head_dim, causal):
    q = torch.empty(1, 1024, 16, head_dim, dtype=torch.bfloat16)
    desc = hopper_fwd._desc(q, hopper_fwd.BLOCK_M)
    consts = dict(CAUSAL=causal, PAIRED=causal, HEAD_DIM=head_dim, BLOCK_M=hopper_fwd.BLOCK_M,
                  BLOCK_N=hopper_fwd.BLOCK_N, STAGES=hopper_fwd.STAGES[head_dim], num_warps=8)
    return hopper_fwd._hopper_fwd_kernel, consts, lambda name: desc


def _backward(head_dim, causal):
    q = torch.empty(1, 1024, 16, head_dim, dtype=torch.bfloat16)
    descs = dict(q_desc=hopper_fwd._desc(q, hopper_bwd.BLOCK_M),
                 do_desc=hopper_fwd._desc(q, hopper_bwd.BLOCK_M),
                 dq_desc=hopper_bwd._dq_desc(q.float(), causal),
                 lse_desc=hopper_bwd._row_desc(torch.empty(16 * 1024)),
                 delta_desc=hopper_bwd._row_desc(torch.empty(16 * 1024)))
    tile = hopper_fwd._desc(q, hopper_bwd.BLOCK_N)
    consts = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=hopper_bwd.BLOCK_M,
                  BLOCK_N=hopper_bwd.BLOCK_N, STAGES=hopper_bwd.STAGES, num_warps=8)
    return hopper_bwd._hopper_bwd_kernel, consts, lambda name: descs.get(name, tile)


def main(kind, head_dim, causal):
    if not hopper_fwd.available():
        skip("this triton has no Gluon")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.runtime.jit import mangle_type
    except ImportError as exc:
        skip(f"triton's compile internals moved: {exc}")
    kernel, consts, desc = (_forward if kind == "fwd" else _backward)(head_dim, causal)
    types = {"lse_ptr": "*fp32", "qk_scale": "fp32",
             "softmax_scale": "fp32"}
    signature = {n: "constexpr" if n in consts else mangle_type(desc(n)) if n.endswith("_desc")
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
    main(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
