"""The cost of the RL features against the plain ops, on the same inputs (issue 14).

Two tables, forward + backward:
* ``token_logprobs_truncated``: log-probs under the sampler's truncation (top-p / top-k / min-p) and the
  deterministic (batch-invariant) mode, against the plain op of the same backend, and the peer a trainer writes
  today (torch eager: sort, cumulative sum, mask, log_softmax, gather; what NeMo-RL's chunked path does per chunk);
* ``grpo_loss_rl``: TIS / MIS / IcePop rollout correction, GSPO sequence ratios and the deterministic mode, against
  the plain ``grpo_loss`` and a torch-eager TIS loss (TRL's formula).
* ``fused_linear_rl``: the same features in the fused LM-head ops (``fused_linear_token_logprobs`` with top-p /
  top-k / min-p / deterministic, ``fused_linear_grpo_loss`` with TIS and GSPO, two exact passes) against the plain
  fused ops of the same backend.
Errors are against the fp64 references (``reference.token_logprobs_truncated`` / ``reference.grpo_loss_rl``); the
grpo table's "logp" error column holds the loss error.
"""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from . import _harness as H

GPU = (pytest.mark.gpu,)

# ---- token_logprobs under truncation ----------------------------------------------------------------------------
TLP_SHAPES = {
    "smoke": [((64, 1000), "fp32", ())],
    "full-cpu": [((1024, 32000), "fp32", ())],
    "full-gpu": [((8192, 152064), "bf16", GPU)],
}
TOP_P, TOP_K, MIN_P = 0.9, 50, 0.05
# provider -> (backend, token_logprobs keyword arguments); "plain" rows are the cost baselines.
TLP_PROVIDERS = {
    "lacot-cuda-plain": ("cuda", {}),
    "lacot-cuda-top_p": ("cuda", dict(top_p=TOP_P)),
    "lacot-cuda-top_k": ("cuda", dict(top_k=TOP_K)),
    "lacot-cuda-min_p": ("cuda", dict(min_p=MIN_P)),
    "lacot-cuda-deterministic": ("cuda", dict(deterministic=True)),
    "lacot-torch-plain": ("torch", {}),
    "lacot-torch-top_p": ("torch", dict(top_p=TOP_P)),
    "lacot-torch-deterministic": ("torch", dict(deterministic=True)),
    "lacot-triton-top_p": ("triton", dict(top_p=TOP_P)),
    "torch-eager-top_p": (None, dict(top_p=TOP_P)),
}

# ---- grpo_loss with the corrections -----------------------------------------------------------------------------
GRPO_SHAPES = {"smoke": [((8, 128), "fp32", ())], "full-cpu": [((256, 2048), "fp32", ())], "full-gpu": []}
GRPO_PROVIDERS = {
    "lacot-plain": {},
    "lacot-tis": dict(is_correction="tis"),
    "lacot-mis": dict(is_correction="mis"),
    "lacot-icepop": dict(is_correction="icepop"),
    "lacot-gspo": dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4),
    "lacot-deterministic": dict(deterministic=True),
    "torch-eager-tis": dict(is_correction="tis"),
}


# ---- the fused LM-head ops ---------------------------------------------------------------------------------------
FUSED_SHAPES = {
    "smoke": [((64, 64, 1000), "fp32", ())],
    "full-cpu": [((512, 256, 32000), "fp32", ())],
    "full-gpu": [((8192, 4096, 152064), "bf16", GPU)],
}
# provider -> (backend, op, keyword arguments); "plain" rows are the cost baselines.
FUSED_PROVIDERS = {
    f"lacot-{b}-{name}": (b, op, kw)
    for b in ("cuda", "triton", "torch")
    for name, op, kw in (
        ("logp-plain", "logp", {}),
        ("logp-top_p", "logp", dict(top_p=TOP_P)),
        ("logp-top_k", "logp", dict(top_k=TOP_K)),
        ("logp-min_p", "logp", dict(min_p=MIN_P)),
        ("logp-deterministic", "logp", dict(deterministic=True)),
        ("grpo-plain", "grpo", {}),
        ("grpo-tis", "grpo", dict(is_correction="tis")),
        ("grpo-gspo", "grpo", dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4)),
    )
}


