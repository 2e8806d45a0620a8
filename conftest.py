"""Root conftest: runs before any test module imports lacot_kernels.

Without a GPU the Triton kernels run on CPU tensors through the interpreter, which is read when `@triton.jit`
executes, i.e. at import of the op modules: it must be set here, first.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep datasets/hub caches and telemetry away from the network and the home directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
