"""Build `lacot_kernels._C`: the CUDA kernels and their CPU twins (csrc/).

What gets built, decided at install time:
  * CUDA extension  - torch is a CUDA build and nvcc is found (CUDA_HOME), unless LACOT_SKIP_CUDA_BUILD=1;
  * C++ CPU extension - otherwise, when a C++ compiler is usable;
  * nothing           - no compiler, or LACOT_SKIP_EXT=1: the package still works through Triton / torch.

Honoured variables: TORCH_CUDA_ARCH_LIST (default "9.0" when no GPU is visible), MAX_JOBS, NVCC_THREADS,
LACOT_SKIP_CUDA_BUILD, LACOT_FORCE_CUDA_BUILD, LACOT_SKIP_EXT, DEBUG.
Install with `pip install --no-build-isolation .`: torch is deliberately not a build requirement, so the
extension is compiled against the torch that will import it (libtorch has no stable C++ ABI across releases).
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[lacot_kernels setup] {msg}", file=sys.stderr)


def _compiler_usable() -> bool:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def _extensions():
    if _flag("LACOT_SKIP_EXT"):
        _log("LACOT_SKIP_EXT=1: no compiled extension (Triton / torch backends only)")
        return [], {}
    if not _compiler_usable():
        _log("no C++ compiler found: no compiled extension (Triton / torch backends only)")
        return [], {}
    # A pip-assembled toolkit puts an nvcc wrapper in /usr/local/bin, from which torch would guess
    # CUDA_HOME=/usr/local; point it at the real root before torch.utils.cpp_extension reads it.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time (use --no-build-isolation): no compiled extension")
        return [], {}

    debug = _flag("DEBUG")
    here = os.path.dirname(os.path.abspath(__file__))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++20", "-fopenmp"]
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    include_dirs = [os.path.join(here, "csrc")]
    if not cpp_sources:
        _log("no csrc/*.cpp sources: no compiled extension")
        return [], {}

    want_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(cu_sources)
    if _flag("LACOT_FORCE_CUDA_BUILD"):
        want_cuda = True
    if _flag("LACOT_SKIP_CUDA_BUILD"):
        want_cuda = False

    if want_cuda:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # With no visible GPU torch derives an empty arch list and fails; H100/H200 is the target.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        # The nvidia-* wheels CUDA torch depends on ship cuBLAS/cuSPARSE headers that ATen's CUDA headers
        # include and that a minimal toolkit may lack.
        purelib = sysconfig.get_paths()["purelib"]
        include_dirs += sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include")))
        nvcc_flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["-std=c++20", "--use_fast_math"]
        nvcc_flags += ["--threads", os.environ.get("NVCC_THREADS", "2")]
        _log(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "lacot_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        _log("building the C++ CPU extension (no CUDA kernels)")
        ext = CppExtension(
            "lacot_kernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
)
