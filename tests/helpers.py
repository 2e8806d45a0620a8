"""Shared test helpers: which backends can run here, seeded inputs, tolerances."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    """Explicit backends that can run on `device` here (each is tested, not just `auto`)."""
    out = ["torch"]
    if lk.triton_available(device):
        out.append("triton")
    if lk.native_available(device):
        out.append("cuda")
    return out


ALL_BACKENDS = [(d, b) for d in DEVICES for b in backends_for(d)]
# The same, with the CUDA-device cases marked `gpu`, so that `make gpu-check` (pytest -m gpu) runs them.
GPU_MARKED_BACKENDS = [pytest.param(d, b, marks=pytest.mark.gpu) if d == "cuda" else (d, b) for d, b in ALL_BACKENDS]


def bf16_grad_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """A gradient stored in a 16-bit dtype is off by up to a few of its ulps at the largest magnitude."""
    eps = torch.finfo(dtype).eps
    return 4 * eps * float(ref.abs().max()) + 1e-6
