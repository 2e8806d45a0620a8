"""Argument validation with errors that name the argument, what was expected and what was given.

Everything here reads only metadata (dtype, shape, device, Python scalars), so it runs unchanged under
torch.compile without graph breaks or host syncs. Checks of tensor *values* (target ids in range) live
inside the ops, where they run eagerly.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dtype(name: str, x: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_names(allowed)}, got {x.dtype}")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}: all tensors must share a device"
            )


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    return value


def check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int, *, name: str = "targets") -> None:
    """Value check of target ids: run eagerly on CPU tensors (free), and on CUDA only when asked for
    (`LACOT_CHECK_BOUNDS=1`), since reading the result back synchronizes the host with the GPU.
    Without the check, out-of-range ids on CUDA give NaN log-probs (the kernels never read out of bounds)."""
    from ._registry import check_bounds_enabled

    if targets.numel() == 0:
        return
    if targets.device.type != "cpu" and not check_bounds_enabled():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        value = int(targets.flatten()[idx])
        raise ValueError(
            f"{name} must be in [0, {vocab}) or equal to ignore_index={ignore_index}; "
            f"got {value} at flat position {idx} ({int(bad.sum())} out-of-range ids in total)"
        )
