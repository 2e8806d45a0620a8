"""Property-based fuzzing of every public op and backend against the fp64 references (error model: README.md).

Profiles (``LACOT_FUZZ_PROFILE``): ``ci`` (default: derandomized, a fixed small budget per op / backend / dtype,
so `make test` stays fast and reproducible) and ``fuzz`` (random, 10,000 examples per test: `make fuzz` runs
`run.py` instead, which also prints the summary table). A failure prints the case's draws; hypothesis shrinks
the structural choices (shapes, flags, layouts) drawn from `st.randoms()`.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import cases

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz", max_examples=10_000, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck)
)
PROFILE = os.environ.get("LACOT_FUZZ_PROFILE", "ci")

# Examples per (op, backend, dtype) under the ci profile. The Triton interpreter runs a kernel in Python, about
# 10-100x slower than the other backends: it gets fewer (5,300 cases in all, ~45 s on 2 shared cores).
CI_EXAMPLES = {"triton": 30, "cuda": 100, "torch": 100}
CI_SLOW = {"fused_linear_grpo_loss": 0.5, "fused_linear_token_logprobs": 0.5}


def _budget(op: str, backend: str) -> int:
    if PROFILE != "ci":
        return settings.get_profile(PROFILE).max_examples
    return max(3, int(CI_EXAMPLES[backend] * CI_SLOW.get(op, 1.0)))


PARAMS = [
    pytest.param(name, backend, dtype, id=f"{name}-{backend}-{str(dtype).replace('torch.', '')}")
    for name, op in cases.OPS.items()
    for backend in op.backends
    for dtype in op.dtypes
]


def _available(backend: str) -> bool:
    import lacot_kernels as lk

    if backend == "cuda":
        return lk.native_available("cpu")
    if backend == "triton":
        return lk.triton_available("cpu")
    return True


@pytest.mark.parametrize("name,backend,dtype", PARAMS)
def test_fuzz(name: str, backend: str, dtype: torch.dtype) -> None:
    if not _available(backend):
        pytest.skip(f"backend {backend!r} cannot run CPU tensors here (extension not built / no TRITON_INTERPRET)")

    @settings(settings.get_profile(PROFILE), max_examples=_budget(name, backend))
    @given(rng=st.randoms(use_true_random=False))
    def prop(rng):
        verdict, _ = cases.run_case(name, rng, dtype, backend)
        assert verdict.ratio <= 1.0, f"{name} backend={backend} dtype={dtype}: {verdict.detail}"

    prop()
