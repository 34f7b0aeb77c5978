"""Test setup: without a CUDA device, Triton kernels run under the CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it must be set before anything
imports triton (and so before flashlm is imported).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Modules whose spawned gloo processes and in-process references all run the kernels on the CPU
# under the interpreter, which this process has only when it sees no GPU: on a GPU machine they
# run in a second pytest with the GPU hidden (scripts/test_gpu.sh).
CPU_PROCESSES = pytest.mark.skipif(
    DEVICE == "cuda", reason="CPU multi-process test: run it with CUDA_VISIBLE_DEVICES= "
    "(scripts/test_gpu.sh does)")


def cpu_process_env(**extra):
    """The environment of a training subprocess that runs on the CPU (one process or a gloo
    group): the kernels under the interpreter, and the GPU hidden, since on a machine with one
    GPU, ranks above 0 of a CPU launch would otherwise name a CUDA device that is not there
    (Accelerate's barrier passes the local rank as a device id)."""
    return dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONSAFEPATH="1", **extra)


def load_script(name):
    """A script (run, not imported, by users), loaded as a module for a test; ``name`` is its
    path under ``scripts/`` without ``.py``, e.g. ``"bench/attention"``."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