def _shapes(table: dict, size: str):
    if size == "smoke":
        return table["smoke"]
    return ([] if H.ON_GPU else table["full-cpu"]) + table["full-gpu"]


def pytest_generate_tests(metafunc):
    size = metafunc.config.getoption("--bench-size")
    if "tlp_case" in metafunc.fixturenames:
        params = []
        for (N, V), dtype, marks in _shapes(TLP_SHAPES, size):
            case = H.Case("token_logprobs_truncated", "fwd_bwd", False, (("N", N), ("V", V)), dtype, 0.0, size)
            for p in TLP_PROVIDERS:
                params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
        metafunc.parametrize("tlp_case,provider", params)
    if "grpo_case" in metafunc.fixturenames:
        params = []
        for (B, T), dtype, marks in _shapes(GRPO_SHAPES, size):
            case = H.Case("grpo_loss_rl", "fwd_bwd", False, (("B", B), ("T", T)), dtype, 0.0, size)
            for p in GRPO_PROVIDERS:
                params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
        metafunc.parametrize("grpo_case,provider", params)
    if "fused_case" in metafunc.fixturenames:
        params = []
        for (N, D, V), dtype, marks in _shapes(FUSED_SHAPES, size):
            case = H.Case("fused_linear_rl", "fwd_bwd", False, (("N", N), ("D", D), ("V", V)), dtype, 0.0, size)
            for p in FUSED_PROVIDERS:
                params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
        metafunc.parametrize("fused_case,provider", params)


_TLP: dict = {}
_GRPO: dict = {}


def _tlp_inputs(case: H.Case, kw: dict) -> dict:
    def build():
        N, V = case.dims["N"], case.dims["V"]
        gen = torch.Generator(device=H.DEVICE).manual_seed(0)
        logits = (2.0 * torch.randn(N, V, generator=gen, device=H.DEVICE)).to(case.torch_dtype)
        # The sampled token is in every kept set: the argmax (finite log-probs for every setting).
        return dict(logits=logits, targets=logits.argmax(-1), g=torch.randn(N, generator=gen, device=H.DEVICE))

    inp = H.cached_inputs(_TLP, (case.shape, case.dtype), build)
    key = ("ref",) + tuple(sorted((k, v) for k, v in kw.items() if k in ("top_p", "top_k", "min_p")))
    if key not in inp:
        logits, targets = inp["logits"], inp["targets"]
        ref = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
        step = max(1, (1 << 23) // logits.shape[1])
        for r0 in range(0, logits.shape[0], step):
            x = logits[r0 : r0 + step]
            keep = reference.kept_mask(x, **dict(key[1:]))
            ref[r0 : r0 + step] = reference.token_logprobs_truncated(x, targets[r0 : r0 + step], keep)[0]
        inp[key] = ref
    return inp | {"ref": inp[key]}


def _eager_top_p(logits, targets, top_p):
    """What a trainer writes without a kernel: the sampler's top-p mask materialized, then log_softmax + gather."""
    x = logits.float()
    xs, idx = torch.sort(x, dim=-1)
    cum = torch.softmax(xs, -1).cumsum(-1)
    removed = cum <= 1 - top_p
    removed[:, -1] = False
    drop = torch.zeros_like(removed).scatter(-1, idx, removed)
    lp = torch.log_softmax(x.masked_fill(drop, float("-inf")), -1)
    return lp.gather(-1, targets[:, None]).squeeze(-1)


def _tlp_missing(provider: str, case: H.Case) -> str | None:
    backend, _ = TLP_PROVIDERS[provider]
    if backend in ("cuda", "triton"):
        return H.lacot_missing(f"lacot-{backend}", case)
    return None


def test_token_logprobs_truncated(tlp_case, provider, benchmark):
    case = tlp_case
    backend, kw = TLP_PROVIDERS[provider]
    missing = _tlp_missing(provider, case)
    inp = _tlp_inputs(case, kw) if missing is None else {}

    def run(arg):
        logits, targets, g = arg
        x = logits.detach().requires_grad_()
        if backend is None:
            logp = _eager_top_p(x, targets, kw["top_p"])
        else:
            logp = lk.token_logprobs(x, targets, backend=backend, **kw)
        (gx,) = torch.autograd.grad((logp * g).sum(), [x])
        return logp.detach(), gx

    def check(out):
        return {"logp": H.max_abs_err(out[0], inp["ref"])}

    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=run,
        prepare=lambda: (inp["logits"], inp["targets"], inp["g"]),
        check=check if inp else None,
        full_rounds=3,
    )


