"""fused_linear_grpo_loss: the GRPO policy loss (TRL semantics) straight from the last hidden states, against the
ways it is computed today, on the same hidden states, LM head, targets, old/ref log-probs, advantages and mask.

Providers:
  * ``lacot-cuda`` / ``lacot-triton`` / ``lacot-torch``: :func:`lacot_kernels.fused_linear_grpo_loss` (logits
    gradient formed in the forward pass: 3 GEMMs of N x D x V; masked tokens skipped; ``cuda`` = the compiled
    per-row log-prob kernel for the no-grad path, the Triton (GPU) or torch (CPU) tile for the gradient path);
  * ``lacot-logprobs+torch-loss``: our :func:`fused_linear_token_logprobs` (auto backend) followed by TRL's loss
    code in torch (4 GEMMs: the backward recomputes the logits);
  * ``liger-grpo``: Liger's ``LigerFusedLinearGRPOLoss`` (chunked; ``compiled=False`` on the CPU, where compiling
    its loss function costs more than it saves at these sizes);
  * ``trl-chunked``: TRL's ``ChunkedLogProbFunction`` (its async trainer's chunked LM head) + TRL's loss code;
  * ``torch-eager``: the naive path: N x V logits, fp32 log_softmax, gather, TRL's loss code.

Modes: ``fwd_bwd`` (loss, then the gradients of the loss with respect to the hidden states and the LM head) and
``fwd_nograd`` (the loss under no_grad). loss_type "dapo" (TRL's default), beta = 0.04 with a reference, eps 0.2
/ 0.28, T = 1. ``ignored_frac`` is the fraction of completion tokens with mask 0 (padding after EOS): random
lengths per sequence. The ``max|err| logp`` column holds the loss's absolute error against the fp64 reference,
``max|err| grad`` the largest error of the two gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H

OP = "fused_linear_grpo_loss"
TEMP = 1.0
KW = dict(beta=0.04, eps_low=0.2, eps_high=0.28, loss_type="dapo")
GPU = (pytest.mark.gpu,)
SHAPES = {
    "smoke": [((4, 16, 32, 1000), "fp32", ())],
    "full-cpu": [((8, 256, 256, 32000), "fp32", ())],
    # The GPU target: H100, bf16, N = B*T = 8192, D = 4096, V = 152064: fwd_bwd <= 55 ms.
    "full-gpu": [((16, 512, 4096, 152064), "bf16", GPU)],
}
MODES = ["fwd_bwd", "fwd_nograd"]
IGNORED = [0.0, 0.5]
PROVIDERS = [
    "lacot-cuda",
    "lacot-triton",
    "lacot-torch",
    "lacot-logprobs+torch-loss",
    "liger-grpo",
    "trl-chunked",
    "torch-eager",
]


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (B, T, D, V), dtype, marks in _shapes(size):
        for mode in MODES:
            for ignored in IGNORED:
                case = H.Case(OP, mode, False, (("B", B), ("T", T), ("D", D), ("V", V)), dtype, ignored, size)
                for p in PROVIDERS:
                    params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the fp64 reference (row-chunked, so that the GPU shape's reference fits)
# ----------------------------------------------------------------------------------------------------------------
_INPUTS: dict = {}


def _inputs(case: H.Case) -> dict:
    return H.cached_inputs(_INPUTS, (case.shape, case.dtype, case.ignored_frac), lambda: _build(case))


def _build(case: H.Case) -> dict:
    B, T, D, V = (case.dims[k] for k in "BTDV")
    dev, dtype = H.DEVICE, case.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(B, T, D, generator=gen, device=dev).to(dtype)
    weight = (torch.randn(V, D, generator=gen, device=dev) * (2.0 / math.sqrt(D))).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen, device=dev)
    # Completion lengths: all T, or uniform in [1, T] scaled so that about `ignored_frac` of the tokens are padding.
    if case.ignored_frac == 0:
        lengths = torch.full((B,), T, device=dev)
    else:
        u = torch.rand(B, generator=gen, device=dev)
        lengths = (1 + (u * 2 * (1 - case.ignored_frac) * (T - 1))).long().clamp(1, T)
    mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).to(torch.int64)
    adv = torch.randn(B, generator=gen, device=dev)

    h64, w64 = hidden.double().reshape(B * T, D), weight.double()
    y = targets.reshape(-1)
    step = max(1, (1 << 24) // V)
    lp = torch.empty(B * T, dtype=torch.float64, device=dev)
    for r0 in range(0, B * T, step):
        sl = slice(r0, r0 + step)
        lp[sl] = torch.log_softmax((h64[sl] @ w64.T) / TEMP, -1).gather(-1, y[sl, None]).squeeze(-1)
    lp = lp.view(B, T)
    old = (lp + 0.3 * torch.randn(B, T, generator=gen, device=dev, dtype=torch.float64)).float()
    ref = (lp + 0.1 * torch.randn(B, T, generator=gen, device=dev, dtype=torch.float64)).float()

    x = lp.clone().requires_grad_(True)
    loss, _ = reference.grpo_loss(x, old, adv, mask, ref_logp=ref, **KW)
    (g,) = torch.autograd.grad(loss, x)
    g = g.reshape(-1)
    ref_dh = torch.zeros(B * T, D, dtype=torch.float64, device=dev)
    ref_dw = torch.zeros(V, D, dtype=torch.float64, device=dev)
    for r0 in range(0, B * T, step):
        sl = slice(r0, r0 + step)
        p = torch.softmax((h64[sl] @ w64.T) / TEMP, -1)
        gz = p.mul_(-g[sl, None]).scatter_add_(-1, y[sl, None], g[sl, None]).div_(TEMP)
        ref_dh[sl] = gz @ w64
        ref_dw += gz.T @ h64[sl]
        del p, gz
    store = torch.float64 if dev.type == "cpu" else torch.float32
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "old": old,
        "ref": ref,
        "adv": adv,
        "mask": mask,
        "ref_loss": loss.detach(),
        "ref_dh": ref_dh.view(B, T, D).to(store),
        "ref_dw": ref_dw.to(store),
    }


# ----------------------------------------------------------------------------------------------------------------
# Providers: loss(h, w, y, old, ref, adv, mask) -> 0-d loss
# ----------------------------------------------------------------------------------------------------------------
def _lacot(backend: str):
    def loss(h, w, y, old, ref, adv, mask):
        return lk.fused_linear_grpo_loss(
            h, w, y, old, adv, mask, ref_logp=ref, temperature=TEMP, backend=backend, **KW
        )[0]

    return loss


def _trl_loss(lp, old, ref, adv, mask):
    """TRL GRPOTrainer._compute_loss for loss_type="dapo" (one process, one micro-batch), verbatim in torch."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - KW["eps_low"], 1 + KW["eps_high"])
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token_loss = per_token_loss + KW["beta"] * kl
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def _lacot_logprobs_torch_loss(h, w, y, old, ref, adv, mask):
    lp = lk.fused_linear_token_logprobs(h, w, torch.where(mask != 0, y, -100), temperature=TEMP)
    return _trl_loss(lp, old, ref, adv, mask)


