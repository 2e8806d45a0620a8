"""Triton import shim: the package imports and runs (torch / compiled backends) without Triton."""

from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

    def jit(fn):  # kernels stay plain (never called) Python functions
        return fn


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_in_fp32(dtype) -> bool:
    """The interpreter multiplies raw bf16 bit patterns in `tl.dot` (triton#11584): upcast first there."""
    import torch

    return INTERPRET or dtype == torch.float32
