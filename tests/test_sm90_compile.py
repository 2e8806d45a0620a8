"""Every Triton kernel compiles for sm_90 (H100 / H200) at its launcher's real config: no compile error, shared
memory within 227 KB, no register spills in the bf16/fp16 paths, 64-bit 2-D addresses in the LM-head kernels.

The compile runs in a subprocess (``python -m tests.sm90_compile``): the launchers must be imported with
TRITON_INTERPRET unset to choose their GPU configs, and this process has it set. About 30-60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sm90.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sm90_compile", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])  # the per-kernel table (registers, shared memory, spills)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["kernels"]
    names = {r["kernel"] for r in rows}
    # The LM-head kernels are there, on tensor cores in their 16-bit variants.
    assert {"_fused_linear_fwd_kernel", "_fused_linear_dlogits_kernel", "_fused_grpo_tile_kernel"} <= names
    lm = [r for r in rows if r["kernel"].startswith("_fused_linear") and "float32" not in r["case"]]
    assert lm and all(r["tensor_cores"] == "wgmma" and r["spill_stores"] == 0 for r in lm), lm


def test_narrow_offset_detector_flags_32_bit_offsets():
    # The IR check that guards the int64 offsets: a 2-D pointer add with i32 offsets is flagged, i64 is not.
    from tests.sm90_compile import _narrow_2d_offsets

    i32 = "%5 = tt.addptr %3, %4 : tensor<128x64x!tt.ptr<bf16>>, tensor<128x64xi32> loc(#loc1)"
    i64 = "%5 = tt.addptr %3, %4 : tensor<128x64x!tt.ptr<bf16>>, tensor<128x64xi64> loc(#loc1)"
    one_d = "%5 = tt.addptr %3, %4 : tensor<128x!tt.ptr<f32>>, tensor<128xi32> loc(#loc1)"
    assert _narrow_2d_offsets("\n".join([i32, i64, one_d])) == [i32]
