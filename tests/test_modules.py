"""The nn.Module surfaces against their Liger-Kernel counterparts (same call, same numbers) and against the
functional ops they wrap: FusedLinearTokenLogprobs vs LigerFusedLinearCrossEntropyLoss(reduction="none") and the
fp64 reference, FusedLinearGRPOLoss vs LigerFusedLinearGRPOLoss, FusedLinearDPOLoss vs LigerFusedLinearDPOLoss
(losses, sequence log-probs and gradients of the input and the head, fp32)."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

B, T, D, V = 3, 7, 24, 67


def _head(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, D, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets, g


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_token_logprobs_module_equals_function_and_fp64():
    hidden, weight, targets, _ = _head()
    targets[0, :2] = -100
    bias = torch.randn(V, requires_grad=True)
    mod = lk.FusedLinearTokenLogprobs(temperature=0.7, return_entropy=True)
    lp, ent = mod(weight, hidden, targets, bias)
    ref_lp, ref_ent = reference.token_logprobs(
        hidden.double() @ weight.double().T + bias.double(), targets, temperature=0.7
    )
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    fn_lp, fn_ent = lk.fused_linear_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.7, return_entropy=True
    )
    assert torch.equal(lp, fn_lp) and torch.equal(ent, fn_ent)
    g_mod = _grads(lp.sum() + ent.sum(), hidden, weight, bias)
    g_fn = _grads(fn_lp.sum() + fn_ent.sum(), hidden, weight, bias)
    for a, b in zip(g_mod, g_fn, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert "temperature=0.7" in repr(mod)


def test_token_logprobs_module_is_liger_flce_with_reduction_none():
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel not installed")
    hidden, weight, targets, _ = _head(seed=1)
    targets[1, 3:] = -100
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    # Same call: (lin_weight, _input, target). Liger's "none" CE is -logp per token, 0 where ignored.
    ce = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")(w2, h2.view(-1, D), targets.view(-1))
    lp = lk.FusedLinearTokenLogprobs()(weight, hidden.view(-1, D), targets.view(-1))
    torch.testing.assert_close(lp, -ce, atol=1e-5, rtol=0)
    for a, b in zip(_grads(lp.sum(), hidden, weight), _grads(-ce.sum(), h2, w2), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_module_matches_liger(loss_type):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    hidden, weight, targets, g = _head(seed=2)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
        logp = reference.token_logprobs(logits, targets)[0].float()
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # ratios well outside the clip range
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T + 2)
    ours = lk.FusedLinearGRPOLoss(**kw)
    theirs = chunked.LigerFusedLinearGRPOLoss(**kw, compiled=False, use_ref_model=True)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, stats = ours(hidden, weight, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    out = theirs(h2, w2, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    torch.testing.assert_close(loss, out[0], atol=2e-6, rtol=1e-5)
    for a, b in zip(_grads(loss, hidden, weight), _grads(out[0], h2, w2), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    assert set(stats) >= {"kl"}


def test_grpo_module_on_policy_and_ref_from_input():
    # old_per_token_logps=None: on-policy (ratio 1); ref_input/ref_weight: reference log-probs computed inside.
    hidden, weight, targets, g = _head(seed=3)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    adv = torch.randn(B, generator=g)
    ref_w = weight.detach() + 0.05 * torch.randn(V, D, generator=g)
    mod = lk.FusedLinearGRPOLoss(beta=0.1, loss_type="grpo")
    loss, _ = mod(hidden, weight, targets, mask, adv, ref_input=hidden.detach(), ref_weight=ref_w)
    with torch.no_grad():
        masked = torch.where(mask.bool(), targets, -100)
        old = lk.fused_linear_token_logprobs(hidden, weight, masked)
        ref = lk.fused_linear_token_logprobs(hidden, ref_w, masked)
    expect, _ = lk.fused_linear_grpo_loss(
        hidden, weight, targets, old, adv, mask, ref_logp=ref, beta=0.1, loss_type="grpo"
    )
    torch.testing.assert_close(loss, expect, atol=1e-7, rtol=0)
    (g_mod,) = _grads(loss, weight)
    (g_fn,) = _grads(expect, weight)
    torch.testing.assert_close(g_mod, g_fn, atol=1e-7, rtol=0)


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_dpo_module_matches_liger(average_log_prob):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(2 * B, T, D, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    target = torch.randint(0, V, (2 * B, T), generator=g)
    target[:, :2] = -100  # prompt positions
    target[4, 5:] = -100
    ref_input = hidden.detach() + 0.1 * torch.randn(2 * B, T, D, generator=g)
    ref_weight = weight.detach() + 0.1 * torch.randn(V, D, generator=g)
    ours = lk.FusedLinearDPOLoss(beta=0.2, average_log_prob=average_log_prob)
    theirs = chunked.LigerFusedLinearDPOLoss(beta=0.2, average_log_prob=average_log_prob, compiled=False)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, (chosen, rejected, cr, rr) = ours(weight, hidden, target, ref_input=ref_input, ref_weight=ref_weight)
    out = theirs(w2, h2, target, ref_input=ref_input, ref_weight=ref_weight)
    torch.testing.assert_close(loss, out[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(chosen, out[1][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, out[1][1], atol=2e-5, rtol=1e-5)
    for a, b in zip(_grads(loss, hidden, weight), _grads(out[0], h2, w2), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    assert not cr.requires_grad and cr.shape == (B,) and rr.shape == (B,)


def test_dpo_module_without_reference_and_errors():
    hidden, weight, target, _ = _head(seed=5)
    hidden = hidden[:2].detach().requires_grad_()
    target = target[:2]
    loss, (c, r, _, _) = lk.FusedLinearDPOLoss(beta=0.5, use_ref_model=False)(weight, hidden, target)
    seq = reference.token_logprobs(hidden.double() @ weight.double().T, target)[0].sum(-1)
    expect = -torch.nn.functional.logsigmoid(0.5 * (seq[0] - seq[1]))
    torch.testing.assert_close(loss.double(), expect, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"target must have shape \(2B, T\)"):
        lk.FusedLinearDPOLoss()(weight, hidden[:1], target[:1])
    with pytest.raises(ValueError, match="temperature"):
        lk.FusedLinearTokenLogprobs(temperature=0.0)
