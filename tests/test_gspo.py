"""grpo_loss(ratio_level="sequence"): GSPO's length-normalized sequence ratio, vs the fp64 reference and GSPO's
closed-form gradient."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from .helpers import ALL_BACKENDS


def _inputs(B=6, T=11, seed=0, spread=0.01):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g) * 0.5 - 1.0
    old = lp + torch.randn(B, T, generator=g) * spread
    ref = lp + torch.randn(B, T, generator=g) * 0.1
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[1] = 0.0
    mask[3, :] = 1.0
    return lp, old, ref, adv, mask


def test_reference_gradient_is_exact():
    # The fp64 reference itself against finite differences (clip boundaries avoided by the seed).
    lp, old, ref, adv, mask = _inputs(B=4, T=5)
    f = lambda x: reference.grpo_loss_rl(  # noqa: E731
        x, old.double(), adv, mask, ref_logp=ref.double(), beta=0.04, ratio_level="sequence", eps_low=3e-3,
        eps_high=4e-3, loss_type="grpo",
    )[0]  # fmt: skip
    assert torch.autograd.gradcheck(f, (lp.double().requires_grad_(True),))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("eps", [(3e-3, 4e-3), (0.2, 0.28)])
def test_matches_fp64_reference(device, backend, loss_type, with_ref, eps):
    lp, old, ref, adv, mask = _inputs()
    dev = dict(device=device)
    x = lp.clone().to(**dev).requires_grad_(True)
    kw = dict(ref_logp=ref.to(**dev), beta=0.04) if with_ref else {}
    loss, stats = lk.grpo_loss(
        x, old.to(**dev), adv.to(**dev), mask.to(**dev), eps_low=eps[0], eps_high=eps[1], loss_type=loss_type,
        ratio_level="sequence", backend=backend, **kw,
    )  # fmt: skip
    (gx,) = torch.autograd.grad(loss, x)
    xr = lp.double().requires_grad_(True)
    rkw = dict(ref_logp=ref, beta=0.04) if with_ref else {}
    rl, rs = reference.grpo_loss_rl(
        xr, old, adv, mask, eps_low=eps[0], eps_high=eps[1], loss_type=loss_type, ratio_level="sequence", **rkw
    )
    (gr,) = torch.autograd.grad(rl, xr)
    torch.testing.assert_close(loss.double().cpu(), rl.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx.double().cpu(), gr, atol=1e-7, rtol=1e-5)
    for k, v in rs.items():
        torch.testing.assert_close(stats[k].double().cpu(), v, atol=1e-6, rtol=1e-6)
    if eps[0] < 0.01:
        assert float(stats["clip_ratio/region_mean"]) > 0  # the small GSPO band clips some sequences


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_gspo_closed_form_gradient(device, backend):
    # GSPO (Zheng et al. 2025, eq. for the unclipped case): grad = (1/G) sum_i s_i A_i (1/|y_i|) sum_t grad logp_it.
    lp, old, _, adv, mask = _inputs(spread=1e-4)
    x = lp.clone().to(device).requires_grad_(True)
    loss, stats = lk.grpo_loss(
        x, old.to(device), adv.to(device), mask.to(device), loss_type="grpo", ratio_level="sequence", backend=backend
    )
    assert float(stats["clip_ratio/region_mean"]) == 0.0
    (gx,) = torch.autograd.grad(loss, x)
    n = mask.double().sum(-1)
    s = torch.exp(((lp.double() - old.double()) * mask).sum(-1) / n.clamp(min=1))
    expect = -(s * adv.double() / n.clamp(min=1))[:, None] * mask / lp.shape[0]
    torch.testing.assert_close(gx.double().cpu(), expect, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_on_policy_sequence_gradient_equals_token_gradient(device, backend):
    lp, _, _, adv, mask = _inputs()
    out = []
    for level in ("token", "sequence"):
        x = lp.clone().to(device).requires_grad_(True)
        loss, _ = lk.grpo_loss(
            x, x.detach(), adv.to(device), mask.to(device), loss_type="grpo", ratio_level=level, backend=backend
        )
        out.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(out[0], out[1], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_padding_columns_change_nothing(device, backend):
    lp, old, ref, adv, mask = _inputs()
    pad = lambda t, v=0.0: torch.cat([t, torch.full((t.shape[0], 5), v)], 1)  # noqa: E731
    res = []
    for a, b, c, m in ((lp, old, ref, mask), (pad(lp, float("nan")), pad(old), pad(ref), pad(mask))):
        x = a.clone().to(device).requires_grad_(True)
        loss, _ = lk.grpo_loss(
            x, b.to(device), adv.to(device), m.to(device), ref_logp=c.to(device), beta=0.04, loss_type="grpo",
            ratio_level="sequence", backend=backend,
        )  # fmt: skip
        res.append((loss, torch.autograd.grad(loss, x)[0][:, : lp.shape[1]]))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1], atol=1e-8, rtol=1e-6)


def test_bad_ratio_level():
    lp, old, _, adv, mask = _inputs()
    with pytest.raises(ValueError, match="ratio_level"):
        lk.grpo_loss(lp, old, adv, mask, ratio_level="turn")
