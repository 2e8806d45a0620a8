"""group_advantages: GRPO advantages of a batch of rewards against how TRL and verl compute them, on the same
rewards (forward, no grad: advantages are computed once per generation batch).

Providers:
  * ``lacot-cuda`` / ``lacot-triton`` / ``lacot-torch``: :func:`lacot_kernels.group_advantages` (one kernel launch);
  * ``trl``: TRL ``GRPOTrainer``'s formulation (``view(-1, G)``, mean and unbiased std per group,
    ``repeat_interleave`` back, ``(r - mean) / (std + eps)``), re-expressed in torch;
  * ``verl``: verl's ``compute_grpo_outcome_advantage`` formulation re-expressed in torch (verl itself is not a
    dependency): a Python loop over the samples to collect each group's scores, a mean / std per group, and a loop
    writing each advantage.

Every provider uses TRL's ``scale_rewards="group"`` with eps = 1e-4 (verl's default eps is 1e-6; the same formula
otherwise). The ``max|err| logp`` column holds the advantages' largest error against the fp64 reference.
"""

from __future__ import annotations

import gc
from collections import defaultdict

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H

OP = "group_advantages"
EPS = 1e-4
GPU = (pytest.mark.gpu,)
SHAPES = {
    "smoke": [((64, 8), ())],
    "full-cpu": [((4096, 16), ()), ((65536, 8), ())],
    # GPU target: one launch, <= 10 us for 65,536 rewards.
    "full-gpu": [((65536, 8), GPU), ((65536, 64), GPU)],
}
PROVIDERS = ["lacot-cuda", "lacot-triton", "lacot-torch", "trl", "verl"]


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (N, G), marks in _shapes(size):
        case = H.Case(OP, "fwd_nograd", False, (("N", N), ("G", G)), "fp32", 0.0, size)
        for p in PROVIDERS:
            params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


_INPUTS: dict = {}


def _inputs(case: H.Case) -> dict:
    if _INPUTS.get("key") != case.shape:
        _INPUTS.clear()
        gc.collect()
        N, G = case.dims["N"], case.dims["G"]
        g = torch.Generator().manual_seed(0)
        # Verifier-style rewards: mostly 0 / 1 plus a format bonus, some groups all equal.
        rewards = (torch.rand(N, generator=g) < 0.4).float() + 0.1 * (torch.rand(N, generator=g) < 0.5).float()
        rewards[: 4 * G] = 1.0
        _INPUTS.update(
            key=case.shape, rewards=rewards.to(H.DEVICE), ref=reference.group_advantages(rewards, G, eps=EPS)
        )
    return _INPUTS


# ----------------------------------------------------------------------------------------------------------------
# Providers: adv(rewards, G) -> (N,)
# ----------------------------------------------------------------------------------------------------------------
def _lacot(backend: str):
    return lambda r, G: lk.group_advantages(r, G, eps=EPS, backend=backend)


def _trl(r, G):
    grouped = r.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G, dim=0)
    std = grouped.std(dim=1).repeat_interleave(G, dim=0)
    return (r - mean) / (std + EPS)


def _verl(r, G):
    index = [i // G for i in range(r.shape[0])]  # verl groups by a uid per prompt
    scores = r.clone()
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, group in id2score.items():
        if len(group) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(group)
            id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + EPS)
    return scores


ADV = {
    "lacot-cuda": _lacot("cuda"),
    "lacot-triton": _lacot("triton"),
    "lacot-torch": _lacot("torch"),
    "trl": _trl,
    "verl": _verl,
}


def _missing(provider: str, case: H.Case) -> str | None:
    why = H.lacot_missing(provider, case, "group_advantages_fwd_native")
    if why is not None:
        return why
    return None


def test_group_advantages(case, provider, benchmark):
    missing = _missing(provider, case)
    inp = _inputs(case) if missing is None else {}
    G = case.dims["G"]
    fn = ADV[provider]

    def run(r):
        with torch.no_grad():
            return fn(r, G)

    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=run,
        prepare=lambda: inp["rewards"],
        check=(lambda out: {"logp": H.max_abs_err(out, inp["ref"].to(out.device))}) if inp else None,
        full_rounds=20,
        warmup_always=True,
        bytes_moved=case.dims["N"] * 8,  # read the rewards, write the advantages (fp32)
    )


def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    for case, rs in H.groups(rows).items():
        by = {r.provider: r for r in rs if r.missing is None}
        N, G = case.dims["N"], case.dims["G"]
        for name in ("lacot-cuda", "lacot-triton", "lacot-torch"):
            r = by.get(name)
            if r is None:
                continue
            parts = [f"N={N} G={G}: {name} {r.ms * 1e3:.1f} us"]
            for peer in ("trl", "verl"):
                if peer in by:
                    parts.append(f"{by[peer].ms / r.ms:.1f}x faster than {peer}")
            if H.ON_GPU and N == 65536:
                parts.append(f"target <= 10 us: {'met' if r.ms <= 0.010 else 'NOT met'}")
            lines.append(", ".join(parts))
    return lines


H.register_summary(OP, _summary)
