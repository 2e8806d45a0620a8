"""Checkpoint -> SIGKILL -> resume reproduces the uninterrupted run; two gloo processes (torchrun) train as one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lacot_kernels.trainer.checkpoint import list_checkpoints, save

from .conftest import params_of

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _config(path: Path, model: Path, data: dict, out: Path, algorithm: str, **extra) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train_file": str(data["train"]), "eval_file": str(data["eval"])},
        "train": {
            "algorithm": algorithm,
            "out_dir": str(out),
            "steps": 12,
            "batch_size": 4,
            "save_every": 2,
            "keep_last": 2,
            "max_new_tokens": 24,
            "answer_max_tokens": 3,
            "eval_every": 6,
            "eval_size": 4,
            "threads": 1,
            "progress": False,
        },
        "optim": {"lr": 1e-3},
        "grpo": {"group_size": 4, "updates_per_batch": 2},
    }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(algorithm: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "lacot_kernels.trainer", algorithm, str(config)]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _strip_time(recs):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in recs]


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(sft_text_model, text_data, tmp_path):
    full = tmp_path / "full"
    cfg_full = _config(tmp_path / "full.yaml", sft_text_model, text_data, full, "grpo")
    subprocess.run(_cmd("grpo", cfg_full), env=ENV, check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    cfg_killed = _config(tmp_path / "killed.yaml", sft_text_model, text_data, killed, "grpo")
    proc = subprocess.Popen(_cmd("grpo", cfg_killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (killed / "checkpoints" / "step-00000004").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    lines_at_kill = len(_records(killed))
    assert lines_at_kill < len(_records(full)), "killed too late to test anything"

    resumed = subprocess.run(_cmd("grpo", cfg_killed), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _strip_time(_records(full)), _strip_time(_records(killed))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=False):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (k, ra, rb)
    pa, pb = params_of(full / "final"), params_of(killed / "final")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert len(list_checkpoints(killed / "checkpoints")) <= 2  # keep_last


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save(root, step, {"state": {"step": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    (root / ".tmp-step-00000004-99").mkdir()  # a write interrupted by a kill is never listed
    (root / "step-00000005").mkdir(parents=True)  # nor is a malformed one without state: resume rejects paths
    shutil.rmtree(root / "step-00000005")
    assert list_checkpoints(root)[-1].name == "step-00000003"


def test_two_process_gloo_run_matches_one_process(sft_text_model, text_data, tmp_path):
    """DDP over 2 CPU processes (gloo), each taking half of every batch, equals one process on the whole batch
    (the text rows all have the same token count, so per-rank token means average to the global mean)."""
    extra = {"train": {"steps": 2, "batch_size": 8, "save_every": 0, "eval_every": 0}}
    one = tmp_path / "one"
    subprocess.run(
        _cmd("sft", _config(tmp_path / "one.yaml", sft_text_model, text_data, one, "sft", **extra)),
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    two = tmp_path / "two"
    # torchrun as a module of this interpreter: a `torchrun` script need not be on PATH (it was not, here, and
    # the test was skipped without anyone noticing).
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    cfg = _config(tmp_path / "two.yaml", sft_text_model, text_data, two, "sft", **extra)
    run = subprocess.run(
        [*torchrun, "--standalone", "--nproc_per_node=2", "-m", "lacot_kernels.trainer", "sft", str(cfg)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    ra, rb = _records(one), _records(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb, strict=False):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    pa, pb = params_of(one / "final"), params_of(two / "final")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=2e-5, rtol=1e-4)