def _grpo_inputs(case: H.Case) -> dict:
    def build():
        B, T = case.dims["B"], case.dims["T"]
        gen = torch.Generator(device=H.DEVICE).manual_seed(0)
        dev = H.DEVICE

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device=dev)

        lp = rnd(B, T) * 0.5 - 1.0
        old = lp + 0.05 * rnd(B, T)
        return dict(
            logp=lp,
            old=old,
            roll=old + 0.2 * rnd(B, T),
            adv=rnd(B),
            mask=(torch.rand(B, T, generator=gen, device=dev) > 0.2).float(),
        )

    return H.cached_inputs(_GRPO, (case.shape, case.dtype), build)


def _eager_tis(logp, old, roll, adv, mask, cap=2.0):
    """TRL's formula: per-token clipped surrogate times min(exp(old - rollout), cap), token mean (dapo)."""
    w = torch.clamp(torch.exp(old - roll), max=cap)
    r = torch.exp(logp - old)
    a = adv[:, None]
    per_tok = -torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a) * w
    return (per_tok * mask).sum() / mask.sum().clamp(min=1.0)


def test_grpo_loss_rl(grpo_case, provider, benchmark):
    case = grpo_case
    kw = GRPO_PROVIDERS[provider]
    inp = _grpo_inputs(case)
    rkw = {k: v for k, v in kw.items() if k in ("eps_low", "eps_high")}
    isw = None
    if "is_correction" in kw:
        isw = reference.rollout_is_weights(inp["old"], inp["roll"], inp["mask"], mode=kw["is_correction"])
    ref, _ = reference.grpo_loss_rl(
        inp["logp"], inp["old"], inp["adv"], inp["mask"], is_weight=isw,
        ratio_level=kw.get("ratio_level", "token"), **rkw,
    )  # fmt: skip

    def run(_):
        x = inp["logp"].detach().requires_grad_()
        if provider.startswith("torch-eager"):
            loss = _eager_tis(x, inp["old"], inp["roll"], inp["adv"], inp["mask"])
        else:
            roll = inp["roll"] if "is_correction" in kw else None
            loss, _ = lk.grpo_loss(x, inp["old"], inp["adv"], inp["mask"], rollout_logp=roll, **kw)
        (gx,) = torch.autograd.grad(loss, [x])
        return loss.detach(), gx

    H.bench(
        benchmark,
        case,
        provider,
        missing=None,
        run=run,
        prepare=lambda: None,
        check=lambda out: {"logp": H.max_abs_err(out[0], ref)},
        full_rounds=5,
    )


_FUSED: dict = {}


