"""grpo_loss and fused_linear_grpo_loss: research vectors (dpo_grpo.md §5.6), the fp64 reference, Liger's
chunked GRPO loss, gradients, registration (opcheck, torch.compile) and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from .helpers import ALL_BACKENDS, bf16_grad_atol

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


# ----------------------------------------------------------------------------------------------------------------
# dpo_grpo.md §5.6: GRPO loss with clipping and KL (B = 2, T = 4)
# ----------------------------------------------------------------------------------------------------------------
def _vec(device):
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    logp = t([[-1.0, -0.5, -2.0, -0.3], [-0.7, -1.2, -0.1, -0.9]])
    old = t([[-1.1, -0.5, -1.8, -0.3], [-0.7, -1.0, -0.4, -0.6]])
    ref = t([[-0.9, -0.6, -2.1, -0.3], [-0.8, -1.2, -0.2, -0.8]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = t([1.0, -0.5])
    return logp, old, ref, mask, adv


VEC_LOSS = {"grpo": -0.239107, "bnpo": -0.134060, "dr_grpo": -0.117302, "dapo": -0.134060}
VEC_GRAD = {
    "grpo": [[-0.184896, -0.166032, -0.135821, 0], [0.062976, 0.051171, 0.084842, -0.000526]],
    "dapo": [[-0.158483, -0.142313, -0.116418, 0], [0.071972, 0.058481, 0.096962, -0.000601]],
}


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_vector_5_6_clip_and_kl(device, backend, loss_type):
    logp, old, ref, mask, adv = _vec(device)
    logp.requires_grad_(True)
    loss, stats = lk.grpo_loss(
        logp,
        old,
        adv,
        mask,
        ref_logp=ref,
        beta=0.04,
        eps_low=0.2,
        loss_type=loss_type,
        max_completion_length=4,
        backend=backend,
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(VEC_LOSS[loss_type], abs=1e-6)
    # masked mean kl = 0.004242; low_clip only at (1, 3): 1 of 7 tokens; no high clip.
    assert stats["kl"].item() == pytest.approx(0.004242, abs=1e-6)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 7, abs=1e-7)
    assert stats["clip_ratio/high_mean"].item() == 0.0
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(1 / 7, abs=1e-7)
    (g,) = torch.autograd.grad(loss, logp)
    if loss_type in VEC_GRAD:
        torch.testing.assert_close(g.cpu(), torch.tensor(VEC_GRAD[loss_type]), atol=1e-6, rtol=0)
    assert g[0, 3].item() == 0.0  # masked token
    assert g[1, 3].abs().item() < 1e-3  # low-clipped token: only the KL term's gradient is left


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_vector_5_6_dapo_style_and_on_policy(device, backend):
    logp, old, ref, mask, adv = _vec(device)
    # DAPO-style: eps_high = 0.28, beta = 0 (no reference at all).
    expect = {"grpo": -0.239280, "bnpo": -0.134230, "dapo": -0.134230, "dr_grpo": -0.117451}
    for lt, v in expect.items():
        loss, stats = lk.grpo_loss(
            logp, old, adv, mask, eps_high=0.28, loss_type=lt, max_completion_length=4, backend=backend
        )
        assert loss.item() == pytest.approx(v, abs=1e-6), lt
        assert "kl" not in stats
    # On-policy: old = logp.detach(), beta = 0.04.
    lp = logp.clone().requires_grad_(True)
    expect = {"grpo": -0.249827, "bnpo": -0.142687, "dr_grpo": -0.124852}
    for lt, v in expect.items():
        loss, _ = lk.grpo_loss(
            lp,
            lp.detach(),
            adv,
            mask,
            ref_logp=ref,
            beta=0.04,
            loss_type=lt,
            max_completion_length=4,
            backend=backend,
        )
        assert loss.item() == pytest.approx(v, abs=1e-6), lt
        if lt == "grpo":
            (g,) = torch.autograd.grad(loss, lp)
            want = [[-0.167368, -0.166032, -0.166032, 0], [0.062976, 0.0625, 0.062976, 0.061974]]
            torch.testing.assert_close(g.cpu(), torch.tensor(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_vector_5_6_gradient_accumulation(device, backend):
    """Two micro-batches (seq 0: 3 tokens, seq 1: 4 tokens), GA = 2: dapo with TRL's whole-batch normalizer 7
    sums to the full-batch token mean; grpo/bnpo (÷ own tokens, ÷ GA) to the full-batch grpo value."""
    logp, old, ref, mask, adv = _vec(device)
    kw = dict(ref_logp=None, beta=0.04, max_completion_length=4, backend=backend)
    parts = {}
    for i in range(2):
        sl = slice(i, i + 1)
        kw["ref_logp"] = ref[sl]
        parts[("dapo", i)] = lk.grpo_loss(
            logp[sl], old[sl], adv[sl], mask[sl], loss_type="dapo", dapo_normalizer=7, **kw
        )[0]
        parts[("grpo", i)] = lk.grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], loss_type="grpo", **kw)[0] / 2
        parts[("bnpo", i)] = lk.grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], loss_type="bnpo", **kw)[0] / 2
        parts[("dr_grpo", i)] = lk.grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], loss_type="dr_grpo", **kw)[0] / 2
    assert parts[("dapo", 0)].item() == pytest.approx(-0.417615, abs=1e-6)
    assert parts[("dapo", 1)].item() == pytest.approx(0.283556, abs=1e-6)
    assert (parts[("dapo", 0)] + parts[("dapo", 1)]).item() == pytest.approx(-0.134060, abs=1e-6)
    for lt in ("grpo", "bnpo"):
        assert parts[(lt, 0)].item() == pytest.approx(-0.487218, abs=1e-6)
        assert parts[(lt, 1)].item() == pytest.approx(0.248111, abs=1e-6)
        assert (parts[(lt, 0)] + parts[(lt, 1)]).item() == pytest.approx(-0.239107, abs=1e-6)
    assert (parts[("dr_grpo", 0)] + parts[("dr_grpo", 1)]).item() == pytest.approx(-0.117302, abs=1e-6)
    # A 0-d tensor normalizer (no host sync) gives the same number.
    t = lk.grpo_loss(
        logp[:1],
        old[:1],
        adv[:1],
        mask[:1],
        ref_logp=ref[:1],
        beta=0.04,
        loss_type="dapo",
        dapo_normalizer=torch.tensor(7, device=device),
        backend=backend,
    )[0]
    assert t.item() == pytest.approx(-0.417615, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Random cases against the fp64 reference (TRL's code transcribed)
# ----------------------------------------------------------------------------------------------------------------
def _random_case(B, T, *, seed, device, dtype=torch.float32, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * spread
    ref = logp + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, generator=g)
    adv[0] = 0.0  # a zero-advantage row (an all-equal reward group)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[-1] = T
    if B > 2:
        lengths[1] = 0  # an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    to = lambda x: x.to(device)  # noqa: E731
    return to(logp.to(dtype)), to(old), to(ref), to(adv), to(mask)


def _ref_and_grad(logp, old, adv, mask, **kw):
    x = logp.detach().double().requires_grad_(True)
    loss, stats = reference.grpo_loss(x, old, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, stats, g


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_reference(device, backend, loss_type, with_ref, dtype):
    logp, old, ref, adv, mask = _random_case(6, 37, seed=hash((loss_type, with_ref)) % 1000, device=device, dtype=dtype)
    kw = dict(
        ref_logp=ref if with_ref else None,
        beta=0.05 if with_ref else 0.0,
        eps_low=0.2,
        eps_high=0.28,
        loss_type=loss_type,
        max_completion_length=50 if loss_type == "dr_grpo" else None,
    )
    x = logp.detach().requires_grad_(True)
    loss, stats = lk.grpo_loss(x, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss * 3.0, x)  # an upstream gradient != 1
    assert g.dtype == dtype
    rloss, rstats, rg = _ref_and_grad(logp, old, adv, mask, **kw)
    assert abs(loss.item() - rloss.item()) < 2e-6
    assert set(stats) == set(rstats)
    for k in stats:
        assert abs(stats[k].item() - rstats[k].item()) < 2e-6, k
    atol = 1e-6 if dtype == torch.float32 else bf16_grad_atol(rg * 3, dtype)
    torch.testing.assert_close(g.double().cpu(), 3 * rg.cpu(), atol=atol, rtol=0)
    assert (g[mask == 0] == 0).all()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_masked_garbage_and_extremes(device, backend):
    """NaN / inf under masked tokens change nothing; huge ratios (clipped) give finite loss and 0 gradient."""
    logp, old, ref, adv, mask = _random_case(5, 16, seed=7, device=device)
    kw = dict(ref_logp=ref, beta=0.1, loss_type="bnpo")
    clean = lk.grpo_loss(logp, old, adv, mask, backend=backend, **kw)[0]
    off = mask == 0
    dirty = [t.clone() for t in (logp, old, ref)]
    for t, v in zip(dirty, (float("nan"), float("inf"), float("-inf")), strict=True):
        t[off] = v
    x = dirty[0].requires_grad_(True)
    loss = lk.grpo_loss(x, dirty[1], adv, mask, ref_logp=dirty[2], beta=0.1, loss_type="bnpo", backend=backend)[0]
    assert loss.item() == clean.item()
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and (g[off] == 0).all()

    # ratio = e^50 on a positive-advantage row: high-clipped -> loss -(1 + eps_high) A, gradient exactly 0.
    lp = torch.zeros(1, 3, device=device, requires_grad=True)
    o = torch.full((1, 3), -50.0, device=device)
    a = torch.tensor([2.0], device=device)
    loss, stats = lk.grpo_loss(lp, o, a, torch.ones(1, 3, device=device), backend=backend)
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert stats["clip_ratio/high_mean"].item() == 1.0
    assert (torch.autograd.grad(loss, lp)[0] == 0).all()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_empty_batch_and_all_masked(device, backend):
    for (B, T), lt in itertools.product(((0, 5), (3, 0)), LOSS_TYPES):
        lp = torch.zeros(B, T, device=device, requires_grad=True)
        loss, stats = lk.grpo_loss(
            lp,
            lp.detach(),
            torch.zeros(B, device=device),
            torch.ones(B, T, device=device),
            loss_type=lt,
            backend=backend,
        )
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
        assert torch.autograd.grad(loss, lp)[0].shape == (B, T)
    lp = torch.randn(2, 4, device=device, requires_grad=True)
    loss, _ = lk.grpo_loss(
        lp, lp.detach(), torch.ones(2, device=device), torch.zeros(2, 4, device=device), backend=backend
    )
    assert loss.item() == 0.0 and (torch.autograd.grad(loss, lp)[0] == 0).all()
    # One active token: every token-count normalizer is 1, so the loss is that token's loss, -A on-policy.
    one = torch.zeros(2, 4, device=device)
    one[1, 2] = 1
    for lt in ("grpo", "bnpo", "dapo"):
        loss, _ = lk.grpo_loss(
            lp, lp.detach(), torch.tensor([3.0, -0.25], device=device), one, loss_type=lt, backend=backend
        )
        assert loss.item() == pytest.approx(0.25 / (2 if lt == "grpo" else 1)), lt


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_fractional_mask_weights(device, backend):
    # TRL multiplies by the mask (e.g. completion_mask * tool_mask): fractional weights scale tokens and counts.
    logp, old, ref, adv, _ = _random_case(3, 8, seed=11, device=device)
    w = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)).to(device)
    w[0, :3] = 0
    for lt in LOSS_TYPES:
        loss = lk.grpo_loss(logp, old, adv, w, ref_logp=ref, beta=0.02, loss_type=lt, backend=backend)[0]
        rloss = reference.grpo_loss(logp, old, adv, w, ref_logp=ref, beta=0.02, loss_type=lt)[0]
        assert abs(loss.item() - rloss.item()) < 2e-6, lt


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck():
    """The reference in fp64 (math layer), and each backend's analytic gradient by finite differences in fp32
    on ratios chosen away from the clip boundaries (where the loss has kinks)."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])[torch.randint(0, 5, (B, T), generator=g)]
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.2
    old = logp - ratios.double().log()
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[2, 3:] = 0
    for lt in LOSS_TYPES:
        torch.autograd.gradcheck(
            lambda x, lt=lt: reference.grpo_loss(x, old, adv, mask, ref_logp=ref, beta=0.1, loss_type=lt)[0],
            (logp.clone().requires_grad_(True),),
        )
    for device, backend in ALL_BACKENDS:
        x = logp.float().to(device).requires_grad_(True)
        args = (old.float().to(device), adv.float().to(device), mask.to(device))
        r = ref.float().to(device)

        def f(x, args=args, r=r, backend=backend):
            return lk.grpo_loss(x, *args, ref_logp=r, beta=0.1, loss_type="grpo", backend=backend)[0]

        assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=2e-4, rtol=1e-2, fast_mode=False)


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_grpo_loss
# ----------------------------------------------------------------------------------------------------------------
def _fused_case(B, T, D, V, *, seed, device, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if B > 2:
        lengths[1] = 0  # a row with no completion token: skipped entirely
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    y[mask == 0] = -100  # padding ids are never read, even out of range
    lp0, _ = reference.fused_linear_token_logprobs(h, w, y.clamp(min=0), bias=b, temperature=0.9)
    old = (lp0 + torch.randn(B, T, generator=g) * 0.3).float()
    ref = (lp0 + torch.randn(B, T, generator=g) * 0.1).float()
    adv = torch.randn(B, generator=g)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(h), to(w), to(b), to(y), to(old), to(ref), to(adv), to(mask)


def _fused_ref(h, w, b, y, old, adv, mask, **kw):
    hh = h.detach().double().requires_grad_(True)
    ww = w.detach().double().requires_grad_(True)
    bb = b.detach().double().requires_grad_(True) if b is not None else None
    loss, stats = reference.fused_linear_grpo_loss(hh, ww, y, old, adv, mask, bias=bb, **kw)
    grads = torch.autograd.grad(loss, [t for t in (hh, ww, bb) if t is not None])
    return loss, stats, grads


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_fp64_reference(device, backend, loss_type, dtype):
    h, w, b, y, old, ref, adv, mask = _fused_case(4, 6, 24, 300, seed=3, device=device, dtype=dtype, bias=True)
    kw = dict(temperature=0.9, ref_logp=ref, beta=0.04, eps_high=0.28, loss_type=loss_type)
    hh, ww, bb = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    loss, stats = lk.fused_linear_grpo_loss(hh, ww, y, old, adv, mask, bias=bb, backend=backend, **kw)
    (loss * 0.5).backward()
    rloss, rstats, (rh, rw, rb) = _fused_ref(h, w, b, y, old, adv, mask, **kw)
    tol = 2e-6 if dtype == torch.float32 else 2e-5
    assert abs(loss.item() - rloss.item()) < tol
    for k in rstats:
        assert abs(stats[k].item() - rstats[k].item()) < tol, k
    for got, want in ((hh.grad, rh), (ww.grad, rw), (bb.grad, rb)):
        assert got.dtype == dtype
        atol = 1e-6 if dtype == torch.float32 else bf16_grad_atol(want * 0.5, dtype)
        torch.testing.assert_close(got.double().cpu(), 0.5 * want.cpu(), atol=atol, rtol=0)
    assert (hh.grad[mask == 0] == 0).all()

    # Forward only (no_grad): same loss and statistics through the log-prob kernel, no gradient work.
    with torch.no_grad():
        nloss, nstats = lk.fused_linear_grpo_loss(h, w, y, old, adv, mask, bias=b, backend=backend, **kw)
    assert abs(nloss.item() - rloss.item()) < tol
    for k in rstats:
        assert abs(nstats[k].item() - rstats[k].item()) < tol, k


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_fused_frozen_head_and_chunking(device, backend, monkeypatch):
    """Only hidden requires grad (frozen LM head, LoRA): no weight gradient; a tiny workspace forces many chunks."""
    h, w, _, y, old, ref, adv, mask = _fused_case(3, 7, 16, 257, seed=5, device=device)
    monkeypatch.setenv("LACOT_FUSED_WORKSPACE_MB", "0.01")  # ~10 rows per chunk
    hh = h.clone().requires_grad_(True)
    loss, _ = lk.fused_linear_grpo_loss(hh, w, y, old, adv, mask, loss_type="grpo", backend=backend)
    loss.backward()
    assert w.grad is None
    rloss, _, (rh, _rw) = _fused_ref(h, w, None, y, old, adv, mask, loss_type="grpo")
    assert abs(loss.item() - rloss.item()) < 2e-6
    torch.testing.assert_close(hh.grad.double().cpu(), rh.cpu(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_fused_inside_autocast(device, backend):
    """A caller's autocast region must not recast the op's fp32 logits tiles to 16 bits."""
    h, w, _, y, old, ref, adv, mask = _fused_case(3, 5, 16, 150, seed=13, device=device)
    hh = h.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _ = lk.fused_linear_grpo_loss(hh, w, y, old, adv, mask, ref_logp=ref, beta=0.04, backend=backend)
    loss.backward()
    rloss, _, (rh, _rw) = _fused_ref(h, w, None, y, old, adv, mask, ref_logp=ref, beta=0.04)
    assert abs(loss.item() - rloss.item()) < 2e-6
    torch.testing.assert_close(hh.grad.double().cpu(), rh.cpu(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_fused_equals_logprob_op_plus_grpo_loss(device, backend):
    h, w, _, y, old, ref, adv, mask = _fused_case(3, 5, 16, 200, seed=9, device=device)
    kw = dict(ref_logp=ref, beta=0.04, loss_type="dapo")
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss1, st1 = lk.fused_linear_grpo_loss(h1, w1, y, old, adv, mask, backend=backend, **kw)
    loss1.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp = lk.fused_linear_token_logprobs(h2, w2, torch.where(mask != 0, y, -100), backend=backend)
    loss2, st2 = lk.grpo_loss(lp, old, adv, mask, backend=backend, **kw)
    loss2.backward()
    assert abs(loss1.item() - loss2.item()) < 1e-6
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Peer: Liger's chunked fused-linear GRPO loss (CPU, compiled=False)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_equals_liger_fused_linear_grpo(device, backend, loss_type, beta):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    B, T, D, V = 4, 6, 16, 120
    h, w, b, y, old, ref, adv, mask = _fused_case(B, T, D, V, seed=21, device=device, bias=True)
    y = y.clamp(min=0)  # Liger reads every target, masked ones included
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=9, temperature=0.9)
    liger = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=1, **kw)
    hl, wl, bl = (t.clone().requires_grad_(True) for t in (h, w, b))
    loss_l, metrics = liger(
        hl, wl, y, mask, adv, bias=bl, ref_per_token_logps=ref if beta else None, old_per_token_logps=old
    )
    loss_l.backward()
    ho, wo, bo = (t.clone().requires_grad_(True) for t in (h, w, b))
    loss_o, stats = lk.fused_linear_grpo_loss(
        ho,
        wo,
        y,
        old,
        adv,
        mask,
        bias=bo,
        ref_logp=ref if beta else None,
        beta=beta,
        eps_low=0.2,
        eps_high=0.28,
        loss_type=loss_type,
        max_completion_length=9,
        temperature=0.9,
        backend=backend,
    )
    loss_o.backward()
    assert abs(loss_o.item() - loss_l.item()) < 1e-6
    if beta:
        assert abs(stats["kl"].item() - metrics[0].item()) < 1e-6
    assert abs(stats["clip_ratio/region_mean"].item() - metrics[-1].item()) < 1e-7
    for ours, theirs in ((ho.grad, hl.grad), (wo.grad, wl.grad), (bo.grad, bl.grad)):
        torch.testing.assert_close(ours, theirs, atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_equals_liger_dapo_num_items_in_batch(device, backend):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    h, w, _, y, old, ref, adv, mask = _fused_case(3, 5, 16, 100, seed=2, device=device)
    y = y.clamp(min=0)
    liger = chunked.LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="dapo")
    loss_l, _ = liger(h, w, y, mask, adv, old_per_token_logps=old, num_items_in_batch=40)
    loss_o, _ = lk.fused_linear_grpo_loss(
        h, w, y, old, adv, mask, loss_type="dapo", dapo_normalizer=40, backend=backend
    )
    assert abs(loss_o.item() - loss_l.item()) < 1e-7


# ----------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_opcheck(device, backend):
    logp, old, ref, adv, mask = _random_case(3, 5, seed=1, device=device)
    x = logp.requires_grad_(True)
    m = mask.float()
    for r, norm, lt in ((ref, None, "grpo"), (None, torch.tensor(9.0, device=device), "dapo"), (ref, None, "dr_grpo")):
        torch.library.opcheck(
            torch.ops.lacot.grpo_loss.default,
            (x, old, adv, m, r, norm, 0.04 if r is not None else 0.0, 0.2, 0.28, lt, 7, backend),
        )
    torch.library.opcheck(
        torch.ops.lacot.grpo_loss_backward.default,
        (
            torch.tensor(2.0, device=device),
            x.detach(),
            old,
            adv,
            m,
            ref,
            torch.rand(3, device=device),
            0.04,
            0.2,
            0.2,
            backend,
        ),
    )
    h, w, b, y, old, ref, adv, mask = _fused_case(3, 4, 8, 40, seed=1, device=device, bias=True)
    h = h.reshape(12, 8).requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    flat = lambda t: t.reshape(-1)  # noqa: E731
    for needs in ([True, True, True], [True, False, False], [False, False, False]):
        torch.library.opcheck(
            torch.ops.lacot.fused_linear_grpo_loss.default,
            (
                h,
                w,
                b,
                flat(y),
                flat(old),
                adv,
                flat(mask).float(),
                flat(ref),
                None,
                0.9,
                0.04,
                0.2,
                0.2,
                "bnpo",
                4,
                needs,
                backend,
            ),
        )


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    h, w, _, y, old, ref, adv, mask = _fused_case(2, 4, 8, 40, seed=4, device=device)
    lp = (-torch.rand(2, 4, device=device)).requires_grad_(True)
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step(lp, h, w):
        l1, s1 = lk.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04, loss_type="grpo", backend=backend)
        l2, s2 = lk.fused_linear_grpo_loss(h, w, y, old, adv, mask, ref_logp=ref, beta=0.04, backend=backend)
        return l1 + 2.0 * l2 + s1["clip_ratio/region_mean"] + s2["kl"]

    explanation = torch._dynamo.explain(step)(lp, h, w)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(lp, h, w)
    grads = torch.autograd.grad(out, (lp, h, w))
    want = step(lp, h, w)
    wgrads = torch.autograd.grad(want, (lp, h, w))
    torch.testing.assert_close(out, want)
    for a, b_ in zip(grads, wgrads, strict=True):
        torch.testing.assert_close(a, b_)
    with torch.no_grad():  # the forward-only branch compiles too
        torch.testing.assert_close(compiled(lp, h, w), want.detach())


def test_compile_inductor_cpu():
    torch._dynamo.reset()
    logp, old, ref, adv, mask = _random_case(3, 6, seed=2, device="cpu")
    x = logp.requires_grad_(True)
    f = torch.compile(lambda x: lk.grpo_loss(x * 1.0, old, adv, mask, loss_type="bnpo")[0] * 2.0, fullgraph=True)
    out = f(x)
    out.backward()
    want = reference.grpo_loss(x.detach(), old, adv, mask, loss_type="bnpo")[0] * 2.0
    assert abs(out.item() - want.item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
_L = torch.zeros(2, 3)
_A = torch.zeros(2)
_M = torch.ones(2, 3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(loss_type="ppo"),
            ValueError,
            r"loss_type must be one of \('grpo', 'bnpo', 'dr_grpo', 'dapo'\), got 'ppo'",
        ),
        (dict(old_logp=torch.zeros(2, 4)), ValueError, r"old_logp must have shape \(2, 3\).*got \(2, 4\)"),
        (dict(ref_logp=torch.zeros(3, 3)), ValueError, r"ref_logp must have shape \(2, 3\).*got \(3, 3\)"),
        (dict(advantages=torch.zeros(2, 1)), ValueError, r"advantages must have shape \(B,\) = \(2,\), got \(2, 1\)"),
        (dict(mask=torch.ones(2, 2)), ValueError, r"mask must have shape \(B, T\) = \(2, 3\), got \(2, 2\)"),
        (dict(logp=torch.zeros(6)), ValueError, r"logp must have shape \(B, T\), got \(6,\)"),
        (dict(logp=torch.zeros(2, 3, dtype=torch.int64)), TypeError, r"logp must have dtype float32/bfloat16/float16"),
        (
            dict(mask=torch.ones(2, 3, dtype=torch.complex64)),
            TypeError,
            r"mask must have dtype bool, an integer or a float",
        ),
        (dict(beta=0.1), ValueError, r"beta=0.1 needs ref_logp"),
        (dict(beta=-0.1, ref_logp=_L), ValueError, r"beta must be finite and >= 0.0, got -0.1"),
        (dict(eps_low=float("nan")), ValueError, r"eps_low must be finite"),
        (dict(eps_high=-0.2), ValueError, r"eps_high must be finite and >= 0.0, got -0.2"),
        (dict(eps_low="0.2"), TypeError, r"eps_low must be a Python float, got str"),
        (dict(max_completion_length=2), ValueError, r"max_completion_length must be >= the completion length T = 3"),
        (dict(max_completion_length=4.0), TypeError, r"max_completion_length must be a Python int, got float"),
        (dict(dapo_normalizer=5.0, loss_type="grpo"), ValueError, r"dapo_normalizer applies to loss_type='dapo' only"),
        (dict(dapo_normalizer=0.0), ValueError, r"dapo_normalizer must be > 0, got 0.0"),
        (dict(dapo_normalizer=torch.ones(2)), ValueError, r"dapo_normalizer must be a scalar, got shape \(2,\)"),
        (dict(backend="cudnn"), ValueError, r"backend must be one of .*got 'cudnn'"),
    ],
)
def test_grpo_loss_bad_input(kwargs, exc, match):
    args = dict(logp=_L, old_logp=_L, advantages=_A, mask=_M)
    for k in list(args):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(exc, match=match):
        lk.grpo_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kwargs)


