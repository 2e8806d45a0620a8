"""The DPO step from the last hidden states: policy log-probs (with gradient) and reference log-probs (no
gradient) of chosen and rejected completions, summed per sequence, then the sigmoid DPO loss (beta = 0.1).

Providers, on the same policy and reference hidden states / LM heads and targets (``[chosen; rejected]``,
2P sequences of T positions, prompt positions labelled -100):
  * ``lacot-triton`` / ``lacot-torch`` / ``lacot-cuda``: :func:`fused_linear_token_logprobs` (policy, then the
    reference under no_grad) -> :func:`sequence_logprobs` -> :func:`dpo_loss`;
  * ``liger-dpo``: Liger's ``LigerFusedLinearDPOLoss`` (chunked; reference computed inside; ``compiled=False``
    on the CPU);
  * ``torch-eager``: the naive path (N x V logits, fp32 log_softmax, gather, sums, TRL's sigmoid loss).

Mode ``fwd_bwd``: the loss, then its gradients with respect to the policy hidden states and LM head.
``ignored_frac`` is the fraction of positions that are prompt (-100). The ``max|err| logp`` column holds the
loss's absolute error against the fp64 reference, ``max|err| grad`` the largest error of the two gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H

OP = "dpo_loss"
BETA = 0.1
IGNORE = -100
GPU = (pytest.mark.gpu,)
SHAPES = {
    "smoke": [((2, 16, 32, 1000), "fp32", ())],
    "full-cpu": [((4, 256, 256, 32000), "fp32", ())],
    "full-gpu": [((4, 1024, 4096, 152064), "bf16", GPU)],
}
IGNORED = [0.0, 0.5]
PROVIDERS = ["lacot-cuda", "lacot-triton", "lacot-torch", "liger-dpo", "torch-eager"]


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (P, T, D, V), dtype, marks in _shapes(size):
        for ignored in IGNORED:
            case = H.Case(OP, "fwd_bwd", False, (("P", P), ("T", T), ("D", D), ("V", V)), dtype, ignored, size)
            for p in PROVIDERS:
                params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the fp64 reference
# ----------------------------------------------------------------------------------------------------------------
_INPUTS: dict = {}


def _inputs(case: H.Case) -> dict:
    return H.cached_inputs(_INPUTS, (case.shape, case.dtype, case.ignored_frac), lambda: _build(case))


def _seq_logps64(h64, w64, y, step):
    N = h64.shape[0]
    out = torch.zeros(N, dtype=torch.float64, device=h64.device)
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        lp = torch.log_softmax(h64[sl] @ w64.T, -1).gather(-1, safe[sl, None]).squeeze(-1)
        out[sl] = torch.where(valid[sl], lp, 0.0)
    return out


def _build(case: H.Case) -> dict:
    P, T, D, V = (case.dims[k] for k in "PTDV")
    n_seq = 2 * P
    dev, dtype = H.DEVICE, case.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = 2.0 / math.sqrt(D)
    hidden = torch.randn(n_seq, T, D, generator=gen, device=dev).to(dtype)
    ref_hidden = (hidden.float() + 0.05 * torch.randn(n_seq, T, D, generator=gen, device=dev)).to(dtype)
    weight = (torch.randn(V, D, generator=gen, device=dev) * scale).to(dtype)
    ref_weight = (weight.float() + 0.02 * scale * torch.randn(V, D, generator=gen, device=dev)).to(dtype)
    y = torch.randint(0, V, (n_seq, T), generator=gen, device=dev)
    y[:, : int(round(case.ignored_frac * T))] = IGNORE

    step = max(1, (1 << 24) // V)
    N = n_seq * T
    yf = y.reshape(-1)
    h64 = hidden.double().reshape(N, D)
    w64 = weight.double()
    tok = _seq_logps64(h64, w64, yf, step).view(n_seq, T)
    ref_tok = _seq_logps64(ref_hidden.double().reshape(N, D), ref_weight.double(), yf, step).view(n_seq, T)
    x = tok.sum(-1).requires_grad_(True)
    rs = ref_tok.sum(-1)
    loss, _, _ = reference.dpo_loss(x[:P], x[P:], rs[:P], rs[P:], beta=BETA)
    (gseq,) = torch.autograd.grad(loss, x)
    g = torch.where(yf != IGNORE, gseq.repeat_interleave(T), 0.0)
    safe = torch.where(yf != IGNORE, yf, 0)
    ref_dh = torch.zeros(N, D, dtype=torch.float64, device=dev)
    ref_dw = torch.zeros(V, D, dtype=torch.float64, device=dev)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        p = torch.softmax(h64[sl] @ w64.T, -1)
        gz = p.mul_(-g[sl, None]).scatter_add_(-1, safe[sl, None], g[sl, None])
        ref_dh[sl] = gz @ w64
        ref_dw += gz.T @ h64[sl]
        del p, gz
    store = torch.float64 if dev.type == "cpu" else torch.float32
    return {
        "hidden": hidden,
        "weight": weight,
        "ref_hidden": ref_hidden,
        "ref_weight": ref_weight,
        "targets": y,
        "ref_loss": loss.detach(),
        "ref_dh": ref_dh.view(n_seq, T, D).to(store),
        "ref_dw": ref_dw.to(store),
    }


# ----------------------------------------------------------------------------------------------------------------
# Providers: loss(h, w, h_ref, w_ref, y) -> 0-d loss (sigmoid DPO, beta = 0.1)
# ----------------------------------------------------------------------------------------------------------------
def _lacot(backend: str):
    def loss(h, w, h_ref, w_ref, y):
        P = y.shape[0] // 2
        valid = y != IGNORE
        seq = lk.sequence_logprobs(lk.fused_linear_token_logprobs(h, w, y, backend=backend), valid)
        with torch.no_grad():
            ref = lk.sequence_logprobs(lk.fused_linear_token_logprobs(h_ref, w_ref, y, backend=backend), valid)
        return lk.dpo_loss(seq[:P], seq[P:], ref[:P], ref[P:], beta=BETA)[0]

    return loss


def _naive_seq(h, w, y):
    valid = y != IGNORE
    lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return (lp * valid).sum(-1)


def _naive(h, w, h_ref, w_ref, y):
    P = y.shape[0] // 2
    seq = _naive_seq(h, w, y)
    with torch.no_grad():
        ref = _naive_seq(h_ref, w_ref, y)
    x = BETA * ((seq[:P] - ref[:P]) - (seq[P:] - ref[P:]))
    return -F.logsigmoid(x).mean()


_liger: dict = {}


def _liger_dpo(h, w, h_ref, w_ref, y):
    if "fn" not in _liger:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        _liger["fn"] = LigerFusedLinearDPOLoss(beta=BETA, compiled=H.ON_GPU, use_ref_model=True, loss_type="sigmoid")
    return _liger["fn"](w, h, y, ref_input=h_ref, ref_weight=w_ref)[0]


FWD = {
    "lacot-cuda": _lacot("cuda"),
    "lacot-triton": _lacot("triton"),
    "lacot-torch": _lacot("torch"),
    "liger-dpo": _liger_dpo,
    "torch-eager": _naive,
}
JIT = {"liger-dpo"} if H.ON_GPU else set()
NOTES = {"liger-dpo": "compiled=True" if H.ON_GPU else "compiled=False", "torch-eager": "naive"}


def _missing(provider: str, case: H.Case) -> str | None:
    why = H.lacot_missing(provider, case)
    if why is not None:
        return why
    if provider == "liger-dpo" and not H.installed("liger_kernel"):
        return "liger-kernel not installed"
    return None


def _runner(fn):
    def run(arg):
        hidden, weight, h_ref, w_ref, y = arg
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(h, w, h_ref, w_ref, y)
        grads = torch.autograd.grad(loss, [h, w])
        return loss.detach(), grads

    return run


def _checker(inp: dict):
    def check(out):
        loss, (dh, dw) = out
        return {
            "logp": abs(float(loss) - float(inp["ref_loss"])),
            "grad": max(H.max_abs_err(dh, inp["ref_dh"]), H.max_abs_err(dw, inp["ref_dw"])),
        }

    return check


def test_dpo_loss(case, provider, benchmark):
    missing = _missing(provider, case)
    inp = _inputs(case) if missing is None else {}

    def prepare():
        return tuple(inp[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight", "targets"))

    P, T, D, V = (case.dims[k] for k in "PTDV")
    n_valid = int((inp["targets"] != IGNORE).sum()) if inp else 2 * P * T
    # Policy forward + backward (3 GEMMs) and the reference forward (1 GEMM) over the scored positions.
    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=_runner(FWD[provider]),
        prepare=prepare,
        check=_checker(inp) if inp else None,
        jit=provider in JIT,
        full_rounds=1,
        warmup_always=False,
        flops=8 * n_valid * D * V,
        note=NOTES.get(provider, ""),
    )


def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    for case, rs in H.groups(rows).items():
        by = {r.provider: r for r in rs if r.missing is None}
        for name in ("lacot-cuda", "lacot-triton", "lacot-torch"):
            r = by.get(name)
            if r is None:
                continue
            parts = [f"ignored={case.ignored_frac:.0%} {case.shape_label} {case.dtype}: {name} {r.ms:.1f} ms"]
            for peer in ("liger-dpo", "torch-eager"):
                p = by.get(peer)
                if p is not None:
                    mem = ""
                    if r.peak_extra_mib is not None and p.peak_extra_mib:
                        mem = f", memory {r.peak_extra_mib / p.peak_extra_mib:.2f}x"
                    parts.append(f"{p.ms / r.ms:.2f}x faster than {peer}{mem}")
            lines.append(", ".join(parts))
    if lines:
        lines.append("TFLOP/s counts 8*n*D*V (policy fwd+bwd, reference fwd) over the n scored positions.")
    return lines


H.register_summary(OP, _summary)
