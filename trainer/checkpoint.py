"""Atomic training checkpoints with keep-last-k and auto-resume.

A checkpoint ``<out_dir>/checkpoints/step-<N>/`` holds everything that makes a resumed run continue exactly
where the killed one stopped: model and optimizer state, scheduler, every RNG (Python, numpy, torch CPU and
CUDA), the data position, the algorithm's own state and the number of metric lines written so far. It is written
into a temporary directory and renamed into place, so a SIGKILL at any moment leaves either the complete
checkpoint or none; stale temporary directories are removed on the next start.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PATTERN = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    """Where ``step-<step>`` is written before the rename (one name that every rank of a run agrees on)."""
    return ckpt_root / f".tmp-step-{step:08d}"


def begin(ckpt_root: Path, step: int) -> Path:
    """An empty temporary directory for the checkpoint of ``step`` (rank 0 only)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir(ckpt_root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write(tmp: Path, payload: dict[str, Any]) -> None:
    """``<name>.pt`` for each entry of ``payload`` (picklable objects / tensors), each flushed to disk."""
    for name, obj in payload.items():
        with open(tmp / f"{name}.pt", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def commit(ckpt_root: Path, step: int, tmp: Path, keep_last: int) -> Path:
    """Rename the complete ``tmp`` to ``step-<step>`` (atomic), then prune to the last ``keep_last``."""
    _fsync_dir(tmp)
    for sub in tmp.iterdir():  # e.g. the sharded dcp/ folder written by every rank
        if sub.is_dir():
            _fsync_dir(sub)
    final = ckpt_root / f"step-{step:08d}"
    if final.exists():  # re-saving the same step (a resumed run reaching it again): replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save(ckpt_root: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``payload`` (a dict of picklable objects / tensors) atomically as ``step-<step>``."""
    tmp = begin(ckpt_root, step)
    write(tmp, payload)
    return commit(ckpt_root, step, tmp, keep_last)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def clean_tmp(ckpt_root: Path) -> None:
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-step-"):
                shutil.rmtree(p, ignore_errors=True)


def find_resume(ckpt_root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the latest complete one (or None), ``never``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "state.pt").is_file():
        raise FileNotFoundError(f"train.resume={resume!r} is not a checkpoint directory (no state.pt inside)")
    return p


def load(path: Path, names: list[str]) -> dict[str, Any]:
    return {n: torch.load(path / f"{n}.pt", map_location="cpu", weights_only=False) for n in names}
