"""Config files, dotted overrides and data files: errors name the source, key / row and field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lacot_kernels.trainer.config import load_config, parse_override
from lacot_kernels.trainer.data import DataError, Sampler, load_examples


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 7\n  batch_size: 4\noptim:\n  lr: 1e-4\ngrpo:\n  beta: 0.04\n")
    cfg = load_config(p, ["--optim.lr=3e-5", "grpo.group_size=4", "model.lora.r=8", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4
    assert cfg.optim.lr == 3e-5 and cfg.grpo.group_size == 4 and cfg.grpo.beta == 0.04
    assert cfg.model.lora.r == 8 and cfg.optim.betas == [0.9, 0.95]
    assert parse_override("data.train_file=a=b.jsonl") == ("data.train_file", "a=b.jsonl")


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  stepz: 3\n", r"c\.yaml: unknown config key 'train\.stepz'"),
        ("trian:\n  steps: 3\n", r"unknown config key 'trian'"),
        ("train:\n  steps: three\n", r"c\.yaml: train\.steps expects an int, got 'three'"),
        ("train: 5\n", r"train is a section and expects a mapping"),
        ("optim:\n  lr: -1.0\n", r"config optim\.lr: expected a finite float > 0, got -1\.0"),
        ("train:\n  algorithm: ppo\n", r"config train\.algorithm: expected one of"),
        ("grpo:\n  group_size: 1\n", r"config grpo\.group_size: expected >= 2, got 1"),
        ("- a\n- b\n", r"expected a mapping of sections"),
        ("train: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_config_file(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(p)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", r"command line: unknown config key 'optim\.lrr'"),
        ("optim.lr", r"must look like section\.key=value"),
        ("lr=1", r"must name section\.key"),
        ("train.deterministic=maybe", r"train\.deterministic expects a bool"),
        ("train.steps.x=1", r"'steps' is a value, not a section"),
    ],
)
def test_bad_override(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"question": "q?", "answer": "3", "rationale": "because"}


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [GOOD, {"question": "q?", "rationale": "r"}],
            r"d\.jsonl: row 1: field 'answer' must be a string, got NoneType",
        ),
        ([GOOD, {**GOOD, "question": ""}], r"d\.jsonl: row 1: field 'question' is empty"),
        ([GOOD, GOOD, {**GOOD, "rationale": None}], r"d\.jsonl: row 2: field 'rationale' must be a string"),
        (
            [GOOD, {**GOOD, "image": "missing.png"}],
            r"d\.jsonl: row 1: field 'image': image file .*missing\.png.* does not exist",
        ),
        ([GOOD, '{"question": "q?", "answer": '], r"d\.jsonl: row 1: not valid JSON"),
        ([GOOD, {**GOOD, "question": ["a", "list"]}], r"d\.jsonl: row 1: field 'question' (must be a string|is list)"),
        ([GOOD, {**GOOD, "answer": {"x": 1}}], r"d\.jsonl: row 1: field 'answer' (must be a string|is dict)"),
        ([{"q": "x", "answer": "1"}], r"d\.jsonl: field 'question' is missing"),
    ],
)
def test_malformed_rows_name_file_row_field(tmp_path, rows, match):
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    from lacot_kernels.trainer.config import DataConfig

    with pytest.raises(DataError, match=match):
        load_examples(path, DataConfig(), need_rationale=True)


def test_numbers_as_answers_and_parquet(tmp_path):
    import pandas as pd
    from lacot_kernels.trainer.config import DataConfig

    path = tmp_path / "d.parquet"
    pd.DataFrame({"Q": ["a?", "b?"], "A": ["1", "2"], "why": ["x", "y"]}).to_parquet(path)
    exs = load_examples(
        path, DataConfig(question_field="Q", answer_field="A", rationale_field="why"), need_rationale=True
    )
    assert [(e.question, e.answer, e.rationale) for e in exs] == [("a?", "1", "x"), ("b?", "2", "y")]
    j = _write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": 7}])
    assert load_examples(j, DataConfig(), need_rationale=False)[0].answer == "7"
    with pytest.raises(DataError, match="unsupported data file type"):
        load_examples(tmp_path / "d.csv", DataConfig(), need_rationale=False)


def test_sampler_resumes_and_shards():
    a = Sampler(10, seed=3)
    first = [a.next_indices(4) for _ in range(2)]
    state = a.state()
    rest = [a.next_indices(4) for _ in range(3)]  # crosses an epoch boundary
    b = Sampler(10, seed=3)
    b.load_state(state)
    assert [b.next_indices(4) for _ in range(3)] == rest
    assert sorted(first[0] + first[1] + rest[0][:2]) == list(range(10))
    r0, r1 = Sampler(10, seed=3, rank=0, world_size=2), Sampler(10, seed=3, rank=1, world_size=2)
    assert sorted(r0.next_indices(4) + r1.next_indices(4)) == sorted(first[0])


def test_cli_reports_config_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "lacot_kernels.trainer", "sft", "optim.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "Unrecognized options: --optim.lrr=1" in run.stderr and "--optim.lr FLOAT" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "lacot_kernels.trainer", "ppo"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "unknown command 'ppo'" in run.stderr


def test_shipped_configs_load():
    from pathlib import Path

    import lacot_kernels.trainer as trainer_pkg

    configs = sorted((Path(trainer_pkg.__file__).parent / "configs").glob("*.yaml"))
    configs = [p for p in configs if p.stem != "distill"]  # distill.yaml: see test_trainer_distill.py
    assert {p.stem for p in configs} == {"sft", "dpo", "grpo", "lacot", "bin"}
    for p in configs:
        cfg = load_config(p, [f"train.algorithm={p.stem}"])
        assert cfg.train.algorithm == p.stem
