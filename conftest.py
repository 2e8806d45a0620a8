"""Root conftest: runs before any test module imports lacot_kernels.

Without a GPU the Triton kernels run on CPU tensors through the interpreter, which is read when `@triton.jit`
executes, i.e. at import of the op modules: it must be set here, first.
"""

import getpass
import os
import shutil
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep datasets/hub caches and telemetry away from the network and the home directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Every temporary file of the run - pytest's tmp_path, tempfile.mkdtemp in benchmarks, torchrun's torchelastic_*
# logs in the subprocesses the trainer tests start (they inherit TMPDIR) - goes into one directory that is removed
# when the run ends (LACOT_KEEP_TMP=1 keeps it, e.g. to inspect a failure). The Inductor compile cache stays where
# torch puts it by default, so repeated runs stay warm instead of recompiling.
_SYSTEM_TMP = tempfile.gettempdir()
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_SYSTEM_TMP, f"torchinductor_{getpass.getuser()}"))
RUN_TMP = tempfile.mkdtemp(prefix="lacot-tests-")
os.environ["TMPDIR"] = RUN_TMP
tempfile.tempdir = RUN_TMP

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        default="full",
        choices=("smoke", "full"),
        help="benchmarks: 'smoke' runs tiny shapes (CI), 'full' the issue's shapes for this device",
    )


def pytest_unconfigure(config):
    if os.environ.get("LACOT_KEEP_TMP", "0") == "1":
        print(f"\nlacot tests: temporary files kept in {RUN_TMP}")
        return
    shutil.rmtree(RUN_TMP, ignore_errors=True)
