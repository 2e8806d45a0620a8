"""subtb_loss: the O(B T) sub-trajectory balance loss against the O(T^2) ways it is computed today, on the same
inputs (forward + backward).

Providers:
  * ``lacot-cuda`` / ``lacot-triton`` / ``lacot-torch``: :func:`lacot_kernels.subtb_loss` (``cuda`` = the compiled
    kernels: on the CPU, their OpenMP twin);
  * ``official-loop``: LaCoT's released ``GFlowNet_loss('modified_subtb')`` re-expressed in torch
    (:func:`lacot_kernels.reference.subtb_loss_official`): one slicing pass per sub-trajectory length, T passes of
    O(B T) each, with a per-trajectory window mask so that it computes the same loss as ours;
  * ``torch-bruteforce``: every pair (i, j) written out, a (n+1) x (n+1) matrix per row in fp32
    (:func:`lacot_kernels.reference.subtb_loss` with ``dtype=float32``).

Mode ``fwd_bwd``: the pooled-mean loss (``reduction="mean"``, the official normalization) and its gradients with
respect to ``log_pf`` and ``log_term`` (the rewards come from a frozen model). Inputs look like LaCoT's: rewards
~ -1e3 interpolated along the row, row lengths drawn in [T/2, T]. The ``max|err| logp`` column holds the loss's
absolute error against the fp64 brute force, ``max|err| grad`` the largest error of the two gradients.
"""

from __future__ import annotations

import gc

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H

OP = "subtb_loss"
DECAY = 1.0  # LaCoT's subtb_lambda
GPU = (pytest.mark.gpu,)
SHAPES = {
    "smoke": [((2, 16), ())],
    # The CPU target: >= 100x faster than the brute force at T = 1024.
    "full-cpu": [((8, 256), ()), ((8, 1024), ()), ((64, 1024), ()), ((64, 2048), ())],
    # GPU target: <= 50 us forward + backward at B = 64, T = 2048.
    "full-gpu": [((8, 256), GPU), ((64, 1024), GPU), ((64, 2048), GPU)],
}
PROVIDERS = ["lacot-cuda", "lacot-triton", "lacot-torch", "official-loop", "torch-bruteforce"]


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (B, T), marks in _shapes(size):
        case = H.Case(OP, "fwd_bwd", False, (("B", B), ("T", T)), "fp32", 0.0, size)
        for p in PROVIDERS:
            params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the fp64 reference (once per shape)
# ----------------------------------------------------------------------------------------------------------------
_INPUTS: dict = {}


def _inputs(case: H.Case) -> dict:
    key = case.shape
    if _INPUTS.get("key") != key:
        _INPUTS.clear()
        gc.collect()
        B, T = case.dims["B"], case.dims["T"]
        g = torch.Generator().manual_seed(0)
        t = torch.arange(T + 1, dtype=torch.float64)
        log_reward = -1000.0 + 0.4 * t + torch.randn(B, T + 1, generator=g, dtype=torch.float64).cumsum(1) * 0.3
        log_term = 0.3 * torch.randn(B, T + 1, generator=g, dtype=torch.float64) - 3.0
        log_pf = -2.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        lengths[0] = T
        xs = [x.float().to(H.DEVICE) for x in (log_pf, log_term, log_reward)]
        lengths = lengths.to(H.DEVICE)
        # fp64 brute force on the same fp32 values (and the fp32 decay the kernels see).
        ref_in = [x.double().cpu().requires_grad_(i < 2) for i, x in enumerate(xs)]
        ref = reference.subtb_loss(*ref_in, lengths.cpu(), decay=DECAY, reduction="mean")
        d_pf, d_t = torch.autograd.grad(ref, ref_in[:2])
        _INPUTS.update(
            key=key,
            xs=xs,
            lengths=lengths,
            excluded=torch.arange(T, device=H.DEVICE)[None, :] >= lengths[:, None],
            ref=float(ref.detach()),
            ref_grads=(d_pf.to(H.DEVICE), d_t.to(H.DEVICE)),
        )
    return _INPUTS


# ----------------------------------------------------------------------------------------------------------------
# Providers: loss(log_pf, log_term, log_reward, inp) -> () fp32 (differentiable in the first two)
# ----------------------------------------------------------------------------------------------------------------
def _lacot(backend: str):
    def loss(log_pf, log_term, log_reward, inp):
        return lk.subtb_loss(
            log_pf, log_term, log_reward, inp["lengths"], decay=DECAY, reduction="mean", backend=backend
        )

    return loss


def _official(log_pf, log_term, log_reward, inp):
    return reference.subtb_loss_official(log_pf, log_term, log_reward, inp["excluded"], decay=DECAY)


def _bruteforce(log_pf, log_term, log_reward, inp):
    return reference.subtb_loss(
        log_pf, log_term, log_reward, inp["lengths"], decay=DECAY, reduction="mean", dtype=torch.float32
    )


LOSS = {
    "lacot-cuda": _lacot("cuda"),
    "lacot-triton": _lacot("triton"),
    "lacot-torch": _lacot("torch"),
    "official-loop": _official,
    "torch-bruteforce": _bruteforce,
}


def _missing(provider: str, case: H.Case) -> str | None:
    why = H.lacot_missing(provider, case, "subtb_fwd_native")
    if why is not None:
        return why
    return None


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def _runner(loss_fn):
    def run(inp):
        log_pf, log_term, log_reward = inp["xs"]
        a = log_pf.detach().requires_grad_(True)
        b = log_term.detach().requires_grad_(True)
        loss = loss_fn(a, b, log_reward, inp)
        grads = torch.autograd.grad(loss, (a, b))
        return loss.detach(), grads

    return run


def _checker(inp: dict):
    def check(out):
        loss, grads = out
        err = {"logp": abs(float(loss) - inp["ref"])}
        err["grad"] = max(H.max_abs_err(g, r) for g, r in zip(grads, inp["ref_grads"], strict=True))
        return err

    return check


def test_subtb_loss(case, provider, benchmark):
    missing = _missing(provider, case)
    inp = _inputs(case) if missing is None else {}
    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=_runner(LOSS[provider]),
        prepare=lambda: inp,
        check=_checker(inp) if inp else None,
        full_rounds=5,
        warmup_always=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# Issue targets (printed after the tables)
# ----------------------------------------------------------------------------------------------------------------
def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    for case, rs in H.groups(rows).items():
        by = {r.provider: r for r in rs if r.missing is None}
        B, T = case.dims["B"], case.dims["T"]
        for name in ("lacot-cuda", "lacot-triton", "lacot-torch"):
            r = by.get(name)
            if r is None:
                continue
            parts = [f"{case.mode_label} B={B} T={T}: {name} {r.ms:.3f} ms"]
            for peer in ("torch-bruteforce", "official-loop"):
                p = by.get(peer)
                if p is not None:
                    parts.append(f"{p.ms / r.ms:.0f}x faster than {peer}")
            if H.ON_GPU and B == 64 and T == 2048:
                parts.append(f"target <= 0.050 ms: {'met' if r.ms <= 0.05 else 'NOT met'}")
            elif not H.ON_GPU and T == 1024 and name == "lacot-cuda" and "torch-bruteforce" in by:
                ratio = by["torch-bruteforce"].ms / r.ms
                parts.append(f"target >= 100x the brute force: {'met' if ratio >= 100 else 'NOT met'}")
            lines.append(", ".join(parts))
    return lines


H.register_summary(OP, _summary)
