"""``lacot-train demo``: the embedded end-to-end experiment on a 2-core CPU, nothing downloaded.

1. data: a square-counting task (:mod:`.task`; default ``paths``: red and blue squares counted in either order,
   so two rationales lead to one answer) written as JSONL + PNG files, read back through the normal data pipeline;
2. a randomly initialised tiny Qwen2-VL + a tokenizer trained in code (:mod:`.tiny`), saved as a checkpoint;
3. SFT on the reference rationales, stopped early on purpose (so that the arms below have room);
4. three arms from that one SFT checkpoint, each with the same prompts per step, the same steps, and ``--seeds``
   seeds: **continued SFT** (the control: the same extra supervised signal, no sampling), **GRPO** and
   **LaCoT**;
5. every model on the same held-out questions (default 300; the README's table: 1000 with ``--seeds 3``): greedy,
   the mean single-sample accuracy, majority vote, Best-of-N (official: the answer's own likelihood; and the
   joint rationale + answer one), BiN and pass@N over N sampled rationales, with π_Φ (the SFT model) writing the
   answers, as LaCoT's evaluation;
6. a table of mean ± standard error over seeds (one seed: the binomial standard error over questions),
   ``results.json``, ``metrics.jsonl`` (every phase, tagged), ``curves.png``, and the list of files written.

Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..loop import run, seed_all
from ..metrics import read_metrics
from . import task, tiny

ARMS = ("continued SFT", "GRPO", "LaCoT")
METHODS = [
    ("greedy", "greedy"),
    ("sample", "sample_mean"),
    ("majority", "majority"),
    ("BoN", "bon"),
    ("BoN-joint", "bon_joint"),
    ("BiN", "bin"),
    ("pass@N", "pass@n"),
]


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lacot-train demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the base model and SFT")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm after SFT (README table: 3)")
    # One thread by default: these matmuls are tiny, and on a busy 2-core machine two spinning OpenMP threads
    # were measured 10x slower per step than one (0.19 s vs 1.74 s per SFT step at load average 4).
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, see above)")
    p.add_argument("--task", choices=task.TASKS, default="paths")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--eval-size", type=int, default=300, help="held-out questions of the final table")
    p.add_argument("--curve-eval-size", type=int, default=200, help="held-out questions of the in-training curves")
    p.add_argument("--sft-steps", type=int, default=130)
    p.add_argument("--rl-steps", type=int, default=80, help="steps of every arm after SFT (8 prompts each)")
    p.add_argument("--bin-n", type=int, default=5, help="N rationales per question for BiN / BoN / majority")
    p.add_argument(
        "--rank-eval-size", type=int, default=0, help="questions of the N-sample columns (0 = all; greedy: all)"
    )
    p.add_argument("--only-seed", type=int, default=None, help="train and evaluate this seed's arms only")
    p.add_argument(
        "--reuse", action="store_true", help="keep data, models and evaluations already in --out (parallel seeds)"
    )
    p.add_argument("--fast", action="store_true", help="a smoke run of every phase in about a minute")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.fast:
        a.train_size, a.eval_size, a.curve_eval_size, a.sft_steps, a.rl_steps, a.bin_n = 200, 16, 8, 6, 2, 3
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    return a


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


def _token_lengths(path: Path, model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [len(tok(r["rationale"], add_special_tokens=False).input_ids) for r in rows]


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
    base = out / "base"
    if not (a.reuse and (data / "eval.jsonl").exists() and (base / "config.json").exists()):
        task.write_split(data, "train", a.train_size, seed=1000 + a.seed, task=a.task)
        task.write_split(data, "eval", a.eval_size, seed=2000 + a.seed, task=a.task)
        tiny.save_base(base, vision=True, seed=a.seed)
    lengths = _token_lengths(data / "train.jsonl", base)
    # Token budgets from the data: room for the longest reference rationale and some more.
    max_len = max(lengths) + 8
    # LaCoT's Tmin (the paper: 64 of a 700-token budget, no ⊤ before it) scaled to rationales of ~20 tokens: half
    # the shortest reference rationale. It bans the degenerate near-empty rationales Tmin guards against and never
    # forbids a real one.
    min_new = min(lengths) // 2
    timings["setup_s"] = time.perf_counter() - t

    def mapping(name: str, model_path: Path, seed: int) -> dict[str, Any]:
        return {
            "model": {"path": str(model_path)},
            "data": {"train_file": str(data / "train.jsonl"), "eval_file": str(data / "eval.jsonl")},
            "train": {
                "out_dir": str(out / name),
                "seed": seed,
                "threads": a.threads,
                "eval_size": a.curve_eval_size,
                "eval_batch_size": 100,
                "max_new_tokens": max_len,
                "answer_max_tokens": 4,
                "resume": "never",
                "progress": not a.quiet,
            },
        }

    # 3. SFT: lr and schedule from shared/research/demo_feasibility.md §3; stopped early on purpose.
    t = time.perf_counter()
    sft_cfg = _merge(
        mapping("sft", base, a.seed),
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
    sft = train(sft_cfg, a.reuse)
    timings["sft_s"] = time.perf_counter() - t
    sft_model = sft.final_dir

    # 4. The arms, from the same SFT checkpoint with the same prompts per step and steps. Continued SFT and LaCoT
    # share the optimizer (lr 1e-4, constant), so the control differs from LaCoT only in the objective: both
    # train on the reference rationale, LaCoT adds sampled ones under its reward. GRPO's lr is ~30x lower: at 1e-4
    # (measured) and 5e-4 (feasibility study) the outcome-only reward let it trade the rationale for answer
    # guessing ("I see 4 4 4 4 ..."); 3e-5 is stable.
    # In-training curves of the arms only for a single-seed run (several seeds: the final evaluation says it all).
    curves = a.seeds == 1 and a.only_seed is None
    rl_train = {"steps": a.rl_steps, "batch_size": 8, "eval_every": max(1, a.rl_steps // 2) if curves else 0}
    arm_cfg = {
        "continued SFT": {"train": {"algorithm": "sft"}, "optim": {"lr": 1e-4}},
        "GRPO": {
            "train": {"algorithm": "grpo"},
            "optim": {"lr": 3e-5},
            "grpo": {"group_size": 6, "temperature": 1.0, "updates_per_batch": 2, "beta": 0.0},
        },
        "LaCoT": {
            "train": {"algorithm": "lacot"},
            "optim": {"lr": 1e-4},
            # λ = 4 on ~20-token rationales: anchors every 4 states plus the terminal state.
            "lacot": {
                "num_samples": 6,
                "stride": 4,
                "max_len": max_len,
                "min_new_tokens": min_new,
                "delta_horizon": a.rl_steps,
                "reward_temp_horizon": a.rl_steps,
            },
        },
    }
    seeds = [a.only_seed] if a.only_seed is not None else list(range(a.seeds))
    runs: dict[str, list[Any]] = {arm: [] for arm in ARMS}
    for s in seeds:
        for arm in ARMS:
            t = time.perf_counter()
            name = f"{arm.lower().replace(' ', '_')}/seed{s}"
            cfg = _merge(mapping(name, sft_model, a.seed + s), {"optim": {"schedule": "constant", "warmup_steps": 0}})
            cfg = _merge(cfg, {"train": rl_train})
            cfg = _merge(cfg, arm_cfg[arm])
            runs[arm].append(train(cfg, a.reuse))
            key = f"{arm.lower().replace(' ', '_')}_s"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t

    # 5. The same held-out questions and sampling seeds for every model; π_Φ (the SFT model) writes the answers.
    from ..config import Config
    from ..data import load_examples
    from ..modeling import Codec, load_model

    cfg = Config()
    examples = load_examples(data / "eval.jsonl", cfg.data, need_rationale=False)[: a.eval_size]
    t = time.perf_counter()
    device = torch.device("cpu")
    sft_net, tok, ip = load_model(cfg.model, device, path=str(sft_model), trainable=False)
    codec = Codec(tok, ip, cfg.format)
    models = [(arm, s, r) for arm in ARMS for s, r in zip(seeds, runs[arm], strict=True)]
    if a.only_seed in (None, 0):  # parallel seed processes: the SFT model is evaluated once, by seed 0's
        models.insert(0, ("SFT", 0, sft))
    rank_size = a.rank_eval_size or len(examples)
    settings_key = {"eval_size": len(examples), "rank_eval_size": rank_size, "bin_n": a.bin_n, "max_len": max_len}
    per_model: list[dict[str, Any]] = []
    for i, (arm, s, r) in enumerate(models):
        cache = Path(r.out_dir) / "demo_eval.json"
        if a.reuse and cache.exists() and json.loads(cache.read_text())["settings"] == settings_key:
            per_model.append({"arm": arm, "seed": s, **json.loads(cache.read_text())["result"]})
            continue
        if not a.quiet:
            print(f"[eval {i + 1}/{len(models)}] {arm} seed {s}: {len(examples)} questions", file=sys.stderr)
        seed_all(a.seed + 12345 + s)
        model = sft_net if arm == "SFT" else load_model(cfg.model, device, path=str(r.final_dir), trainable=False)[0]
        te = time.perf_counter()
        res = evaluate(model, sft_net, codec, examples, rank_size, a.bin_n, max_len, progress=not a.quiet)
        res["eval_s"] = time.perf_counter() - te
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": settings_key, "result": res}))
        os.replace(tmp, cache)
        per_model.append({"arm": arm, "seed": s, **res})
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    # 6. report.
    summary = summarize(per_model, len(examples), rank_size)
    records: list[dict[str, Any]] = [{"phase": "sft", **r} for r in read_metrics(sft.out_dir / "metrics.jsonl")]
    for arm in ARMS:
        for s, r in zip(seeds, runs[arm], strict=True):
            records += [{"phase": arm, "seed": s, **m} for m in read_metrics(r.out_dir / "metrics.jsonl")]
    records += [{"phase": "eval", **r} for r in per_model]
    records.append({"phase": "timings", **timings})
    with (out / "metrics.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    from .plots import plot_demo

    png = plot_demo(
        out / "curves.png",
        read_metrics(sft.out_dir / "metrics.jsonl"),
        {arm: [read_metrics(r.out_dir / "metrics.jsonl") for r in runs[arm]] for arm in ARMS},
        summary,
        [(label.replace("pass@N", f"pass@{a.bin_n}"), key) for label, key in METHODS],
    )
    table = format_table(summary, a, len(examples), rank_size, timings)
    (out / "table.txt").write_text(table + "\n")
    settings = {k: v for k, v in vars(a).items()}
    settings.update(max_new_tokens=max_len, lacot_min_new_tokens=min_new)
    (out / "results.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "per_model": per_model, "timings": timings}, indent=2)
    )
    print(table)
    print(f"\nfiles written under {out}/:")
    print(list_files(out))
    del png
    return 0


@dataclass
class Trained:
    out_dir: Path
    final_dir: Path


def train(mapping: dict[str, Any], reuse: bool) -> Trained:
    """One training run; with ``reuse``, a run whose final model and metrics exist is kept as it is."""
    out_dir = Path(mapping["train"]["out_dir"])
    if reuse and (out_dir / "final" / "config.json").exists() and (out_dir / "metrics.jsonl").exists():
        return Trained(out_dir, out_dir / "final")
    res = run(load_config(None, [], **mapping))
    return Trained(res.out_dir, res.final_dir)


def evaluate(model, answer_model, codec, examples, rank_size: int, n: int, max_len: int, *, progress: bool) -> dict:
    """Greedy accuracy on every question; the N-sample columns (BiN etc.) on the first ``rank_size`` of them."""
    from ..algorithms.bin import bin_evaluate
    from ..rewards import exact_match
    from ..rollout import sample_chains

    head = examples[:rank_size]
    res = bin_evaluate(
        model,
        codec,
        head,
        n=n,
        temperature=0.7,
        max_rationale_tokens=max_len,
        max_answer_tokens=4,
        batch_questions=20,
        answer_model=answer_model,
        progress=progress,
    )
    correct = res["greedy"] * len(head)
    rest = examples[rank_size:]
    for i in range(0, len(rest), 100):
        chunk = rest[i : i + 100]
        chains = sample_chains(
            model,
            codec,
            [codec.prompt(e) for e in chunk],
            max_rationale_tokens=max_len,
            max_answer_tokens=4,
            rationale_temperature=None,
        )
        correct += sum(exact_match(codec.decode(c.answer), e.answer) for c, e in zip(chains, chunk, strict=True))
    res["greedy"] = correct / len(examples)
    return res


def summarize(
    per_model: list[dict[str, Any]], n_questions: int, rank_size: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """arm -> metric -> (mean, standard error). Several seeds: the standard error of the mean over seeds; one
    model: the binomial standard error over the questions (sqrt(p (1 - p) / n))."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for arm in ["SFT", *ARMS]:
        rows = [r for r in per_model if r["arm"] == arm]
        if not rows:
            continue
        out[arm] = {}
        for _, key in METHODS:
            xs = [r[key] for r in rows]
            mean = sum(xs) / len(xs)
            if len(xs) > 1:
                var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
                se = math.sqrt(var / len(xs))
            else:
                n = n_questions if key == "greedy" else rank_size
                se = math.sqrt(max(mean * (1 - mean), 0.0) / max(1, n))
            out[arm][key] = (mean, se)
        out[arm]["seeds"] = (float(len(rows)), 0.0)
    return out


