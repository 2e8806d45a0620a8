"""``make gpu-check``: the first minutes on an H100 / H200, with nothing prepared, in one command (< 8 minutes).

Steps, each under its own time budget (``timeout``; a step that fails or runs out is recorded and the next runs):
  1. build       ``make build`` (venv, dependencies, the CUDA extension for sm_90)
  2. sm90        ``python -m tests.sm90_compile``: registers / shared memory / spills of every Triton kernel
  3. gpu-tests   ``pytest -m gpu tests benchmarks --benchmark-disable``
  4. memcheck    ``compute-sanitizer --tool memcheck`` on ``benchmarks/sanitize_driver.py`` (every CUDA kernel once,
     plus the fused LM-head Triton kernels)
  5. racecheck   the same under ``--tool racecheck``
  6. bench-fused / bench-grpo: the benchmarks against the peers at the headline shapes (bf16, N=8192, D=4096,
     V=152064 and 128256), ``--bench-size=full``: the harness writes ``benchmarks/results/<gpu>-<date>.json`` and
     the raw pytest-benchmark JSON beside it
Then ``benchmarks/results/<gpu>-<date>-gpu-check.json``: every step's status, time and output tail, the compile
report and the cost-model estimates (so measured and estimated sit side by side).

``--dry-run`` runs the same logic on a CPU machine at tiny sizes (no build, CPU twins, the Triton interpreter,
smoke-size benchmarks, output in a temporary folder): ``python -m benchmarks.gpu_check --dry-run``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480
# Seconds per step (they add up to the total budget; the benchmarks get what the others leave).
BUDGET = {
    "build": 120,
    "sm90": 30,
    "gpu-tests": 60,
    "memcheck": 40,
    "racecheck": 40,
    "bench-fused-152k": 90,
    "bench-fused-128k": 50,
    "bench-grpo": 50,
}
# The benchmark steps: ours (the Triton path, the CUDA default) against every peer, all rows valid, forward with
# entropy and forward+backward. The other cases (50% ignored rows, no-grad scoring, our other backends) are in
# `make bench`.
_BENCH_K = "not ign50 and not fwd_nograd and not lacot-torch and not lacot-cuda"
BENCH = (
    ("bench-fused-152k", "benchmarks/test_bench_fused_linear.py", f"152064 and {_BENCH_K}"),
    ("bench-fused-128k", "benchmarks/test_bench_fused_linear.py", f"128256 and {_BENCH_K}"),
    ("bench-grpo", "benchmarks/test_bench_grpo.py", "not lacot-torch and not lacot-cuda"),
)


def _gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, IndexError):
        return ""


def _sanitizer() -> str | None:
    for cand in (
        shutil.which("compute-sanitizer"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"),
        "/usr/local/cuda/bin/compute-sanitizer",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _run(name: str, cmd: list[str], budget: float, env: dict, log: list[dict]) -> dict:
    t0 = time.time()
    print(f"== {name} (budget {budget:.0f}s): {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, budget))
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {budget:.0f}s"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    except OSError as e:
        status, out = f"could not start: {e}", ""
    row = {"step": name, "cmd": " ".join(cmd), "status": status, "seconds": round(time.time() - t0, 1)}
    row["tail"] = out[-4000:]
    print(out[-2500:], flush=True)
    print(f"== {name}: {status} in {row['seconds']}s", flush=True)
    log.append(row)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="exercise the logic on a CPU at tiny sizes")
    ap.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    ap.add_argument("--python", default=".venv/bin/python", help="the interpreter of the steps after the build")
    a = ap.parse_args(argv)
    t_start = time.time()
    # This script needs only the standard library (it may start before the venv exists); the steps run in the venv.
    py = str(REPO / a.python) if not os.path.isabs(a.python) else a.python
    env = dict(os.environ)
    day = datetime.date.today().strftime("%Y%m%d")
    gpu = "" if a.dry_run else _gpu_name()
    if not a.dry_run and not gpu:
        print("gpu-check: no NVIDIA GPU visible (nvidia-smi); use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu or "cpu-dry-run").strip("-")
    out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_")) if a.dry_run else REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    only = {s for s in a.only.split(",") if s}
    log: list[dict] = []

    def want(step):
        return not only or step in only

    def left(step):
        return min(BUDGET[step], TOTAL_BUDGET_S - (time.time() - t_start))

    if want("build"):
        env_b = dict(env, MAX_JOBS=str(os.cpu_count() or 2))
        _run("build", ["make", "-n" if a.dry_run else "-s", "build"], left("build"), env_b, log)
    if want("sm90") and not a.dry_run:  # CPU-bound compile work; `make test` runs it on every machine
        env_c = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
        _run("sm90", [py, "-m", "tests.sm90_compile", "--json", str(out_dir / f"{stem}-{day}-sm90.json")],
             left("sm90"), env_c, log)  # fmt: skip
    if want("gpu-tests"):
        where = (
            ["tests/test_lm_head.py", "benchmarks/test_bench_fused_linear.py"] if a.dry_run else ["tests", "benchmarks"]
        )
        cmd = [py, "-m", "pytest", "-q", "-m", "gpu", *where, "--benchmark-disable", "-p", "no:cacheprovider"]
        _run("gpu-tests", cmd, left("gpu-tests"), env, log)
    driver = [py, "-m", "benchmarks.sanitize_driver"] + (["--device", "cpu"] if a.dry_run else [])
    san = _sanitizer()
    for tool in ("memcheck", "racecheck"):
        if not want(tool):
            continue
        if a.dry_run or san is None:
            # Dry run (or no sanitizer installed): the drivers alone, so their logic is still exercised.
            row = _run(tool, driver, left(tool), env, log)
            if san is None and not a.dry_run:
                row["status"] += " (compute-sanitizer not found: drivers ran without it)"
        else:
            _run(tool, [san, "--tool", tool, "--error-exitcode", "1", *driver], left(tool), env, log)
    size = "smoke" if a.dry_run else "full"
    for step, path, k in BENCH:
        if not want(step):
            continue
        if a.dry_run:  # the smoke shapes, our torch backend against torch eager, and the cost model
            if step != "bench-fused-152k":
                continue
            k = "lacot-torch or torch-eager or cost_model"
        raw = out_dir / f"{stem}-{day}-{step}.raw.json"
        cmd = [py, "-m", "pytest", "-q", path, f"--bench-size={size}", f"--benchmark-json={raw}", "-s", "-k", k]
        _run(step, cmd, left(step), env, log)

    sys.path.insert(0, str(REPO))
    from benchmarks import cost_model

    estimates = [
        {"mode": m, "N": N, "D": D, "V": V, "gpu": g, "roofline_ms": round(c.roofline_ms, 2),
         "estimate_ms": round(c.estimate_ms, 2), "tflop": round(c.flops / 1e12, 2), "hbm_gb": round(c.bytes / 1e9, 2)}
        for N, D, V in cost_model.HEADLINE for g in cost_model.GPUS for m in cost_model.MODES
        for c in [cost_model.cost(m, N, D, V, g)]
    ]  # fmt: skip
    doc = {
        "device": gpu or "cpu (dry run)",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "dry_run": a.dry_run,
        "seconds": round(time.time() - t_start, 1),
        "steps": log,
        "cost_model_estimates": estimates,
    }
    summary = out_dir / f"{stem}-{day}-gpu-check.json"
    summary.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"gpu-check: {len(log)} steps in {doc['seconds']}s; summary written to {summary}")
    for row in log:
        print(f"  {row['step']:<12} {row['status']:<40} {row['seconds']:>6}s")
    return 0 if all(r["status"].startswith("ok") for r in log) else 1


if __name__ == "__main__":
    sys.exit(main())
