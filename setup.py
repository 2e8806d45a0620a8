"""Build `lacot_kernels._C`: the CUDA kernels and their CPU twins (csrc/).

What gets built, decided at install time by :func:`plan_build`:
  * CUDA extension    - torch is a CUDA build and nvcc is found (CUDA_HOME), unless LACOT_SKIP_CUDA_BUILD=1;
  * C++ CPU extension - otherwise (or with LACOT_SKIP_CUDA_BUILD=1);
  * nothing           - only when asked for with LACOT_SKIP_EXT=1: the package then runs on Triton / torch alone.
A build that cannot compile what it should (torch not importable - pip's default build isolation hides it - or
no C++ compiler) stops with one line saying why and what to type, instead of installing without kernels.

Honoured variables: TORCH_CUDA_ARCH_LIST (default "9.0" when no GPU is visible), MAX_JOBS, NVCC_THREADS,
LACOT_SKIP_CUDA_BUILD, LACOT_FORCE_CUDA_BUILD, LACOT_SKIP_EXT, DEBUG.
Install with `pip install --no-build-isolation .`: torch is deliberately not a build requirement, so the
extension is compiled against the torch that will import it (libtorch has no stable C++ ABI across releases).
What was built (kind, torch, CUDA, archs) is written to lacot_kernels/_build_info.json for `python -m lacot_kernels`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "lacot_kernels", "_build_info.json")


class BuildStop(Exception):
    """The build cannot produce the kernels it should; the message is the one line the user sees."""


@dataclass
class BuildPlan:
    kind: str  # "cuda" | "cpu" | "none"
    reason: str
    cuda_arch_list: str | None = None
    torch: ModuleType | None = field(default=None, repr=False)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[lacot_kernels setup] {msg}", file=sys.stderr)


def _compiler_usable(env: Mapping[str, str]) -> bool:
    return shutil.which(env.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def _import_torch() -> ModuleType:
    import torch
    import torch.utils.cpp_extension  # noqa: F401  (reads CUDA_HOME at import)

    return torch


def plan_build(
    env: Mapping[str, str],
    import_torch: Callable[[], ModuleType] = _import_torch,
    compiler_usable: Callable[[Mapping[str, str]], bool] = _compiler_usable,
    has_cu_sources: bool = True,
) -> BuildPlan:
    """Which extension to build, or :class:`BuildStop` with the one-line reason and the command to type."""
    skip_hint = "or `LACOT_SKIP_EXT=1 pip install .` for a pure-Python install without compiled kernels"
    if _flag(env, "LACOT_SKIP_EXT"):
        return BuildPlan("none", "LACOT_SKIP_EXT=1: no compiled extension (Triton / torch backends only)")
    if not compiler_usable(env):
        raise BuildStop(
            f"lacot_kernels: no C++ compiler found (CXX={env.get('CXX', 'c++')!r}, g++): install one "
            f"(e.g. `apt-get install g++`) and rerun, {skip_hint}"
        )
    try:
        torch = import_torch()
    except ImportError as exc:
        raise BuildStop(
            f"lacot_kernels: torch is not importable at build time ({exc}; pip's default build isolation hides "
            f"the installed torch): install torch first, then `pip install --no-build-isolation .`, {skip_hint}"
        ) from None
    cuda_home = torch.utils.cpp_extension.CUDA_HOME
    want_cuda = torch.version.cuda is not None and cuda_home is not None and has_cu_sources
    why = (
        f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and nvcc is at {cuda_home}"
        if want_cuda
        else f"torch {torch.__version__} has no CUDA (torch.version.cuda={torch.version.cuda}) or no nvcc was "
        f"found (CUDA_HOME={cuda_home})"
    )
    if _flag(env, "LACOT_FORCE_CUDA_BUILD"):
        want_cuda, why = True, "LACOT_FORCE_CUDA_BUILD=1"
    if _flag(env, "LACOT_SKIP_CUDA_BUILD"):
        want_cuda, why = False, "LACOT_SKIP_CUDA_BUILD=1"
    if not want_cuda:
        return BuildPlan("cpu", f"C++ CPU extension only: {why}", torch=torch)
    # With no visible GPU torch derives an empty arch list and fails; H100/H200 (sm_90) is the target.
    archs = env.get("TORCH_CUDA_ARCH_LIST") or ("" if torch.cuda.is_available() else "9.0")
    return BuildPlan("cuda", f"CUDA + C++ CPU extension: {why}", cuda_arch_list=archs or None, torch=torch)


def _visible_arch_list(torch: ModuleType) -> str:
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def _write_build_info(plan: BuildPlan) -> None:
    torch = plan.torch
    info = {
        "extension": plan.kind,
        "reason": plan.reason,
        "torch": torch.__version__ if torch is not None else None,
        "torch_cuda": torch.version.cuda if torch is not None else None,
        "cuda_arch_list": plan.cuda_arch_list,
        "debug": _flag(os.environ, "DEBUG"),
    }
    try:
        with open(BUILD_INFO, "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
    except OSError as exc:  # a read-only source tree: the report then says "unknown"
        _log(f"could not record the build in {BUILD_INFO}: {exc}")


def _extensions(plan: BuildPlan) -> tuple[list, dict]:
    if plan.kind == "none":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = _flag(os.environ, "DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++20", "-fopenmp"]
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    include_dirs = [os.path.join(HERE, "csrc")]
    if plan.kind == "cuda":
        if plan.cuda_arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = plan.cuda_arch_list
        else:
            plan.cuda_arch_list = _visible_arch_list(plan.torch)
        # The nvidia-* wheels CUDA torch depends on ship cuBLAS/cuSPARSE headers that ATen's CUDA headers
        # include and that a minimal toolkit may lack.
        purelib = sysconfig.get_paths()["purelib"]
        include_dirs += sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include")))
        nvcc_flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["-std=c++20", "--use_fast_math"]
        nvcc_flags += ["--threads", os.environ.get("NVCC_THREADS", "2")]
        _log(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={plan.cuda_arch_list} ({plan.reason})")
        ext = CUDAExtension(
            "lacot_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        _log(f"building the {plan.reason}")
        ext = CppExtension(
            "lacot_kernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


def main() -> None:
    import warnings

    from setuptools import setup

    # setuptools reports every editable install of a package_dir-mapped layout (trainer/ -> lacot_kernels.trainer)
    # through a warning class of its own that it documents as information, not a warning ("folders named like
    # your package may take precedence"): expected for a repository checkout, so it is not printed.
    warnings.filterwarnings("ignore", message=r"Editable installation\.")

    # A pip-assembled toolkit puts an nvcc wrapper in /usr/local/bin, from which torch would guess
    # CUDA_HOME=/usr/local; point it at the real root before torch.utils.cpp_extension reads it.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        plan = plan_build(os.environ, has_cu_sources=bool(glob.glob(os.path.join(HERE, "csrc", "*.cu"))))
    except BuildStop as stop:
        # One line, last in pip's output, and a non-zero exit before pip resolves (and downloads) anything.
        raise SystemExit(str(stop)) from None
    if plan.kind == "none":
        _log(plan.reason)
    ext_modules, cmdclass = _extensions(plan)
    _write_build_info(plan)
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
    )


# setuptools' PEP 517 backend runs this file as __main__; tests import it to call plan_build.
if __name__ == "__main__":
    main()
