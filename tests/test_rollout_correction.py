"""grpo_loss(rollout_logp=, is_correction=): TIS / MIS / IcePop weights vs their fp64 definitions, losses and
gradients vs the fp64 reference, and the plain loss (bitwise) when the rollout log-probs equal old_logp."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from .helpers import ALL_BACKENDS

MODES = [("tis", "token"), ("tis", "sequence"), ("mis", "token"), ("mis", "sequence"), ("icepop", "token")]


def _inputs(B=5, T=9, seed=0, mismatch=0.4):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g) * 0.5 - 1.0
    old = lp + torch.randn(B, T, generator=g) * 0.1
    roll = old + torch.randn(B, T, generator=g) * mismatch
    ref = lp + torch.randn(B, T, generator=g) * 0.1
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[2] = 0.0  # an empty row
    return lp, old, roll, ref, adv, mask


@pytest.mark.parametrize("mode,level", MODES)
def test_weights_match_definitions(mode, level):
    _, old, roll, _, _, mask = _inputs(mismatch=0.15 if level == "sequence" else 0.4)
    w, stats = lk.rollout_is_weights(old, roll, mask, mode=mode, cap=1.3, band=(0.7, 1.4), level=level)
    ref = reference.rollout_is_weights(old, roll, mask, mode=mode, cap=1.3, band=(0.7, 1.4), level=level)
    on = mask != 0
    torch.testing.assert_close(w[on].double(), ref[on], atol=1e-6, rtol=1e-6)
    # The statistics are masked means over the completion tokens.
    rho = torch.exp(old.double() - roll.double())
    if level == "sequence":
        rho = torch.exp(((old.double() - roll.double()) * mask).sum(-1, keepdim=True)).expand_as(rho)
    n = mask.sum()
    torch.testing.assert_close(stats["is/ratio_mean"].double(), rho[on].sum() / n, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats["is/weight_mean"].double(), ref[on].sum() / n, atol=1e-6, rtol=1e-6)
    if mode == "tis":
        frac = (rho[on] > 1.3).double().sum() / n
        torch.testing.assert_close(stats["is/truncated_frac"].double(), frac)
    else:
        out = (rho[on] > 1.3) if mode == "mis" else ((rho[on] < 0.7) | (rho[on] > 1.4))
        torch.testing.assert_close(stats["is/masked_frac"].double(), out.double().sum() / n)
    assert 0.0 < float(stats.get("is/truncated_frac", stats.get("is/masked_frac"))) < 1.0  # the case is exercised


def test_weights_hand_example():
    old = torch.zeros(1, 4)
    roll = torch.log(torch.tensor([[1.0, 0.25, 2.0, 0.5]]))  # rho = [1, 4, 0.5, 2]
    mask = torch.ones(1, 4)
    w, s = lk.rollout_is_weights(old, roll, mask, mode="tis", cap=2.0)
    assert w.tolist() == [[1.0, 2.0, 0.5, 2.0]] and float(s["is/truncated_frac"]) == 0.25
    w, s = lk.rollout_is_weights(old, roll, mask, mode="mis", cap=2.0)
    assert w.tolist() == [[1.0, 0.0, 0.5, 2.0]] and float(s["is/masked_frac"]) == 0.25
    w, s = lk.rollout_is_weights(old, roll, mask, mode="icepop", band=(0.5, 3.0))
    assert w.tolist() == [[1.0, 0.0, 0.5, 2.0]] and float(s["is/masked_frac"]) == 0.25
    assert float(s["is/ratio_mean"]) == 1.875


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode,level", MODES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_and_grad_match_fp64_reference(device, backend, mode, level, loss_type):
    lp, old, roll, ref, adv, mask = _inputs(mismatch=0.15 if level == "sequence" else 0.4)
    x = lp.clone().to(device).requires_grad_(True)
    dev = dict(device=device)
    loss, stats = lk.grpo_loss(
        x, old.to(**dev), adv.to(**dev), mask.to(**dev), ref_logp=ref.to(**dev), beta=0.04, eps_low=0.2,
        eps_high=0.28, loss_type=loss_type, backend=backend, rollout_logp=roll.to(**dev), is_correction=mode,
        is_cap=1.3, is_band=(0.7, 1.4), is_level=level,
    )  # fmt: skip
    (gx,) = torch.autograd.grad(loss, x)
    w = reference.rollout_is_weights(old, roll, mask, mode=mode, cap=1.3, band=(0.7, 1.4), level=level)
    xr = lp.double().requires_grad_(True)
    rl, rs = reference.grpo_loss_rl(
        xr, old, adv, mask, ref_logp=ref, is_weight=w, beta=0.04, eps_low=0.2, eps_high=0.28, loss_type=loss_type
    )
    (gr,) = torch.autograd.grad(rl, xr)
    torch.testing.assert_close(loss.double().cpu(), rl.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx.double().cpu(), gr, atol=1e-7, rtol=1e-5)
    for k, v in rs.items():
        torch.testing.assert_close(stats[k].double().cpu(), v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["none", "tis", "mis", "icepop"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_equal_old_is_bitwise_the_plain_loss(device, backend, mode, loss_type, dtype):
    lp, old, _, ref, adv, mask = _inputs(seed=3)
    lp, old, ref = lp.to(dtype), old.to(dtype), ref.to(dtype)
    kw = dict(ref_logp=ref.to(device), beta=0.04, eps_high=0.28, loss_type=loss_type, backend=backend)
    args = (old.to(device), adv.to(device), mask.to(device))
    x0 = lp.clone().to(device).requires_grad_(True)
    l0, s0 = lk.grpo_loss(x0, *args, **kw)
    (g0,) = torch.autograd.grad(l0, x0)
    x1 = lp.clone().to(device).requires_grad_(True)
    l1, s1 = lk.grpo_loss(x1, *args, **kw, rollout_logp=old.to(device), is_correction=mode)
    (g1,) = torch.autograd.grad(l1, x1)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    for k in s0:
        assert torch.equal(s0[k], s1[k])
    assert float(s1["is/ratio_mean"]) == 1.0
    if mode != "none":
        assert float(s1["is/weight_mean"]) == 1.0


def test_masked_garbage_does_not_leak():
    lp, old, roll, _, adv, mask = _inputs()
    roll = torch.where(mask == 0, float("nan"), roll)
    loss, stats = lk.grpo_loss(lp, old, adv, mask, rollout_logp=roll, is_correction="tis")
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())


def test_bad_arguments():
    lp, old, roll, _, adv, mask = _inputs()
    with pytest.raises(ValueError, match="rollout_logp"):
        lk.grpo_loss(lp, old, adv, mask, is_correction="tis")
    with pytest.raises(ValueError, match="is_correction"):
        lk.grpo_loss(lp, old, adv, mask, rollout_logp=roll, is_correction="ppo")
    with pytest.raises(ValueError, match="icepop"):
        lk.grpo_loss(lp, old, adv, mask, rollout_logp=roll, is_correction="icepop", is_level="sequence")
    with pytest.raises(ValueError, match="is_cap"):
        lk.grpo_loss(lp, old, adv, mask, rollout_logp=roll, is_correction="tis", is_cap=0.0)
    with pytest.raises(ValueError, match="is_band"):
        lk.grpo_loss(lp, old, adv, mask, rollout_logp=roll, is_correction="icepop", is_band=(2.0, 1.0))
    with pytest.raises(ValueError, match="rollout_logp"):
        lk.grpo_loss(lp, old, adv, mask, rollout_logp=roll[:, :3], is_correction="tis")
