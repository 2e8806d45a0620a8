"""FSDP2 (train.strategy=fsdp) over 2 gloo processes on CPU: trains like one process, resumes exactly after
SIGKILL from its sharded (torch.distributed.checkpoint) checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import params_of

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _config(tmp_path: Path, name: str, model: Path, data: dict, **train) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train_file": str(data["train"]), "eval_file": str(data["eval"])},
        "train": {
            "out_dir": str(tmp_path / name),
            "steps": 6,
            "batch_size": 8,
            "micro_batch_size": 2,  # 2 micro-batches per rank: FSDP's no-sync accumulation runs too
            "precision": "fp32",
            "max_new_tokens": 24,
            "answer_max_tokens": 3,
            "eval_every": 3,  # greedy generation through the sharded model
            "eval_size": 4,
            "threads": 1,
            "progress": False,
            **train,
        },
        "optim": {"lr": 1e-3},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


def _launch(cfg: Path, *extra: str, world: int = 2) -> subprocess.CompletedProcess:
    head = TORCHRUN if world == 2 else [sys.executable]
    cmd = [*head, "-m", "lacot_kernels.trainer", "sft", "--config", str(cfg), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp_two_processes_train_like_one_and_resume_exactly(sft_text_model, text_data, tmp_path):
    # 1 process, whole batch.
    one = _launch(_config(tmp_path, "one", sft_text_model, text_data), world=1)
    assert one.returncode == 0, one.stderr[-3000:]
    # 2 processes, FSDP2: each rank takes 4 of the 8 rows (the text rows have equal token counts, so the
    # per-rank token means average to the global one).
    full = _launch(_config(tmp_path, "fsdp", sft_text_model, text_data, strategy="fsdp", save_every=2))
    assert full.returncode == 0, full.stderr[-3000:]
    info = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert info["world_size"] == 2 and info["strategy"] == "fsdp"
    la, lb = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "fsdp")
    assert len(la) == len(lb) == 6
    diff = max(abs(a - b) for a, b in zip(la, lb, strict=True))
    print(f"\nFSDP (2 gloo processes) vs 1 process: max |loss difference| over 6 steps = {diff:.3g}")
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    pa, pb = params_of(tmp_path / "one" / "final"), params_of(tmp_path / "fsdp" / "final")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=2e-5, rtol=1e-4)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    assert (ckpt / "dcp" / ".metadata").is_file()  # sharded: written by both ranks through DCP

    # The same FSDP run, SIGKILLed (every process) once its step-4 checkpoint exists, then resumed.
    cfg = _config(tmp_path, "killed", sft_text_model, text_data, strategy="fsdp", save_every=2)
    killed = tmp_path / "killed"
    cmd = [*TORCHRUN, "-m", "lacot_kernels.trainer", "sft", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while not (killed / "checkpoints" / "step-00000004").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(_records(killed)) < len(_records(tmp_path / "fsdp")), "killed too late to test anything"
    resumed = _launch(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    strip = [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in _records(killed)]
    ref = [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in _records(tmp_path / "fsdp")]
    assert [r["step"] for r in strip] == [r["step"] for r in ref]
    for ra, rb in zip(ref, strip, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (k, ra, rb)
    pa, pb = params_of(tmp_path / "fsdp" / "final"), params_of(killed / "final")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
