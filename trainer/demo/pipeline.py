"""``lacot-train demo``: the embedded end-to-end job on a 2-core CPU, nothing downloaded.

1. data: the square-counting task (:mod:`.task`) written as JSONL + PNG files, read back through the normal
   data pipeline;
2. a randomly initialised tiny Qwen2-VL + a tokenizer trained in code (:mod:`.tiny`), saved as a transformers
   checkpoint;
3. SFT on the reference rationales (stopped early on purpose, so that RL and ranking have room);
4. GRPO and LaCoT, each from the same SFT checkpoint, for the same number of prompts per step and steps;
5. evaluation of the three models on the same held-out questions: greedy, majority vote, Best-of-N (own
   likelihood), BiN and pass@N over N sampled rationales;
6. an accuracy table on stdout, ``metrics.jsonl`` (every phase's records, tagged) and ``curves.png``.

Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..loop import run, seed_all
from ..metrics import plot_curves, read_metrics
from . import task, tiny


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lacot-train demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: these matmuls are tiny, and on a busy 2-core machine two spinning OpenMP threads
    # were measured 10x slower per step than one (0.19 s vs 1.74 s per SFT step at load average 4).
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, see above)")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=130)
    p.add_argument("--rl-steps", type=int, default=80, help="GRPO and LaCoT steps (8 prompts each)")
    p.add_argument("--bin-n", type=int, default=5, help="N rationales per question for BiN / BoN / majority")
    p.add_argument("--fast", action="store_true", help="a smoke run of every phase in well under a minute")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.fast:
        a.train_size, a.eval_size, a.sft_steps, a.rl_steps, a.bin_n = 200, 16, 6, 2, 3
    return a


def _base_mapping(a: argparse.Namespace, out: Path, data: Path, model_path: Path, name: str) -> dict[str, Any]:
    return {
        "model": {"path": str(model_path)},
        "data": {"train_file": str(data / "train.jsonl"), "eval_file": str(data / "eval.jsonl")},
        "train": {
            "out_dir": str(out / name),
            "seed": a.seed,
            "threads": a.threads,
            "eval_size": a.eval_size,
            "eval_batch_size": 100,
            "max_new_tokens": 24,  # the reference rationales are 14 tokens
            "answer_max_tokens": 4,
            "resume": "never",
            "progress": not a.quiet,
        },
    }


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


def main(argv: list[str] | None = None) -> int:
    a = _args(list(argv or []))
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1-2. data and the untrained tiny model (deterministic: rebuilt identically from the seed every run).
    t = time.perf_counter()
    data = out / "data"
    task.write_split(data, "train", a.train_size, seed=1000 + a.seed)
    task.write_split(data, "eval", a.eval_size, seed=2000 + a.seed)
    base = tiny.save_base(out / "base", vision=True, seed=a.seed)
    timings["setup_s"] = time.perf_counter() - t

    # 3. SFT: lr and schedule from shared/research/demo_feasibility.md §3; stopped early on purpose.
    t = time.perf_counter()
    sft_cfg = _merge(
        _base_mapping(a, out, data, base, "sft"),
        {
            "train": {
                "algorithm": "sft",
                "steps": a.sft_steps,
                "batch_size": 32,
                "eval_every": max(1, a.sft_steps // 4),
            },
            "optim": {"lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 0.01, "warmup_steps": 30, "min_lr_ratio": 0.1},
        },
    )
    sft = run(load_config(None, [], **sft_cfg))
    timings["sft_s"] = time.perf_counter() - t
    sft_model = sft.final_dir

    # 4. GRPO and LaCoT from the same SFT checkpoint, same prompts per step and steps. GRPO's lr is ~100x below
    # SFT's: at 1e-4 (measured here) and 5e-4 (feasibility study) the outcome-only reward let it trade the
    # rationale for answer guessing ("I see 4 4 4 4 ..."); 3e-5 is stable. LaCoT's reward scores the rationale
    # too, and its 1e-4 run stayed coherent.
    rl_common = {
        "train": {"steps": a.rl_steps, "batch_size": 8, "eval_every": max(1, a.rl_steps // 3)},
        "optim": {"schedule": "constant", "warmup_steps": 0},
    }
    t = time.perf_counter()
    grpo_cfg = _merge(_base_mapping(a, out, data, sft_model, "grpo"), rl_common)
    grpo_cfg = _merge(
        grpo_cfg,
        {
            "train": {**rl_common["train"], "algorithm": "grpo"},
            "optim": {**rl_common["optim"], "lr": 3e-5},
            "grpo": {"group_size": 6, "temperature": 1.0, "updates_per_batch": 2, "beta": 0.0},
        },
    )
    grpo = run(load_config(None, [], **grpo_cfg))
    timings["grpo_s"] = time.perf_counter() - t

    t = time.perf_counter()
    lacot_cfg = _merge(_base_mapping(a, out, data, sft_model, "lacot"), rl_common)
    lacot_cfg = _merge(
        lacot_cfg,
        {
            "train": {**rl_common["train"], "algorithm": "lacot"},
            "optim": {**rl_common["optim"], "lr": 1e-4},
            # The demo rationales are 14 tokens: λ = 4 puts anchors at 0, 4, 8, 12 and the terminal state.
            "lacot": {
                "num_samples": 6,
                "stride": 4,
                "max_len": 24,
                "delta_horizon": a.rl_steps,
                "reward_temp_horizon": a.rl_steps,
            },
        },
    )
    lacot = run(load_config(None, [], **lacot_cfg))
    timings["lacot_s"] = time.perf_counter() - t

    # 5. The same held-out questions and the same sampling seed for every model.
    from ..algorithms.bin import bin_evaluate
    from ..config import Config
    from ..data import load_examples
    from ..modeling import Codec, load_model

    cfg = Config()
    examples = load_examples(data / "eval.jsonl", cfg.data, need_rationale=False)[: a.eval_size]
    table: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    for name, path in (("SFT", sft_model), ("SFT -> GRPO", grpo.final_dir), ("SFT -> LaCoT", lacot.final_dir)):
        seed_all(a.seed + 12345)
        model, tok, ip = load_model(cfg.model, torch.device("cpu"), path=str(path), trainable=False)
        te = time.perf_counter()
        table[name] = bin_evaluate(
            model,
            Codec(tok, ip, cfg.format),
            examples,
            n=a.bin_n,
            temperature=0.7,
            max_rationale_tokens=24,
            max_answer_tokens=4,
            batch_questions=20,
        )
        table[name]["eval_s"] = time.perf_counter() - te
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    # 6. report: table, metrics.jsonl (all phases), curves.png, results.json.
    records: list[dict[str, Any]] = []
    for phase, res in (("sft", sft), ("grpo", grpo), ("lacot", lacot)):
        records += [{"phase": phase, **r} for r in read_metrics(res.out_dir / "metrics.jsonl")]
    for name, row in table.items():
        records.append({"phase": "eval", "model": name, **row})
    records.append({"phase": "timings", **timings})
    with (out / "metrics.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    png = _plot(out, sft, grpo, lacot, table)
    (out / "results.json").write_text(json.dumps({"accuracy": table, "timings": timings, "bin_n": a.bin_n}, indent=2))
    print(_table(table, a, timings))
    print(f"\nmetrics: {out / 'metrics.jsonl'}\nplot:    {png}", file=sys.stdout)
    return 0


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(out: Path, sft, grpo, lacot, table) -> Path:
    h_sft, h_grpo, h_lacot = (read_metrics(r.out_dir / "metrics.jsonl") for r in (sft, grpo, lacot))
    panels = [
        ("SFT: loss", [("", *_series(h_sft, "loss"))]),
        ("SFT: greedy accuracy (held-out)", [("", *_series(h_sft, "eval/greedy_acc"))]),
        (
            "after SFT: greedy accuracy (held-out)",
            [("GRPO", *_series(h_grpo, "eval/greedy_acc")), ("LaCoT", *_series(h_lacot, "eval/greedy_acc"))],
        ),
        (
            "GRPO: batch reward / accuracy (T = 1)",
            [("reward", *_series(h_grpo, "reward")), ("acc", *_series(h_grpo, "acc"))],
        ),
        ("LaCoT: SubTB loss", [("", *_series(h_lacot, "loss"))]),
        ("LaCoT: RGFN accepted fraction", [("", *_series(h_lacot, "accept"))]),
        (
            "LaCoT: log-reward per token",
            [
                ("explored", *_series(h_lacot, "log_reward_explored")),
                ("reference", *_series(h_lacot, "log_reward_reference")),
            ],
        ),
    ]
    methods = ["greedy", "majority", "bon", "bin", "pass@n"]
    labels = ["greedy", "majority", "BoN", "BiN", "pass@N"]
    panels.append(
        (
            "held-out accuracy by method",
            [(name, labels, [row[m] for m in methods]) for name, row in table.items()],
            "bar",
        )
    )
    return plot_curves(panels, out / "curves.png")


def _table(table: dict[str, dict[str, float]], a: argparse.Namespace, timings: dict[str, float]) -> str:
    n = a.bin_n
    cols = [("greedy", "greedy"), ("sample", "sample_mean"), (f"majority@{n}", "majority"), (f"BoN@{n}", "bon")]
    cols += [(f"BiN@{n}", "bin"), (f"pass@{n}", "pass@n")]
    head = f"{'model':<14}" + "".join(f" {name:>11}" for name, _ in cols)
    lines = [
        f"\nHeld-out accuracy on {a.eval_size} questions (count the squares; chance = 20%).",
        f"sample = mean accuracy of single rationales at T = 0.7; the last four rank the same N = {n} samples.",
        head,
        "-" * len(head),
    ]
    for name, r in table.items():
        lines.append(f"{name:<14}" + "".join(f" {r[key]:>11.1%}" for _, key in cols))
    lines.append(
        "\ntimings: "
        + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items())
        + f"  (torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()})"
    )
    return "\n".join(lines)
