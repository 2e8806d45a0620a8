"""`make gpu-check` logic, dry-run on the CPU: steps run under their budgets and the summary file is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_summary():
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--dry-run",
        "--only",
        "build,memcheck",
        "--python",
        sys.executable,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = Path(re.search(r"summary written to (\S+)", proc.stdout).group(1))
    doc = json.loads(path.read_text())
    assert doc["dry_run"] is True and [s["step"] for s in doc["steps"]] == ["build", "memcheck"]
    assert all(s["status"] == "ok" for s in doc["steps"])
    # every CUDA-kernel driver and the fused Triton driver ran (CPU twins / interpreter in a dry run)
    tail = doc["steps"][1]["tail"]
    for name in ("token_logprobs", "group_advantages", "interpolate_rewards", "subtb", "fused_lm_head_triton"):
        assert re.search(rf"(OK|SKIP) +{name}", tail), tail
    modes = {e["mode"] for e in doc["cost_model_estimates"]}
    assert modes == {"fwd", "fwd_bwd", "grpo"}
