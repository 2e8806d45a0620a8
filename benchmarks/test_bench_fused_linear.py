"""fused_linear_token_logprobs: lacot (each backend) against the naive path (logits = hidden @ weight.T, then
fp32 log_softmax and gather), its torch.compile, TRL's chunked log-probs, Liger's fused linear cross-entropy
and Cut-Cross-Entropy, on the same hidden states, LM head and targets.

Modes (each a table, with 0% and 50% of the targets ignored): ``fwd_nograd`` (log-probs under no_grad: the
reference / old-policy scoring), ``fwd+entropy`` (log-probs and entropy with inputs requiring grad, so what
is kept for the backward counts in the peak), ``fwd_bwd`` (log-probs, then the gradients of ``sum(g * logp)``
with respect to the hidden states and the LM-head weight, for fixed random weights ``g``). T = 1 for every
provider (Liger and Cut-Cross-Entropy have no temperature). Ignored rows are a random half of all rows.
"""

from __future__ import annotations

import math

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H
from . import cost_model

OP = "fused_linear_token_logprobs"
T = 1.0
IGNORE = -100
GPU = (pytest.mark.gpu,)
SHAPES = {
    "smoke": [((64, 32, 1000), "fp32", ())],
    # The CPU target: peak extra memory <= 25% of the naive path, time <= 1.2x naive.
    "full-cpu": [((4096, 1024, 32000), "fp32", ())],
    # GPU targets: fwd+entropy <= 14 ms, fwd_bwd <= 52 ms, workspace <= 256 MiB, 50% ignored <= 55% of the time.
    # V=128256 is the shape of Liger's / QuACK's published H200 numbers (anchors_2026_12.md).
    "full-gpu": [((8192, 4096, 152064), "bf16", GPU), ((8192, 4096, 128256), "bf16", GPU)],
}
MODES = [("fwd_nograd", False), ("fwd", True), ("fwd_bwd", False)]
IGNORED = [0.0, 0.5]
PROVIDERS = [
    "lacot-cuda",
    "lacot-triton",
    "lacot-torch",
    "torch-eager",
    "torch-compile",
    "trl-chunked",
    "liger-flce",
    "cce",
]
# The first call compiles: never timed (torch.compile; Cut-Cross-Entropy's torch_compile implementation on CPU).
JIT = {"torch-compile", "cce"}


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (N, D, V), dtype, marks in _shapes(size):
        for mode, entropy in MODES:
            for ignored in IGNORED:
                case = H.Case(OP, mode, entropy, (("N", N), ("D", D), ("V", V)), dtype, ignored, size)
                for p in PROVIDERS:
                    params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the fp64 reference (built once per shape, shared by every provider, mode and ignored fraction)
# ----------------------------------------------------------------------------------------------------------------
_INPUTS: dict = {}


def _inputs(case: H.Case) -> dict:
    return H.cached_inputs(_INPUTS, (case.shape, case.dtype), lambda: _build(case))