def _fused_inputs(case: H.Case) -> dict:
    def build():
        N, D, V = case.dims["N"], case.dims["D"], case.dims["V"]
        gen = torch.Generator(device=H.DEVICE).manual_seed(0)
        dev = H.DEVICE
        h = torch.randn(N, D, generator=gen, device=dev).to(case.torch_dtype)
        w = (torch.randn(V, D, generator=gen, device=dev) * D**-0.5 * 2).to(case.torch_dtype)
        B = max(1, N // 128)
        T = N // B
        with torch.no_grad():
            y = lk.fused_linear_token_logprobs  # the argmax is in every kept set: finite log-probs everywhere
            targets = torch.cat([(h[r0 : r0 + 1024].float() @ w.float().T).argmax(-1) for r0 in range(0, N, 1024)])
            lp = y(h, w, targets)
        old = lp + 0.05 * torch.randn(N, generator=gen, device=dev)
        return dict(
            h=h, w=w, targets=targets, B=B, T=T, old=old.view(B, T), roll=(old + 0.2 * torch.randn(
                N, generator=gen, device=dev)).view(B, T), adv=torch.randn(B, generator=gen, device=dev),
            mask=torch.ones(B, T, device=dev), g=torch.randn(N, generator=gen, device=dev),
        )  # fmt: skip

    return H.cached_inputs(_FUSED, (case.shape, case.dtype), build)


def _fused_ref(inp: dict, op: str, kw: dict) -> torch.Tensor:
    """fp64 reference of the logp (logp rows) or of the loss (grpo rows), cached per setting."""
    key = (op,) + tuple(sorted((k, v) for k, v in kw.items() if k != "deterministic"))
    if key not in inp:
        h, w, y = inp["h"], inp["w"], inp["targets"]
        lp = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
        step = max(1, (1 << 23) // w.shape[0])
        trunc = {k: v for k, v in kw.items() if k in ("top_p", "top_k", "min_p")}
        for r0 in range(0, h.shape[0], step):
            x = h[r0 : r0 + step].double() @ w.double().T
            keep = reference.kept_mask(x, **trunc) if trunc else torch.ones_like(x, dtype=torch.bool)
            lp[r0 : r0 + step] = reference.token_logprobs_truncated(x, y[r0 : r0 + step], keep)[0]
        if op == "logp":
            inp[key] = lp
        else:
            B, T = inp["B"], inp["T"]
            isw = None
            if "is_correction" in kw:
                isw = reference.rollout_is_weights(inp["old"], inp["roll"], inp["mask"], mode=kw["is_correction"])
            rkw = {k: v for k, v in kw.items() if k in ("eps_low", "eps_high", "ratio_level")}
            lp2 = lp.view(B, T)
            inp[key] = reference.grpo_loss_rl(lp2, inp["old"], inp["adv"], inp["mask"], is_weight=isw, **rkw)[0]
    return inp[key]


def test_fused_linear_rl(fused_case, provider, benchmark):
    case = fused_case
    backend, op, kw = FUSED_PROVIDERS[provider]
    missing = H.lacot_missing(f"lacot-{backend}", case) if backend != "torch" else None
    inp = _fused_inputs(case) if missing is None else {}
    ref = _fused_ref(inp, op, kw) if inp else None

    def run(_):
        h = inp["h"].detach().requires_grad_()
        if op == "logp":
            out = lk.fused_linear_token_logprobs(h, inp["w"], inp["targets"], backend=backend, **kw)
            (gh,) = torch.autograd.grad((out * inp["g"]).sum(), [h])
        else:
            B, T = inp["B"], inp["T"]
            roll = inp["roll"] if "is_correction" in kw else None
            out, _ = lk.fused_linear_grpo_loss(
                h.view(B, T, -1), inp["w"], inp["targets"].view(B, T), inp["old"], inp["adv"], inp["mask"],
                backend=backend, rollout_logp=roll, **kw,
            )  # fmt: skip
            (gh,) = torch.autograd.grad(out, [h])
        return out.detach(), gh

    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=run,
        prepare=lambda: None,
        check=(lambda out: {"logp": H.max_abs_err(out[0], ref)}) if inp else None,
        full_rounds=3,
    )
