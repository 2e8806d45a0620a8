"""`python -m lacot_kernels`: the environment report states what this process actually has."""

from __future__ import annotations

import importlib.metadata
import json
import struct
import subprocess
import sys

import torch

import lacot_kernels
from lacot_kernels import __main__ as report
from lacot_kernels import _registry


def test_collect_matches_the_process():
    r = report.collect()
    assert r["lacot_kernels"]["version"] == lacot_kernels.__version__
    assert r["torch"]["version"] == torch.__version__ and r["torch"]["cuda"] == torch.version.cuda
    assert len(r["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ext = r["extension"]
    assert ext["kernels"] == {"cpu": _registry.native_available("cpu"), "cuda": _registry.native_available("cuda")}
    # Per op and device: the compiled backend is offered exactly when its kernel is registered, Triton exactly when
    # the registry says it can run, torch always.
    for op, (native_op, has_triton) in report.OPS.items():
        for dev, backends in r["backends"][op].items():
            native_ok = native_op is not None and _registry.native_available(dev, native_op)
            assert (backends["cuda"] is None) == native_ok, (op, dev, backends)
            assert (backends["triton"] is None) == (has_triton and _registry.triton_available(dev)), (op, dev)
            assert backends["torch"] is None
            assert all(isinstance(why, str) and why for why in backends.values() if why is not None)
    for name, version in r["peers"].items():
        try:
            assert version == importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            assert version is None


def test_fatbin_archs_reads_sass_and_ptx_entries(tmp_path):
    # Two fatbinary containers as nvcc lays them out, inside junk: an sm_90 ELF entry, then sm_80 ELF + PTX 90.
    def entry(kind, arch, payload):
        head = struct.pack("<HHIQ", kind, 0x0101, 64, len(payload)) + struct.pack("<IIHHI", 0, 0, 8, 1, arch)
        return head.ljust(64, b"\0") + payload

    def container(*entries):
        body = b"".join(entries)
        return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body

    blob = b"junk" * 10 + container(entry(2, 90, b"x" * 33)) + b"\0" * 7
    blob += container(entry(2, 80, b"y" * 5), entry(1, 90, b"ptx\0"))
    path = tmp_path / "fake.so"
    path.write_bytes(blob)
    assert report.fatbin_archs(path) == ["compute_90", "sm_80", "sm_90"]
    (tmp_path / "none.so").write_bytes(b"\x7fELF" + b"\0" * 100)
    assert report.fatbin_archs(tmp_path / "none.so") == []


def test_loaded_extension_archs_agree_with_its_kernels():
    ext = report.collect()["extension"]
    if not ext["loaded"]:
        assert ext["error"] and ext["archs"] == []
        return
    # CUDA kernels registered <=> SASS/PTX embedded in the .so.
    assert bool(ext["archs"]) == ext["kernels"]["cuda"], ext
    assert all(a.startswith(("sm_", "compute_")) for a in ext["archs"])


def test_stale_build_record_is_flagged():
    info = {"loaded": True, "kernels": {"cpu": True, "cuda": True}, "build": {"extension": "none"}}
    assert "cuda" in report._build_mismatch(info)
    info["build"] = {"extension": "cuda"}
    assert report._build_mismatch(info) is None


def test_module_entry_point_prints_report_and_json():
    proc = subprocess.run(
        [sys.executable, "-m", "lacot_kernels", "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["torch"]["version"] == torch.__version__
    assert set(data["backends"]) == set(report.OPS)
    text = report.format_report(data)
    assert text.startswith(f"lacot_kernels {lacot_kernels.__version__}")
    for needle in ("torch", "triton", "GPU", "_C", "backends per op", "peers:", "token_logprobs"):
        assert needle in text