def _naive(h, w, y, old, ref, adv, mask):
    logits = h @ w.T
    lp = torch.log_softmax(logits.float() / TEMP, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return _trl_loss(lp, old, ref, adv, mask)


def _trl_chunked(h, w, y, old, ref, adv, mask):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils

    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    B, T, D = h.shape
    on = (mask != 0).reshape(-1)
    # As TRL's trainer: only the completion tokens reach the chunked LM head.
    out = ChunkedLogProbFunction.apply(h.reshape(-1, D)[on], w, None, y.reshape(-1)[on], TEMP, chunk, None, 1.0, ())
    lp = out[0].new_zeros(B * T).masked_scatter(on, out[0]).view(B, T)
    return _trl_loss(lp, old, ref, adv, mask)


_liger: dict = {}


def _liger_grpo(h, w, y, old, ref, adv, mask):
    if "fn" not in _liger:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        _liger["fn"] = LigerFusedLinearGRPOLoss(
            beta=KW["beta"],
            compiled=H.ON_GPU,
            use_ref_model=True,
            epsilon_low=KW["eps_low"],
            epsilon_high=KW["eps_high"],
            loss_type=KW["loss_type"],
            temperature=TEMP,
        )
    return _liger["fn"](h, w, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]


FWD = {
    "lacot-cuda": _lacot("cuda"),
    "lacot-triton": _lacot("triton"),
    "lacot-torch": _lacot("torch"),
    "lacot-logprobs+torch-loss": _lacot_logprobs_torch_loss,
    "liger-grpo": _liger_grpo,
    "trl-chunked": _trl_chunked,
    "torch-eager": _naive,
}
JIT = {"liger-grpo"} if H.ON_GPU else set()
NOTES = {
    "lacot-cuda": "compiled per-row kernel for fwd_nograd; tiles as lacot-torch (CPU) / lacot-triton (GPU)",
    "lacot-logprobs+torch-loss": "4 GEMMs",
    "liger-grpo": "compiled=True" if H.ON_GPU else "compiled=False",
    "trl-chunked": "completion tokens only",
    "torch-eager": "naive",
}


def _missing(provider: str, case: H.Case) -> str | None:
    why = H.lacot_missing(provider, case)
    if why is not None:
        return why
    if provider == "liger-grpo" and not H.installed("liger_kernel"):
        return "liger-kernel not installed"
    if provider == "trl-chunked" and not H.installed("trl"):
        return "trl not installed"
    if provider == "trl-chunked":
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
        except ImportError as exc:
            return f"this trl has no ChunkedLogProbFunction ({exc})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def _runner(fn, case: H.Case):
    def run(arg):
        hidden, weight, y, old, ref, adv, mask = arg
        if case.mode == "fwd_nograd":
            with torch.no_grad():
                return fn(hidden, weight, y, old, ref, adv, mask), None
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(h, w, y, old, ref, adv, mask)
        grads = torch.autograd.grad(loss, [h, w])
        return loss.detach(), grads

    return run


def _checker(inp: dict):
    def check(out):
        loss, grads = out
        err = {"logp": abs(float(loss) - float(inp["ref_loss"]))}
        if grads is not None:
            err["grad"] = max(H.max_abs_err(grads[0], inp["ref_dh"]), H.max_abs_err(grads[1], inp["ref_dw"]))
        return err

    return check


def test_fused_linear_grpo_loss(case, provider, benchmark):
    missing = _missing(provider, case)
    inp = _inputs(case) if missing is None else {}

    def prepare():
        return tuple(inp[k] for k in ("hidden", "weight", "targets", "old", "ref", "adv", "mask"))

    B, T, D, V = (case.dims[k] for k in "BTDV")
    n_active = int(inp["mask"].sum()) if inp else B * T
    # Useful work: the GEMMs a 3-GEMM implementation needs over the active tokens (1 without gradients).
    flops = (6 if case.mode == "fwd_bwd" else 2) * n_active * D * V
    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=_runner(FWD[provider], case),
        prepare=prepare,
        check=_checker(inp) if inp else None,
        jit=provider in JIT,
        full_rounds=1,
        warmup_always=False,
        flops=flops,
        note=NOTES.get(provider, ""),
    )


