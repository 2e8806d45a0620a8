"""The demo's figure: training curves (raw + smoothed) and the final accuracy bars, labelled axes, 0-based accuracy.

A step metric of an RL run (batch reward, SubTB loss, accepted fraction) is noisy from step to step: it is drawn
faint, with an exponential moving average on top. Accuracies are percentages on an axis that starts at 0, so
bar heights compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARM_COLOURS = {"SFT": "tab:gray", "continued SFT": "tab:blue", "GRPO": "tab:orange", "LaCoT": "tab:green"}


def ema(ys: list[float], alpha: float = 0.15) -> list[float]:
    """Exponential moving average (alpha = weight of the newest point), bias-corrected at the start."""
    out, m, w = [], 0.0, 0.0
    for y in ys:
        m = (1 - alpha) * m + alpha * y
        w = (1 - alpha) * w + alpha
        out.append(m / w)
    return out


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _line(ax, xs, ys, label, colour, smooth):
    if not xs:
        return
    if smooth and len(xs) > 5:
        ax.plot(xs, ys, color=colour, lw=0.6, alpha=0.25)
        ax.plot(xs, ema(ys), color=colour, lw=1.6, label=label)
    else:
        ax.plot(xs, ys, color=colour, lw=1.6, marker="o", ms=3, label=label)


def plot_demo(
    out_png: Path,
    sft_history: list[dict[str, Any]],
    arm_histories: dict[str, list[list[dict[str, Any]]]],
    summary: dict[str, dict[str, tuple[float, float]]],
    methods: list[tuple[str, str]],
) -> Path:
    """``arm_histories``: arm -> one metrics history per seed; ``summary``: arm -> metric -> (mean, standard error)
    as fractions; ``methods``: (label, metric key) of the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 7.6))
    ax = axes[0, 0]
    _line(ax, *series(sft_history, "loss"), "SFT", ARM_COLOURS["SFT"], True)
    ax.set(title="SFT: training loss", xlabel="SFT step (32 prompts)", ylabel="token cross-entropy (nats)")
    ax.set_ylim(bottom=0)

    ax = axes[0, 1]
    xs, ys = series(sft_history, "eval/greedy_acc")
    _line(ax, xs, [100 * y for y in ys], "SFT", ARM_COLOURS["SFT"], False)
    ax.set(title="SFT: held-out greedy accuracy", xlabel="SFT step", ylabel="accuracy (%)", ylim=(0, 100))

    ax = axes[0, 2]
    for arm, runs in arm_histories.items():
        for i, h in enumerate(runs):
            xs, ys = series(h, "eval/greedy_acc")
            if not xs:
                continue
            ax.plot(xs, [100 * y for y in ys], color=ARM_COLOURS.get(arm), lw=1.2, marker="o", ms=3,
                    alpha=0.8, label=arm if i == 0 else None)  # fmt: skip
    ax.set(title="after SFT: held-out greedy accuracy (each seed)", xlabel="step (8 prompts)", ylabel="accuracy (%)")
    if not ax.lines:  # several seeds: the arms skip in-training evaluation (the final table has it)
        ax.text(0.5, 0.5, "in-training curves: single-seed runs only", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, 100)

    def per_seed(ax, arm: str, key: str, label: str, title: str, ylabel: str) -> None:
        for i, h in enumerate(arm_histories.get(arm, [])):
            _line(ax, *series(h, key), label if i == 0 else None, ARM_COLOURS.get(arm), True)
        ax.set(title=title, xlabel="step (8 prompts)", ylabel=ylabel)

    per_seed(axes[0, 3], "continued SFT", "loss", "continued SFT", "continued SFT: loss (EMA)", "cross-entropy (nats)")
    axes[0, 3].set_ylim(bottom=0)
    per_seed(axes[1, 0], "GRPO", "reward", "GRPO", "GRPO: mean batch reward (EMA)", "reward (T = 1 samples)")
    axes[1, 0].set_ylim(bottom=0)
    per_seed(axes[1, 1], "LaCoT", "loss", "LaCoT", "LaCoT: SubTB loss (EMA)", "loss (sum over accepted rows)")
    axes[1, 1].set_yscale("log")
    per_seed(axes[1, 2], "LaCoT", "accept", "LaCoT", "LaCoT: RGFN accepted fraction (EMA)", "fraction of explored")
    axes[1, 2].set_ylim(0, 1.05)

    ax = axes[1, 3]
    arms = list(summary)
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(methods))]
        means = [100 * summary[arm][key][0] for _, key in methods]
        errs = [100 * summary[arm][key][1] for _, key in methods]
        ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=arm, color=ARM_COLOURS.get(arm))
    ax.set_xticks(range(len(methods)), [m for m, _ in methods], fontsize=8)
    ax.set(title="held-out accuracy (mean ± s.e.)", xlabel="how the answer is picked", ylabel="accuracy (%)")
    ax.set_ylim(0, 100)
    for a in axes.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