def _build(case: H.Case) -> dict:
    N, D, V = case.dims["N"], case.dims["D"], case.dims["V"]
    dev, dtype = H.DEVICE, case.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, device=dev).to(dtype)
    # Logits of standard deviation ~2, like a trained LM head's.
    weight = (torch.randn(V, D, generator=gen, device=dev) * (2.0 / math.sqrt(D))).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen, device=dev)
    g = torch.randn(N, generator=gen, device=dev)
    perm = torch.randperm(N, generator=gen, device=dev)
    valid = {}
    for frac in IGNORED:
        v = torch.ones(N, dtype=torch.bool, device=dev)
        v[perm[: int(round(frac * N))]] = False
        valid[frac] = v
    targets = {frac: torch.where(v, y, IGNORE) for frac, v in valid.items()}

    # One fp64 pass in row chunks: log-probs and entropy of every row, the gradient of sum(g * logp) with
    # respect to the hidden states (row-wise: ignored rows are just zeroed), and the weight gradient for each
    # ignored fraction (a sum over its valid rows).
    h64, w64 = hidden.double(), weight.double()
    ref_logp = torch.empty(N, dtype=torch.float64, device=dev)
    ref_ent = torch.empty_like(ref_logp)
    ref_dh = torch.empty(N, D, dtype=torch.float64, device=dev)
    ref_dw = {frac: torch.zeros(V, D, dtype=torch.float64, device=dev) for frac in IGNORED}
    step = max(1, (1 << 24) // V)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        logp_all = torch.log_softmax((h64[sl] @ w64.T) / T, dim=-1)
        ref_logp[sl] = logp_all.gather(-1, y[sl, None]).squeeze(-1)
        p = logp_all.exp_()
        ref_ent[sl] = -(p * torch.log(p)).nan_to_num_(0.0).sum(-1)
        gr = g[sl, None].double()
        gz = p.mul_(-gr).scatter_add_(-1, y[sl, None], gr).div_(T)  # d sum(g logp) / d logits
        ref_dh[sl] = gz @ w64
        # The valid sets are nested (a larger fraction ignores more of the same permutation): each row
        # enters one GEMM, for the largest fraction it is valid at, and adds to that and every smaller one.
        fracs = sorted(valid)
        for i, frac in enumerate(fracs):
            rows = valid[frac][sl] & ~valid[fracs[i + 1]][sl] if i + 1 < len(fracs) else valid[frac][sl]
            part = gz[rows].T @ h64[sl][rows]
            for smaller in fracs[: i + 1]:
                ref_dw[smaller] += part
        del logp_all, p, gz
    store = torch.float64 if dev.type == "cpu" else torch.float32
    return {
        "hidden": hidden,
        "weight": weight,
        "g": g,
        "valid": valid,
        "targets": targets,
        "ref_logp": ref_logp,
        "ref_ent": ref_ent,
        "ref_dh": ref_dh.to(store),
        "ref_dw": {k: v.to(store) for k, v in ref_dw.items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# Providers: fwd(hidden, weight, targets, entropy) -> (logp, entropy or None), fp32, exactly 0 on ignored rows
# ----------------------------------------------------------------------------------------------------------------
def _lacot(backend: str):
    def fwd(h, w, y, entropy):
        out = lk.fused_linear_token_logprobs(h, w, y, temperature=T, return_entropy=entropy, backend=backend)
        return out if entropy else (out, None)

    return fwd


def _naive(h, w, y, entropy):
    """What most trainers do: the whole N x V logits, fp32 log_softmax, gather."""
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    logits = h @ w.T
    if not entropy:
        return torch.where(valid, reference.naive_token_logprobs(logits, safe, temperature=T), 0.0), None
    logp_all = torch.log_softmax(logits.float() / T, dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


_compiled = None


def _torch_compile(h, w, y, entropy):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_naive, dynamic=False)
    return _compiled(h, w, y, entropy)


def _trl_chunked(h, w, y, entropy):
    """TRL's ChunkedLogProbFunction as its trainer calls it: on the valid rows only, scattered back."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils

    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    valid = y != IGNORE
    outs = ChunkedLogProbFunction.apply(
        h[valid], w, None, y[valid], T, chunk, None, 1.0, ("entropy",) if entropy else ()
    )
    logp = outs[0].new_zeros(y.shape).masked_scatter(valid, outs[0])
    ent = outs[1].new_zeros(y.shape).masked_scatter(valid, outs[1]) if entropy else None
    return logp, ent


_liger_loss = None


def _liger(h, w, y, entropy):
    global _liger_loss
    if _liger_loss is None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        _liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE)
    return -_liger_loss(w, h, y), None


def _cce(h, w, y, entropy):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if H.ON_GPU else "torch_compile"
    return -linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="none", impl=impl), None


FWD = {
    "lacot-cuda": _lacot("cuda"),
    "lacot-triton": _lacot("triton"),
    "lacot-torch": _lacot("torch"),
    "torch-eager": _naive,
    "torch-compile": _torch_compile,
    "trl-chunked": _trl_chunked,
    "liger-flce": _liger,
    "cce": _cce,
}
NOTES = {
    "torch-eager": "naive",
    "trl-chunked": "valid rows only",
    "cce": "impl=cce" if H.ON_GPU else "impl=torch_compile",
}


def _missing(provider: str, case: H.Case) -> str | None:
    why = H.lacot_missing(provider, case)
    if why is not None:
        return why
    dev = H.DEVICE.type
    full_cpu = dev == "cpu" and case.size == "full"
    if provider == "trl-chunked" and not H.installed("trl"):
        return "trl not installed"
    if provider == "liger-flce":
        if not H.installed("liger_kernel"):
            return "liger-kernel not installed"
        if case.entropy:
            return "no entropy output (LigerFusedLinearCrossEntropyLoss returns the loss only)"
        if dev == "cpu" and not lk.triton_available("cpu"):
            return "GPU only (Triton kernels; TRITON_INTERPRET unset)"
        if full_cpu:
            return "GPU only (Triton kernels; the interpreter is not a performance provider)"
    if provider == "cce":
        if not H.installed("cut_cross_entropy"):
            return "cut-cross-entropy not installed"
        if case.entropy:
            return "no entropy output (linear_cross_entropy returns the loss only)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def _runner(fwd, case: H.Case):
    def run(arg):
        hidden, weight, targets, g = arg
        if case.mode == "fwd_nograd":
            with torch.no_grad():
                logp, ent = fwd(hidden, weight, targets, case.entropy)
            return logp, ent, None
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp, ent = fwd(h, w, targets, case.entropy)
        if case.mode == "fwd":
            return logp, ent, None  # the autograd graph (what is saved for backward) lives until released
        grads = torch.autograd.grad((logp * g).sum(), [h, w])
        return logp.detach(), None if ent is None else ent.detach(), grads

    return run


def _checker(case: H.Case, inp: dict):
    valid = inp["valid"][case.ignored_frac]
    zero = torch.zeros((), dtype=torch.float64, device=H.DEVICE)

    def check(out):
        logp, ent, grads = out
        err = {"logp": H.max_abs_err(logp, torch.where(valid, inp["ref_logp"], zero))}
        if case.entropy:
            err["entropy"] = H.max_abs_err(ent, torch.where(valid, inp["ref_ent"], zero))
        if grads is not None:
            dh, dw = grads
            ref_dh = torch.where(valid[:, None], inp["ref_dh"], zero.to(inp["ref_dh"].dtype))
            err["grad"] = max(H.max_abs_err(dh, ref_dh), H.max_abs_err(dw, inp["ref_dw"][case.ignored_frac]))
        return err

    return check


def test_fused_linear_token_logprobs(case, provider, benchmark):
    missing = _missing(provider, case)
    inp = _inputs(case) if missing is None else {}

    def prepare():
        return inp["hidden"], inp["weight"], inp["targets"][case.ignored_frac], inp["g"]

    N, D, V = case.dims["N"], case.dims["D"], case.dims["V"]
    n_valid = N - int(round(case.ignored_frac * N))
    flops = (8 if case.mode == "fwd_bwd" else 2) * n_valid * D * V
    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=_runner(FWD[provider], case),
        prepare=prepare,
        check=_checker(case, inp) if inp else None,
        jit=provider in JIT,
        # A full-size CPU call takes seconds (a 4096 x 1024 x 32000 GEMM each way): one round, no warm-up
        # except to compile, keeps the full CPU run within its ~10 minutes.
        full_rounds=1,
        warmup_always=False,
        flops=flops,
        note=NOTES.get(provider, ""),
    )


# ----------------------------------------------------------------------------------------------------------------
# Issue targets (printed after the tables)
# ----------------------------------------------------------------------------------------------------------------
def _io_mib(case: H.Case) -> float:
    """What any implementation must allocate: logp (+ entropy) in fp32, and in fwd_bwd the two gradients."""
    N, D, V = case.dims["N"], case.dims["D"], case.dims["V"]
    elem = torch.finfo(case.torch_dtype).bits // 8
    out = N * 4 * (2 if case.entropy else 1)
    if case.mode == "fwd_bwd":
        out += (N * D + V * D) * elem
    return out / H.MIB


def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    by_case = H.groups(rows)
    ours = ("lacot-cuda", "lacot-triton", "lacot-torch")
    for case, rs in by_case.items():
        by = {r.provider: r for r in rs if r.missing is None}
        naive = by.get("torch-eager")
        for name in ours:
            r = by.get(name)
            if r is None:
                continue
            parts = [f"{case.mode_label} ignored={case.ignored_frac:.0%} {case.shape_label} {case.dtype}: {name}"]
            if naive:
                parts.append(f"time {r.ms / naive.ms:.2f}x naive (target <= 1.2x)")
                if r.peak_extra_mib is not None and naive.peak_extra_mib:
                    pct = 100 * r.peak_extra_mib / naive.peak_extra_mib
                    parts.append(f"peak extra {pct:.0f}% of naive (target <= 25%)")
            if r.peak_extra_mib is not None:
                ws = r.peak_extra_mib - _io_mib(case)
                tgt = " (target <= 256 MiB)" if H.ON_GPU else ""
                parts.append(f"workspace beyond outputs/grads {ws:.0f} MiB{tgt}")
            if H.ON_GPU and case.mode == "fwd" and case.entropy and case.ignored_frac == 0:
                parts.append(f"{r.ms:.1f} ms (target <= 14 ms)")
            if H.ON_GPU and case.mode == "fwd_bwd" and case.ignored_frac == 0:
                parts.append(f"{r.ms:.1f} ms (target <= 52 ms)")
            if H.ON_GPU and case.dtype == "bf16" and case.mode in ("fwd", "fwd_bwd") and case.ignored_frac == 0:
                gpu = "H200" if "H200" in torch.cuda.get_device_name() else "H100-SXM"
                c = cost_model.cost(case.mode, case.dims["N"], case.dims["D"], case.dims["V"], gpu)
                parts.append(f"roofline {c.roofline_ms:.1f} ms ({100 * c.roofline_ms / r.ms:.0f}% of it reached)")
            lines.append(", ".join(parts))
    # 50% of the rows ignored against none, same mode and shape.
    for case, rs in by_case.items():
        if case.ignored_frac != 0.5:
            continue
        base_case = next(
            (
                c
                for c in by_case
                if c.ignored_frac == 0
                and (c.mode, c.entropy, c.shape, c.dtype) == (case.mode, case.entropy, case.shape, case.dtype)
            ),
            None,
        )
        if base_case is None:
            continue
        base = {r.provider: r for r in by_case[base_case] if r.missing is None}
        for r in rs:
            if r.provider in ours and r.missing is None and r.provider in base:
                pct = 100 * r.ms / base[r.provider].ms
                lines.append(
                    f"{case.mode_label} {case.shape_label} {case.dtype}: {r.provider} with 50% ignored takes "
                    f"{pct:.0f}% of the time of 0% ignored (target <= 55%)"
                )
    if lines:
        lines.append("TFLOP/s counts 2*N*D*V per fwd and 8*N*D*V per fwd_bwd over the valid rows N.")
    return lines


H.register_summary(OP, _summary)


def test_cost_model_of_the_headline_shapes():
    """FLOPs, HBM bytes and roofline time of our GPU kernels at the headline shapes, computed on the CPU (estimates,
    printed with -s; BENCHMARKS.md carries the table)."""
    lines = cost_model.table()
    print("\n" + "\n".join(lines))
    N, D, V = cost_model.HEADLINE[0]
    fwd, full, grpo = (cost_model.cost(m, N, D, V, "H100-SXM") for m in cost_model.MODES)
    assert (fwd.flops, full.flops, grpo.flops) == (2 * N * D * V, 8 * N * D * V, 6 * N * D * V)
    # 2NDV at 989 TFLOP/s = 10.3 ms; every mode is compute-bound on Hopper (the op's point: no N x V traffic).
    assert abs(fwd.compute_ms - 10.3) < 0.1
    assert all(c.compute_ms > c.memory_ms and c.estimate_ms >= c.roofline_ms for c in (fwd, full, grpo))
    assert len(lines) == 2 + len(cost_model.HEADLINE) * len(cost_model.GPUS) * len(cost_model.MODES)
