"""Test setup: without a CUDA device, Triton kernels run under the CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it must be set before anything
imports triton (and so before flashlm is imported).
"""

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_script(name):
    """A script (run, not imported, by users), loaded as a module for a test; ``name`` is its
    path under ``scripts/`` without ``.py``, e.g. ``"bench/attention"``."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
