"""token_logprobs: lacot (each backend) against torch eager, torch.compile, TRL and Liger on the same logits.

Modes (each a table): ``fwd`` (log-probs, inputs requiring grad, so what is kept for the backward counts in
the peak), ``fwd+entropy`` (the same with the entropy), ``fwd_bwd`` (log-probs forward, then the gradient of
``sum(g * logp)`` for fixed random weights ``g``). T = 1 for every provider (Liger has no temperature).
"""

from __future__ import annotations

import gc

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H

OP = "token_logprobs"
T = 1.0
GPU = (pytest.mark.gpu,)
SHAPES = {
    "smoke": [((64, 1000), "fp32", ())],
    # The CPU target: the CPU twin >= 2x faster than torch eager with O(N) extra memory.
    "full-cpu": [((4096, 32000), "fp32", ())],
    "full-gpu": [((8192, 152064), "bf16", GPU), ((8192, 32000), "bf16", GPU)],
}
MODES = [("fwd", False), ("fwd", True), ("fwd_bwd", False)]
PROVIDERS = ["lacot-cuda", "lacot-triton", "lacot-torch", "torch-eager", "torch-compile", "trl", "liger-ce"]
JIT = {"torch-compile"}


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    # On a GPU machine the CPU shape is not this device's; without one the GPU shapes show up as skipped.
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (N, V), dtype, marks in _shapes(size):
        for mode, entropy in MODES:
            case = H.Case(OP, mode, entropy, (("N", N), ("V", V)), dtype, 0.0, size)
            for p in PROVIDERS:
                params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the fp64 reference (built once per shape, shared by every provider and mode)
# ----------------------------------------------------------------------------------------------------------------
_INPUTS: dict = {}


