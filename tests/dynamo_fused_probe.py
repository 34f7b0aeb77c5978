"""Trace the compiled decoder halves with the fused Triton kernels on a CPU, as Dynamo does on CUDA.

Usage: python tests/dynamo_fused_probe.py LENGTH... Prints one line per length, ``frames <n>``:
the compiled frames after a training step at that length (Dynamo's recompile reasons go to
stderr). Exit status 3 (with the reason on stdout) when this torch or triton cannot do it.
Used by tests/test_speed_levers.py; run outside the Triton interpreter.

On CUDA, Dynamo traces a user-defined Triton kernel's launch (its grid and arguments, symbolic
under a dynamic length) into the graph; on a CPU it does not, because Triton has no CPU driver,
so the CPU tests trace the PyTorch ops instead and miss the guards the launches add. Here Dynamo
is told Triton is usable, each launch is run by Triton's interpreter when the graph executes,
and the kernels' written arguments are named (Dynamo's own analysis needs a GPU compiler).
The model is the one the per-length recompile test builds, with ``fused_ops="triton"``.
"""

import functools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    print("run without TRITON_INTERPRET: Dynamo only traces compiled (not interpreted) kernels")
    sys.exit(3)

import torch

# The output tensors of flashlm's fused kernels (RMSNorm, RoPE, SwiGLU), by argument name.
WRITTEN = {"Y", "RSTD", "DX", "DW_PARTIAL", "QO", "KO", "OUT", "DGU"}
TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
# loop_programs on the GPU: a fixed count, more programs than the probe's rows have blocks, as
# an H100's 8 * 132 is for real lengths (every program has at most one block, the rest write
# zeros). Not 1056 itself: the interpreter runs programs one by one, 20 s a step.
GPU_PROGRAMS = 64


def skip(reason):
    print(reason)
    sys.exit(3)


def patch_triton_for_dynamo():
    try:
        import torch._higher_order_ops.triton_kernel_wrap as wrap
        import torch.utils._triton as torch_triton
        from torch._inductor.dependencies import ReadWrites, StarDep
        from torch.utils._ordered_set import OrderedSet
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        skip(f"torch or triton internals moved: {e}")
    for name in ("TensorAccesses", "identify_accessed_tensors"):
        if not hasattr(wrap, name):
            skip(f"torch internals moved: no triton_kernel_wrap.{name}")

    interpreted = functools.lru_cache(maxsize=None)(InterpretedFunction)
    launch_only = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")

    def run(self, *args, grid, warmup, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in launch_only}
        return interpreted(self.fn).run(*args, grid=grid, warmup=warmup, **kwargs)

    def accessed(kernel, kwargs, *args, **more):
        names = [n for n, v in kwargs.items() if isinstance(v, torch.Tensor)]
        reads = OrderedSet(StarDep(n) for n in names)
        writes = OrderedSet(StarDep(n) for n in names if n in WRITTEN)
        return wrap.TensorAccesses(ReadWrites(reads=reads, writes=writes, index_exprs=OrderedSet()), False)

    torch_triton.has_triton = lambda: True
    JITFunction.run = run
    JITFunction.__call__ = lambda self, *args, **kwargs: interpreted(self.fn)(*args, **kwargs)
    wrap.identify_accessed_tensors = accessed


def patch_kernels_for_cpu():
    """The kernels' host code refuses CPU tensors without the interpreter, and sizes its loops
    for a GPU: let it run, with a GPU's program count."""
    import flashlm.kernels.rms_norm  # noqa: F401 (registers the modules below)
    import flashlm.kernels.rope  # noqa: F401
    import flashlm.kernels.swiglu  # noqa: F401
    for name in ("rms_norm", "rope", "swiglu"):
        module = sys.modules[f"flashlm.kernels.{name}.{name}"]
        module.check_runnable = lambda *args, **kwargs: None
        if hasattr(module, "loop_programs"):
            module.loop_programs = lambda device: GPU_PROGRAMS


def main(lengths):
    patch_triton_for_dynamo()
    patch_kernels_for_cpu()
    from torch._dynamo.testing import CompileCounterWithBackend

    from flashlm import GPT, GPTConfig
    from flashlm.model.compile import compile_blocks

    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY, attn_backend="sdpa", fused_ops="triton", gradient_checkpointing="auto",
                          checkpoint_memory_budget=1.0))
    model.set_checkpoint_plan("checkpoint,offload,2*none")
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(model, backend=counter)
    torch._logging.set_logs(recompiles=True)
    for seqlen in lengths:
        ids = torch.randint(0, TINY["vocab_size"], (2, seqlen))
        model(ids, labels=ids).loss.backward()
        print(f"frames {counter.frame_count}", flush=True)


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]])