_H = torch.zeros(2, 3, 4)
_W = torch.zeros(10, 4)
_Y = torch.zeros(2, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(hidden=torch.zeros(6, 4)), ValueError, r"hidden must have shape \(B, T, D\), got \(6, 4\)"),
        (
            dict(weight=torch.zeros(10, 5)),
            ValueError,
            r"weight must have shape \(V, D\) with D = hidden.shape\[-1\] = 4",
        ),
        (
            dict(weight=_W.half()),
            TypeError,
            r"weight must have the dtype of hidden \(torch.float32\), got torch.float16",
        ),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"targets must have shape \(B, T\) = \(2, 3\)"),
        (dict(targets=torch.zeros(2, 3)), TypeError, r"targets must have dtype int32/int64"),
        (dict(targets=torch.tensor([[0, 10, 0], [0, 0, 0]])), ValueError, r"targets must be in \[0, 10\).*got 10"),
        (dict(bias=torch.zeros(9)), ValueError, r"bias must have shape \(10,\), got \(9,\)"),
        (dict(temperature=0.0), ValueError, r"temperature must be finite and > 0, got 0.0"),
        (dict(loss_type="sum"), ValueError, r"loss_type must be one of"),
        (dict(advantages=torch.zeros(3)), ValueError, r"advantages must have shape \(B,\) = \(2,\), got \(3,\)"),
    ],
)
def test_fused_bad_input(kwargs, exc, match):
    args = dict(hidden=_H, weight=_W, targets=_Y, old_logp=_L, advantages=_A, mask=_M)
    for k in list(args):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(exc, match=match):
        lk.fused_linear_grpo_loss(*args.values(), **kwargs)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_tile_kernels_never_read_out_of_range_ids(device, backend):
    """On CUDA the host-side id check is opt-in: the tile kernels must turn a bad id into NaN, not a wild read,
    and agree with each other (and with log_softmax) on the good rows."""
    from lacot_kernels.ops import grpo as _grpo

    V, T = 20, 3
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).to(device)
    grad = torch.empty(3, V, device=device)
    targets = torch.tensor([1, V, -3], device=device)
    one = torch.ones(1, device=device)
    args = (torch.arange(3, device=device), targets, torch.zeros(3, device=device), None, one)
    want = torch.log_softmax(logits[0] / 0.7, -1)[1]
    out = _grpo.TILE[backend](
        logits.clone(), grad, *args, torch.ones(3, device=device), one, T, 1 / 0.7, 0.0, 0.8, 1.2, 0.7
    )
    assert out[0, 0].item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.isfinite(out[0]).all() and torch.isfinite(grad[0]).all()
    assert torch.isnan(out[1:, 0]).all() and torch.isnan(grad[1:]).any(1).all()


def test_fused_ignores_out_of_range_ids_under_mask():
    y = torch.tensor([[0, 1, 99], [-5, 2, 3]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    loss, _ = lk.fused_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(10, 4), y, _L, _A + 1, m)
    assert math.isfinite(loss.item())