def format_table(summary, a: argparse.Namespace, n_questions: int, rank_size: int, timings: dict[str, float]) -> str:
    n = a.bin_n
    names = [label.replace("pass@N", f"pass@{n}") for label, _ in METHODS]
    head = f"{'model':<15}{'seeds':>6}" + "".join(f" {name:>12}" for name in names)
    lines = [
        f"\nHeld-out accuracy (%) on {n_questions} questions, task {a.task!r} (chance 20%), mean ± standard error.",
        f"Arms: {a.rl_steps} steps x 8 prompts from the same SFT checkpoint; s.e. over seeds "
        "(over questions for a single model).",
        f"sample = mean accuracy of single rationales at T = 0.7; the next four rank the same N = {n} samples"
        + (f" (these five columns: the first {rank_size} questions)" if rank_size < n_questions else "")
        + ";",
        "answers after sampled rationales are written by the SFT model (π_Φ); greedy = the model alone.",
        head,
        "-" * len(head),
    ]
    for arm, row in summary.items():
        cells = "".join(f" {100 * row[key][0]:>5.1f} ± {100 * row[key][1]:<4.1f}" for _, key in METHODS)
        lines.append(f"{arm:<15}{int(row['seeds'][0]):>6}" + cells)
    lines.append(
        "\ntimings: "
        + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items())
        + f"  (torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()})"
    )
    return "\n".join(lines)


def list_files(out: Path) -> str:
    """Every file under ``out``, one line per directory (image folders summarised by their count)."""
    lines = []
    for d in sorted({p.parent for p in out.rglob("*") if p.is_file()}):
        files = sorted(p.name for p in d.iterdir() if p.is_file())
        rel = os.path.join(str(out), str(d.relative_to(out))) if d != out else str(out)
        if len(files) > 12 and all(f.endswith(".png") for f in files):
            lines.append(f"  {rel}/  {len(files)} PNG images")
        else:
            lines.append(f"  {rel}/  " + ", ".join(files))
    return "\n".join(lines)
