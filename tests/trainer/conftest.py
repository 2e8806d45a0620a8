"""Fixtures of the trainer tests: tiny text and vision-language checkpoints, data files, a briefly SFT-ed model.

Everything is built in code (no download) once per session, small enough that an algorithm step takes well
under a second on 2 cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lacot_kernels.trainer.config import load_config
from lacot_kernels.trainer.demo import task, tiny

TEXT_QUESTION = "{red} red and {blue} blue. How many squares?"


def write_text_split(path: Path, n: int, seed: int) -> Path:
    """Text-only rows: the counts are in the question, so a text model can learn the answer."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            s = task.draw_sample(rng)
            row = {
                "question": TEXT_QUESTION.format(red=s.red, blue=s.blue),
                "answer": s.answer,
                "rationale": s.rationale,
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("text_model")
    model = tiny.build_causal_lm(tok, hidden=32, layers=2, heads=2, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vl_model_dir(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("vl_model")
    model = tiny.build_qwen2vl(tok, hidden=32, layers=1, heads=2, intermediate=64, vision_embed=16, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tiny.build_image_processor().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text_data")
    return {"train": write_text_split(d / "train.jsonl", 64, 0), "eval": write_text_split(d / "eval.jsonl", 8, 1)}


@pytest.fixture(scope="session")
def vl_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vl_data")
    return {"train": task.write_split(d, "train", 32, 0), "eval": task.write_split(d, "eval", 8, 1)}


def make_cfg(model_dir: Path, data: dict[str, Path], out: Path, algorithm: str, **sections):
    """A small config: dotted sections given as dicts, e.g. ``grpo={"group_size": 4}``."""
    mapping = {
        "model": {"path": str(model_dir)},
        "data": {"train_file": str(data["train"]), "eval_file": str(data["eval"])},
        "train": {
            "algorithm": algorithm,
            "out_dir": str(out),
            "steps": 2,
            "batch_size": 4,
            "max_new_tokens": 24,
            "answer_max_tokens": 3,
            "eval_size": 4,
            "progress": False,
            "threads": 1,
        },
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    for k, v in sections.items():
        mapping.setdefault(k, {}).update(v)
    return load_config(None, [], **mapping)


@pytest.fixture(scope="session")
def sft_text_model(tmp_path_factory, text_model_dir, text_data) -> Path:
    """The tiny text model after a short SFT: it closes its rationales and answers, right or wrong."""
    from lacot_kernels.trainer.loop import run

    out = tmp_path_factory.mktemp("sft_text")
    cfg = make_cfg(text_model_dir, text_data, out, "sft", train={"steps": 60, "batch_size": 16}, optim={"lr": 1e-2})
    return run(cfg).final_dir


@pytest.fixture(scope="session")
def sft_vl_model(tmp_path_factory, vl_model_dir, vl_data) -> Path:
    from lacot_kernels.trainer.loop import run

    out = tmp_path_factory.mktemp("sft_vl")
    cfg = make_cfg(vl_model_dir, vl_data, out, "sft", train={"steps": 60, "batch_size": 16}, optim={"lr": 1e-2})
    return run(cfg).final_dir


def params_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))