# ----------------------------------------------------------------------------------------------------------------
# Issue targets and ratios (printed after the tables)
# ----------------------------------------------------------------------------------------------------------------
def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    for case, rs in H.groups(rows).items():
        by = {r.provider: r for r in rs if r.missing is None}
        for name in ("lacot-cuda", "lacot-triton", "lacot-torch"):
            r = by.get(name)
            if r is None:
                continue
            parts = [
                f"{case.mode} ignored={case.ignored_frac:.0%} {case.shape_label} {case.dtype}: {name} {r.ms:.1f} ms"
            ]
            for peer in ("lacot-logprobs+torch-loss", "liger-grpo", "trl-chunked", "torch-eager"):
                p = by.get(peer)
                if p is not None:
                    mem = ""
                    if r.peak_extra_mib is not None and p.peak_extra_mib:
                        mem = f", memory {r.peak_extra_mib / p.peak_extra_mib:.2f}x"
                    parts.append(f"{p.ms / r.ms:.2f}x faster than {peer}{mem}")
            if H.ON_GPU and case.mode == "fwd_bwd" and case.dtype == "bf16" and case.ignored_frac == 0:
                parts.append("target <= 55 ms on H100")
            lines.append(", ".join(parts))
    if lines:
        lines.append("TFLOP/s counts the 3 GEMMs (6*n*D*V) of fwd_bwd, or 2*n*D*V, over the n active tokens.")
    return lines


H.register_summary(OP, _summary)
