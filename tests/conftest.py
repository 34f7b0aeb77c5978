"""Test setup: without a CUDA device, Triton kernels run under the CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it must be set before anything
imports triton (and so before flashlm is imported).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
