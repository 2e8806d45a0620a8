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


# The smallest temperature accepted, 2**-64 (~5.4e-20). The kernels multiply by 1 / T in fp32, and the logits
# gradient scales as 1 / T: below ~2**-126 1 / T itself overflows (all-NaN log-probs), and well before that the
# gradient of an O(1) upstream gradient leaves the fp32 range. 2**-64 keeps 1 / T (1.8e19) and g / T far inside it.
MIN_TEMPERATURE = 2.0**-64


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    """A finite Python number (not a bool, not a tensor) in [low, high] (open ends as asked), as a float.

    TypeError for a non-number, ValueError for NaN / inf or a value outside the range; the message names the
    argument, the range and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    v = float(value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not math.isfinite(v) or not lo_ok or not hi_ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        rng = " and ".join(parts)
        raise ValueError(f"{name} must be finite{' and ' + rng if rng else ''}, got {value}")
    return v


def check_temperature(temperature: object) -> float:
    """A finite temperature >= MIN_TEMPERATURE (2**-64: 1 / temperature and the gradients stay inside fp32)."""
    t = check_float("temperature", temperature, low=0, low_open=True)
    if t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE!r} (2**-64, so that 1 / temperature and the gradients, which "
            "scale as 1 / temperature, stay inside the float32 range), "
            f"got {temperature!r}"
        )
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


def check_active_targets_in_range(targets: torch.Tensor, active: torch.Tensor, vocab: int, *, name: str = "targets"):
    """Range check of the target ids at active positions only (`active` bool, same shape): padding may hold any
    id. Every id of an active position must be in [0, vocab) (-1 included: no id means "ignored" here). Same
    eager-on-CPU / opt-in-on-CUDA rule as check_targets_in_range."""
    from ._registry import check_bounds_enabled

    if targets.numel() == 0:
        return
    if targets.device.type != "cpu" and not check_bounds_enabled():
        return
    bad = active & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"{name} must be in [0, {vocab}) at every active token (mask != 0); got {int(targets.flatten()[idx])} "
            f"at flat position {idx} ({int(bad.sum())} out-of-range ids in total)"
        )


def check_lengths_in_range(
    lengths: torch.Tensor, low: int, high: int | None, *, name: str = "lengths", what: str = ""
) -> None:
    """Value check of integer lengths in [low, high] (high None: no upper bound), eager on CPU tensors, on CUDA
    only with LACOT_CHECK_BOUNDS=1 (it synchronizes), never while tracing. Float lengths must be finite too."""
    from ._registry import check_bounds_enabled

    if lengths.numel() == 0 or torch.compiler.is_compiling():
        return
    if lengths.device.type != "cpu" and not check_bounds_enabled():
        return
    bad = lengths < low
    if high is not None:
        bad |= lengths > high
    if lengths.is_floating_point():
        bad |= ~torch.isfinite(lengths)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(
            f"{name} must be {rng}{what}, got {lengths.flatten()[idx].item()} at flat position {idx} "
            f"({int(bad.sum())} out-of-range values in total)"
        )


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` with unit stride along its last dimension (what the kernels index), copied only when needed.

    An empty tensor counts as contiguous in torch whatever its strides (e.g. ``randn(0, 10)[:, ::2]``, or a
    zero-size numpy array with stride 0), so ``.contiguous()`` keeps them: it gets fresh standard strides here
    (a copy of nothing) instead of reaching a kernel that rejects the strides."""
    if x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()
