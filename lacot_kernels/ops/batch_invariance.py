"""Batch invariance: every row's outputs bitwise identical whatever the other rows, the row count, the padding
width, the chunk size. Asked for because a chunk-size change alone moves 8% of GRPO ratios outside [0.9, 1.1]
(huggingface/trl#6789).

Which backends are batch-invariant by construction (and tested on CPU in ``tests/test_batch_invariance.py``):
* the compiled kernels (CUDA and the C++ CPU twin): one row per CUDA block / per CPU thread, a reduction order
  fixed by V alone;
* the Triton log-prob kernels: one program per row, the block size fixed by V alone;
* the Triton GRPO kernels: one program per row, but the block size follows the padded width T; with
  ``deterministic=True`` it is fixed (``FIXED_BLOCK_T``), so a row's sums do not depend on the padding either;
* the pure-torch backends reduce with torch's ``sum`` / ``cumsum``, whose order may depend on the tensor's shape
  (on CUDA the reduction's launch configuration follows the row count). With ``deterministic=True`` they reduce
  with ``tree_sum`` / ``tree_cumsum`` below: elementwise adds only, in an order fixed by the row alone.

``deterministic=None`` (the default of the public functions) reads ``LACOT_BATCH_INVARIANT``.
"""

from __future__ import annotations

import os

import torch

# Lanes of tree_sum and block of the Triton GRPO kernels in deterministic mode: constants, never shape-derived.
LANES = 1024
FIXED_BLOCK_T = 1024


def enabled(deterministic: bool | None) -> bool:
    """The effective setting: the argument when given, else ``LACOT_BATCH_INVARIANT`` (1 / true / yes / on)."""
    if deterministic is not None:
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
        return deterministic
    return os.environ.get("LACOT_BATCH_INVARIANT", "0").strip().lower() in ("1", "true", "yes", "on")


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in an order fixed by the element positions alone (batch- and padding-invariant).

    Lane j accumulates the elements j, j + LANES, j + 2 LANES, ... in sequence, then the LANES partial sums are
    added by halving. Only elementwise adds run, so every row is reduced the same way whatever the tensor's shape;
    trailing zeros (padding) leave every partial sum unchanged.
    """
    n = x.shape[-1]
    blocks = max(1, -(-n // LANES))
    if blocks * LANES != n:
        x = torch.nn.functional.pad(x, (0, blocks * LANES - n))
    acc = x[..., :LANES].clone()
    for k in range(1, blocks):
        acc = acc + x[..., k * LANES : (k + 1) * LANES]
    width = LANES
    while width > 1:
        width //= 2
        acc = acc[..., :width] + acc[..., width : 2 * width]
    return acc[..., 0]


def tree_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sum over the last dimension with shifted elementwise adds (Hillis-Steele): fixed order."""
    n = x.shape[-1]
    c = x
    shift = 1
    while shift < n:
        c = torch.cat([c[..., :shift], c[..., shift:] + c[..., :-shift]], -1)
        shift *= 2
    return c
