"""The command line: --help lists every option with its default, packaged configs by name, --version, a missing
`train` extra, one-line errors (tracebacks with --debug), data checked before the model loads, no forced
offline mode outside the demo."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from lacot_kernels.trainer.__main__ import COMMANDS, main, parse
from lacot_kernels.trainer.config import Config


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "distill"])
def test_help_lists_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.replace("│", " ").split())  # tyro wraps the help in a box
    for key, _ in _leaves(Config()):
        assert f"--{key} " in flat, key
    assert "(default: 0.1)" in flat  # dpo.beta, format of a default
    assert "optimizer steps for sft/dpo" in flat  # the comment next to the field is the help
    assert "--config" in flat and "grpo, lacot, sft" in flat  # packaged configs by name


def test_top_level_help_version_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ["demo", *COMMANDS])
    assert main(["--version"]) == 0
    assert "lacot-kernels" in capsys.readouterr().out
    assert main(["ppo"]) == 2
    assert "unknown command 'ppo'" in capsys.readouterr().err


def test_packaged_config_by_name_and_overrides():
    cfg, debug = parse(
        "grpo",
        [
            "--config",
            "grpo",
            "optim.lr=1e-6",
            "--train.steps",
            "3",
            "optim.betas=[0.8, 0.9]",
            "train.progress=false",
            "--grpo.beta=0.04",
            "data.train_file=a: b.jsonl",  # a value with ": " stays a string
        ],
    )
    assert not debug
    assert cfg.train.algorithm == "grpo" and cfg.train.out_dir == "out/grpo"  # from the packaged grpo.yaml
    assert cfg.train.precision == "bf16-mixed"
    assert cfg.optim.lr == 1e-6 and cfg.train.steps == 3 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.progress is False and cfg.grpo.beta == 0.04 and cfg.data.train_file == "a: b.jsonl"
    # the older form: a YAML path first; and the command wins over the file's algorithm
    from lacot_kernels.trainer.__main__ import resolve_config

    cfg, _ = parse("dpo", [resolve_config("sft"), "--debug"])
    assert cfg.train.algorithm == "dpo" and cfg.optim.lr == 1e-5


def test_missing_train_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    assert main(["sft", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "lacot-kernels[train]"' in err and "'yaml'" in err
    assert main(["--help"]) == 0  # the command list needs no extra


def test_config_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert main(["sft", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown config key 'train.stepz'" in err and "--debug" in err
    with pytest.raises(ValueError, match="stepz"):
        main(["sft", "--config", str(bad), "--debug"])
    assert main(["sft", "--config", "nope"]) == 2
    assert "neither a file nor a packaged config" in capsys.readouterr().err
    assert main(["sft", "optim.lr=-1"]) == 2
    assert "optim.lr: expected a finite float > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # tyro: an unknown option, with a suggestion
        main(["sft", "optim.lrr=1"])
    assert exit_.value.code == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_data_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "rationale": "r"}) + "\n")  # every row needs an answer
    args = ["sft", f"data.train_file={data}", f"model.path={tmp_path / 'no-model'}", f"train.out_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "answer" in err and len(err.strip().splitlines()) == 1
    import os

    assert "HF_HUB_OFFLINE" not in os.environ  # only the demo forces offline mode


def test_model_errors_are_one_line_with_an_offline_hint(tmp_path, capsys, monkeypatch, text_data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["sft", f"data.train_file={text_data['train']}", "model.path=Qwen/not-here", f"train.out_dir={tmp_path}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Qwen/not-here" in err and "HF_HUB_OFFLINE is set" in err


@dataclasses.dataclass
class _ToyConfig:
    teacher: str = ""  # the model that writes rationales
    n: int = 2  # how many per question


def _toy_run(cfg: _ToyConfig) -> None:
    print(f"toy {cfg.teacher} {cfg.n}")


def test_a_new_command_is_one_registration(monkeypatch, capsys, tmp_path):
    """How `distill` (or any command) plugs in: a config dataclass and a run function, by import path."""
    from lacot_kernels.trainer import __main__ as cli

    monkeypatch.setitem(cli.COMMANDS, "toy", cli.COMMANDS["sft"])  # placeholder, replaced by register()
    cli.register("toy", "a toy command", f"{__name__}:_ToyConfig", f"{__name__}:_toy_run")
    yaml_file = tmp_path / "toy.yaml"
    yaml_file.write_text("teacher: big\n")
    assert cli.main(["toy", "--config", str(yaml_file), "n=5"]) == 0
    assert "toy big 5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["toy", "--help"])
    assert "how many per question" in capsys.readouterr().out
