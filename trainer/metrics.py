"""Metrics: one JSON object per line in ``<out_dir>/metrics.jsonl`` (always), tensorboard when asked, a PNG plot.

On resume the file is cut back to the lines the checkpoint had seen, so a killed-and-resumed run ends with the
same file as an uninterrupted one (wall-clock fields aside).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

TIME_KEYS = ("time_s", "step_time_s", "elapsed_s")  # wall-clock: the only fields that differ between reruns


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsLogger:
    def __init__(self, out_dir: Path, *, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.lines = 0
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
                except ImportError as exc:  # optional dependency
                    raise ImportError("train.tensorboard=true needs the tensorboard package") from exc

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` lines (the ones written before the checkpoint being resumed)."""
        if not self.enabled:
            return
        kept = []
        if self.path.exists():
            kept = self.path.read_text().splitlines()[:lines]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.lines = len(kept)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        self.lines += 1
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_curves(panels: list[tuple], out_png: str | Path) -> Path:
    """One subplot per panel, written as a PNG (matplotlib, Agg).

    A panel is ``(title, [(label, xs, ys), ...])`` (lines), or ``(title, [(label, categories, values), ...],
    "bar")`` (grouped bars, one group per category).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series, *kind) in zip(axes.flat, panels, strict=False):
        if kind == ["bar"]:
            width = 0.8 / max(1, len(series))
            for i, (label, cats, vals) in enumerate(series):
                xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cats))]
                ax.bar(xs, vals, width=width, label=label)
            ax.set_xticks(range(len(series[0][1])), series[0][1], fontsize=8)
            lo = min(v for _, _, vals in series for v in vals)
            ax.set_ylim(max(0.0, lo - 0.1), 1.0)
        for label, xs, ys in series if kind != ["bar"] else []:
            ax.plot(xs, ys, label=label, lw=1.4, marker="o" if len(xs) < 12 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if any(label for label, _, _ in series):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