def _rows_per_chunk(V: int) -> int:
    return max(1, (1 << 24) // V)  # fp64 temporaries of ~128 MiB


def _inputs(case: H.Case) -> dict:
    key = (case.shape, case.dtype)
    if _INPUTS.get("key") != key:
        _INPUTS.clear()
        gc.collect()
        N, V = case.dims["N"], case.dims["V"]
        gen = torch.Generator(device=H.DEVICE).manual_seed(0)
        logits = (2.0 * torch.randn(N, V, generator=gen, device=H.DEVICE)).to(case.torch_dtype)
        targets = torch.randint(0, V, (N,), generator=gen, device=H.DEVICE)
        g = torch.randn(N, generator=gen, device=H.DEVICE)
        ref_logp = torch.empty(N, dtype=torch.float64, device=H.DEVICE)
        ref_ent = torch.empty_like(ref_logp)
        step = _rows_per_chunk(V)
        for r0 in range(0, N, step):
            sl = slice(r0, r0 + step)
            ref_logp[sl], ref_ent[sl] = reference.token_logprobs(logits[sl], targets[sl], temperature=T)
        _INPUTS.update(key=key, logits=logits, targets=targets, g=g, ref_logp=ref_logp, ref_ent=ref_ent)
    return _INPUTS


def _grad_err(grad: torch.Tensor, inp: dict) -> float:
    """max |grad - d sum(g * logp) / d logits| with the reference gradient g (1[v = y] - p) / T in fp64."""
    logits, targets, g = inp["logits"], inp["targets"], inp["g"]
    err = 0.0
    step = _rows_per_chunk(logits.shape[1])
    for r0 in range(0, logits.shape[0], step):
        sl = slice(r0, r0 + step)
        gr = g[sl, None].double()
        ref = torch.softmax(logits[sl].double() / T, dim=-1).mul_(-gr)
        ref.scatter_add_(-1, targets[sl, None], gr)
        ref.div_(T)
        err = max(err, float((grad[sl].double() - ref).abs().max()))
    return err


# ----------------------------------------------------------------------------------------------------------------
# Providers: fwd(logits, targets, entropy) -> (logp, entropy or None), all fp32 outputs
# ----------------------------------------------------------------------------------------------------------------
def _lacot(backend: str):
    def fwd(logits, targets, entropy):
        out = lk.token_logprobs(logits, targets, temperature=T, return_entropy=entropy, backend=backend)
        return out if entropy else (out, None)

    return fwd


def _eager(logits, targets, entropy):
    if not entropy:
        return reference.naive_token_logprobs(logits, targets, temperature=T), None
    logp_all = torch.log_softmax(logits.float() / T, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


_compiled = None


def _torch_compile(logits, targets, entropy):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(logits, targets, entropy)


def _trl(logits, targets, entropy):
    from trl.trainer import utils

    if entropy:
        return utils.selective_log_softmax_and_entropy(logits, targets, temperature=T)
    return utils.selective_log_softmax(logits, targets, temperature=T), None


_liger_loss = None


def _liger(logits, targets, entropy):
    global _liger_loss
    if _liger_loss is None:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        _liger_loss = LigerCrossEntropyLoss(reduction="none")
    return -_liger_loss(logits, targets), None


FWD = {
    "lacot-cuda": _lacot("cuda"),
    "lacot-triton": _lacot("triton"),
    "lacot-torch": _lacot("torch"),
    "torch-eager": _eager,
    "torch-compile": _torch_compile,
    "trl": _trl,
    "liger-ce": _liger,
}


def _missing(provider: str, case: H.Case) -> str | None:
    why = H.lacot_missing(provider, case)
    if why is not None:
        return why
    dev = H.DEVICE.type
    full_cpu = dev == "cpu" and case.size == "full"
    if provider == "trl" and not H.installed("trl"):
        return "trl not installed"
    if provider == "liger-ce":
        if not H.installed("liger_kernel"):
            return "liger-kernel not installed"
        if case.entropy:
            return "no entropy output (LigerCrossEntropyLoss returns the loss only)"
        if dev == "cpu" and not lk.triton_available("cpu"):
            return "GPU only (Triton kernels; TRITON_INTERPRET unset)"
        if full_cpu:
            return "GPU only (Triton kernels; the interpreter is not a performance provider)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def _runner(fwd, case: H.Case):
    def run(arg):
        logits, targets, g = arg
        x = logits.detach().requires_grad_()
        logp, ent = fwd(x, targets, case.entropy)
        if case.mode == "fwd":
            return logp, ent, None  # the autograd graph (what is saved for backward) lives until released
        (gx,) = torch.autograd.grad((logp * g).sum(), [x])
        return logp.detach(), None if ent is None else ent.detach(), gx

    return run


def _checker(case: H.Case, inp: dict):
    def check(out):
        logp, ent, grad = out
        err = {"logp": H.max_abs_err(logp, inp["ref_logp"])}
        if case.entropy:
            err["entropy"] = H.max_abs_err(ent, inp["ref_ent"])
        if grad is not None:
            err["grad"] = _grad_err(grad, inp)
        return err

    return check


def test_token_logprobs(case, provider, benchmark):
    missing = _missing(provider, case)
    inp = _inputs(case) if missing is None else {}
    note = ""
    if provider == "liger-ce":
        # Liger writes the logits gradient into its input during the forward: it gets a fresh copy per call
        # (made outside the timed and measured region).
        def prepare():
            return inp["logits"].clone(), inp["targets"], inp["g"]

        note = "overwrites its input (given a copy)"
    else:

        def prepare():
            return inp["logits"], inp["targets"], inp["g"]

    N, V = case.dims["N"], case.dims["V"]
    bytes_moved = None
    if case.mode == "fwd":
        bytes_moved = N * V * torch.finfo(case.torch_dtype).bits // 8  # the logits, read once
    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=_runner(FWD[provider], case),
        prepare=prepare,
        check=_checker(case, inp) if inp else None,
        jit=provider in JIT,
        full_rounds=3,
        warmup_always=True,
        bytes_moved=bytes_moved,
        note=note,
    )


# ----------------------------------------------------------------------------------------------------------------
# Issue targets (printed after the tables)
# ----------------------------------------------------------------------------------------------------------------
def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    for case, rs in H.groups(rows).items():
        by = {r.provider: r for r in rs if r.missing is None}
        eager = by.get("torch-eager")
        N, V = case.dims["N"], case.dims["V"]
        elem = torch.finfo(case.torch_dtype).bits // 8
        # What any implementation must allocate: logp (+ entropy) fp32, and in fwd_bwd the logits gradient.
        io = N * 4 * (2 if case.entropy else 1) + (N * V * elem if case.mode == "fwd_bwd" else 0)
        for name in ("lacot-cuda", "lacot-triton", "lacot-torch"):
            r = by.get(name)
            if r is None:
                continue
            parts = [f"{case.mode_label} {case.shape_label} {case.dtype}: {name}"]
            if eager:
                target = " (target >= 2x)" if name == "lacot-cuda" and not H.ON_GPU else ""
                parts.append(f"{eager.ms / r.ms:.2f}x the speed of torch-eager{target}")
            if r.peak_extra_mib is not None:
                ws = r.peak_extra_mib - io / H.MIB
                parts.append(
                    f"peak extra {r.peak_extra_mib:.1f} MiB"
                    + (f" vs torch-eager {eager.peak_extra_mib:.0f} MiB" if eager and eager.peak_extra_mib else "")
                    + f"; beyond outputs/grads {ws:.1f} MiB (N x V logits = {N * V * elem / H.MIB:.0f} MiB)"
                )
            lines.append(", ".join(parts))
    return lines


H.register_summary(OP, _summary)
