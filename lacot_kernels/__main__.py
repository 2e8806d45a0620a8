"""``python -m lacot_kernels``: what this installation can run, and why not where it cannot.

Reports the package, Python, torch / Triton / CUDA versions, the GPUs torch sees (name, compute capability), the
compiled extension (loaded or the import error, what setup.py recorded at build time, the CUDA archs whose code is
embedded in the ``.so`` - read from its fatbinary headers, no CUDA toolkit needed), which backends every op can use
per device type and why the others cannot, and the installed peers. ``--json`` prints the same as one JSON object.
Paste its output into bug reports.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any

import torch

import lacot_kernels
from lacot_kernels import _registry

# Public op -> (the compiled kernel op it uses, or None; whether it has Triton kernels). Composites of other ops
# (dpo_loss, sequence_logprobs, bin_rank) run wherever their parts run and are not listed.
OPS: dict[str, tuple[str | None, bool]] = {
    "token_logprobs": ("token_logprobs_fwd_native", True),
    "fused_linear_token_logprobs": ("token_logprobs_fwd_native", True),
    "grpo_loss": (None, True),
    "fused_linear_grpo_loss": (None, True),
    "group_advantages": ("group_advantages_fwd_native", True),
    "interpolate_rewards": ("interpolate_rewards_fwd_native", True),
    "subtb_loss": ("subtb_fwd_native", True),
}

# Packages users compare against or run us inside; reported with their versions (or as not installed).
PEERS = (
    "transformers",
    "trl",
    "verl",
    "liger-kernel",
    "cut-cross-entropy",
    "flash-attn",
    "peft",
    "accelerate",
    "vllm",
    "deepspeed",
    "unsloth",
    "quack-kernels",
)

_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
_FATBIN_KINDS = {1: "compute", 2: "sm"}  # entry kind 1 = PTX (JIT-compiled for newer GPUs), 2 = SASS (ELF)


def fatbin_archs(path: str | os.PathLike) -> list[str]:
    """CUDA code embedded in a shared object, e.g. ``["sm_90"]`` (SASS) or ``["compute_90"]`` (PTX).

    Read from the fatbinary containers nvcc links into the ``.so``: a 16-byte header (magic 0xBA55ED50, version,
    header size, payload size) followed by entries whose headers hold their kind, header size, payload size and
    the target arch (at byte 28). An ``.so`` without CUDA code gives ``[]``.
    """
    data = Path(path).read_bytes()
    found: set[str] = set()
    start = data.find(_FATBIN_MAGIC)
    while start != -1:
        if start + 16 > len(data):
            break
        header_size, payload_size = struct.unpack_from("<HQ", data, start + 6)
        pos, end = start + header_size, min(start + header_size + payload_size, len(data))
        while pos + 32 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, pos)
            (arch,) = struct.unpack_from("<I", data, pos + 28)
            if entry_header == 0:
                break
            found.add(f"{_FATBIN_KINDS.get(kind, f'kind{kind}')}_{arch}")
            pos += entry_header + entry_size
        start = data.find(_FATBIN_MAGIC, max(end, start + 4))
    return sorted(found)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extension() -> dict[str, Any]:
    info: dict[str, Any] = {"loaded": False, "path": None, "error": None, "archs": [], "build": None}
    if os.environ.get("LACOT_DISABLE_EXT", "0") == "1":
        info["error"] = "LACOT_DISABLE_EXT=1"
    else:
        try:
            mod = importlib.import_module("lacot_kernels._C")
            info["loaded"] = True
            info["path"] = getattr(mod, "__file__", None)
        except ImportError as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"
    if info["path"]:
        try:
            info["archs"] = fatbin_archs(info["path"])
        except OSError as exc:
            info["archs_error"] = str(exc)
    build_file = Path(lacot_kernels.__file__).with_name("_build_info.json")
    if build_file.is_file():
        try:
            info["build"] = json.loads(build_file.read_text())
        except (OSError, ValueError) as exc:
            info["build"] = {"error": f"unreadable {build_file}: {exc}"}
    info["kernels"] = {dev: _registry.native_available(dev) for dev in ("cpu", "cuda")}
    info["build_mismatch"] = _build_mismatch(info)
    return info


def _build_mismatch(info: dict[str, Any]) -> str | None:
    """Why the recorded build does not describe the loaded ``.so`` (a later ``pip wheel``/install rewrote the
    record, or the ``.so`` was copied in by hand); None when they agree."""
    build = info["build"]
    if not build or "extension" not in build or not info["loaded"]:
        return None
    kind = "cuda" if info["kernels"]["cuda"] else "cpu"
    if build["extension"] != kind:
        return f"the record says {build['extension']!r} but the loaded _C has {kind!r} kernels"
    return None


def _why_not_compiled(device_type: str, native_op: str | None, ext: dict[str, Any]) -> str | None:
    if native_op is None:
        return "no compiled kernel for this op"
    if _registry.native_available(device_type, native_op):
        return None
    if not ext["loaded"]:
        return f"_C not loaded ({ext['error']})"
    if device_type == "cuda":
        return "_C was built without CUDA kernels"
    return f"_C has no {device_type} kernel for lacot::{native_op}"


def _why_not_triton(device_type: str, has_triton: bool) -> str | None:
    if not has_triton:
        return "no Triton kernel for this op"
    if _registry.triton_available(device_type):
        return None
    from lacot_kernels.ops import _triton_utils

    if not _triton_utils.HAS_TRITON:
        return "triton is not installed"
    return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import; slow, for tests)"


def _backends(ext: dict[str, Any], device_types: list[str]) -> dict[str, dict[str, dict[str, str | None]]]:
    """op -> device type -> backend -> None (available) or the reason it is not."""
    table: dict[str, dict[str, dict[str, str | None]]] = {}
    for op, (native_op, has_triton) in OPS.items():
        table[op] = {
            dev: {
                "cuda": _why_not_compiled(dev, native_op, ext),
                "triton": _why_not_triton(dev, has_triton),
                "torch": None,
            }
            for dev in device_types
        }
    return table


def collect() -> dict[str, Any]:
    """Everything the report shows, as plain data (what ``--json`` prints)."""
    triton_version = _version("triton")
    gpus = []
    cuda_error = None
    try:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    except RuntimeError as exc:  # a driver problem shows up here, not as a crash of the report
        cuda_error = str(exc)
    if not gpus and cuda_error is None and torch.version.cuda is not None:
        cuda_error = "torch.cuda.is_available() is False (no GPU visible, or no driver)"
    ext = _extension()
    device_types = ["cpu"] + (["cuda"] if gpus else [])
    return {
        "lacot_kernels": {"version": lacot_kernels.__version__, "path": str(Path(lacot_kernels.__file__).parent)},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "gpus": gpus,
        "cuda_error": cuda_error,
        "extension": ext,
        "backends": _backends(ext, device_types),
        "peers": {name: _version(name) for name in PEERS},
    }


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report."""
    na = "not installed"
    lines = [
        f"lacot_kernels {r['lacot_kernels']['version']}  ({r['lacot_kernels']['path']})",
        f"python        {r['python']}  ({r['platform']})",
        f"torch         {r['torch']['version']}  (CUDA {r['torch']['cuda'] or 'none'}"
        + (f", cuDNN {r['torch']['cudnn']}" if r["torch"]["cudnn"] else "")
        + ")",
        f"triton        {r['triton'] or na}"
        + ("  (TRITON_INTERPRET=1: kernels run on CPU tensors)" if r["triton_interpret"] else ""),
    ]
    if r["gpus"]:
        for g in r["gpus"]:
            lines.append(f"GPU {g['index']}         {g['name']}  (compute capability {g['capability']})")
    else:
        lines.append(f"GPU           none  ({r['cuda_error'] or 'torch has no CUDA'})")

    ext = r["extension"]
    lines.append("")
    if ext["loaded"]:
        lines.append(f"_C            loaded  ({ext['path']})")
    else:
        lines.append(f"_C            not loaded: {ext['error']}")
    kernels = [dev for dev, ok in ext["kernels"].items() if ok]
    lines.append(f"  kernels     {', '.join(kernels) if kernels else 'none'} (registered dispatch keys)")
    if ext["loaded"]:
        lines.append(f"  CUDA code   {', '.join(ext['archs']) if ext['archs'] else 'none'} (embedded in the .so)")
    build = ext["build"]
    if build:
        lines.append(
            f"  built as    {build.get('extension')} against torch {build.get('torch')} "
            f"(CUDA {build.get('torch_cuda')}), TORCH_CUDA_ARCH_LIST={build.get('cuda_arch_list')}"
        )
        lines.append(f"  because     {build.get('reason')}")
        if ext.get("build_mismatch"):
            lines.append(f"  WARNING     stale build record: {ext['build_mismatch']}")
    else:
        lines.append("  built as    unknown (no _build_info.json: installed by an older setup.py)")

    lines.append("")
    lines.append("backends per op (auto tries cuda, then triton, then torch; 'cuda' = the compiled _C kernels):")
    for op, per_dev in r["backends"].items():
        for dev, backends in per_dev.items():
            ok = [b for b, why in backends.items() if why is None]
            lines.append(f"  {op:<28} {dev:<5} {', '.join(ok)}")
            for b, why in backends.items():
                if why is not None:
                    lines.append(f"  {'':<28} {'':<5}   no {b}: {why}")

    lines.append("")
    lines.append("peers:")
    for name, version in r["peers"].items():
        lines.append(f"  {name:<18} {version or na}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lacot_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
