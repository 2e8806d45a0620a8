"""The RL features of issue 14 in the fused LM-head ops: the sampler's truncation (top-k / top-p / min-p),
rollout-mismatch correction, GSPO's sequence-level ratio and batch invariance, against fp64 references written
from the definitions (``reference.kept_mask``, ``token_logprobs_truncated``, ``rollout_is_weights``,
``grpo_loss_rl``), on every backend."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference
from lacot_kernels.ops import _lm_head

from .helpers import GPU_MARKED_BACKENDS

SETTINGS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=20, top_p=0.9, min_p=0.02), dict(top_k=1)]
TEMP = 0.7


def _problem(N, D, V, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.6).to(dtype)
    return h.to(device), w.to(device)


def _sampled_targets(h, w, keep, seed=1):
    """One target per row drawn from the truncated distribution (what a sampler with these settings emits)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.where(keep, (h.double() @ w.double().T).cpu() / TEMP, float("-inf"))
    return torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1).to(h.device)


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_truncated_logprobs_match_fp64(device, backend, settings, dtype):
    N, D, V = 29, 32, 301
    h, w = _problem(N, D, V, dtype, device=device)
    x64 = h.double() @ w.double().T
    keep = reference.kept_mask(x64.cpu(), temperature=TEMP, **settings).to(device)
    y = _sampled_targets(h, w, keep)
    y[3] = (~keep[3]).nonzero()[0, 0] if not keep[3].all() else y[3]  # one target outside the kept set
    y[7] = -100
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = lk.fused_linear_token_logprobs(
        hh, ww, y, temperature=TEMP, return_entropy=True, backend=backend, **settings
    )
    hr, wr = h.double().requires_grad_(True), w.double().requires_grad_(True)
    rl, re = reference.token_logprobs_truncated(hr @ wr.T, y, keep, temperature=TEMP)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lp), fin)  # -inf exactly where the target was not kept
    assert (lp[~fin] == float("-inf")).all()
    assert lp[7] == 0 and ent[7] == 0
    tol = 2e-5 if dtype == torch.float32 else 2e-4  # inputs identical (rounded once); fp32 accumulation error only
    torch.testing.assert_close(lp[fin].double(), rl[fin].detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), re.detach(), atol=tol, rtol=tol)
    g_lp = torch.linspace(-1, 1, N, device=device)
    loss = (torch.where(fin, lp, 0.0) * g_lp).sum() + ent.sum()
    loss.backward()
    (torch.where(fin, rl, 0.0) * g_lp.double()).sum().add(re.sum()).backward()
    # Gradients in the input dtype: bf16 rounding of dlogits and of the result.
    gtol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(hh.grad.double(), hr.grad, atol=gtol, rtol=gtol)
    torch.testing.assert_close(ww.grad.double(), wr.grad, atol=gtol, rtol=gtol)


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
def test_top_k_1_at_the_argmax_is_certain_whatever_the_chunking(device, backend, monkeypatch):
    # The boundary token: with top_k=1 the kept set is the argmax alone, so logp = 0, entropy = 0 and every
    # gradient is exactly 0, provided forward and backward see bitwise the same logits (same row chunks).
    h, w = _problem(40, 24, 257, torch.float32, seed=3, device=device)
    y = (h @ w.T).argmax(-1)
    for mb in ("0.02", "64"):  # 0.02 MiB: 2 rows per chunk; 64 MiB: one chunk
        monkeypatch.setenv(_lm_head.WORKSPACE_ENV, mb)
        hh = h.clone().requires_grad_(True)
        lp, ent = lk.fused_linear_token_logprobs(hh, w, y, top_k=1, return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()
        assert (lp == 0).all() and (ent == 0).all()
        assert (hh.grad == 0).all()


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
def test_fused_without_sampler_arguments_is_the_plain_op_bitwise(device, backend):
    h, w = _problem(21, 16, 97, torch.bfloat16, device=device)
    y = torch.randint(0, 97, (21,), device=device)
    a = lk.fused_linear_token_logprobs(h, w, y, return_entropy=True, backend=backend)
    b = lk.fused_linear_token_logprobs(
        h, w, y, return_entropy=True, backend=backend, top_k=None, top_p=None, min_p=None, deterministic=False
    )
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def _fused_row(h, w, y, row, backend, **kw):
    hh = h.clone().requires_grad_(True)
    lp, ent = lk.fused_linear_token_logprobs(hh, w, y, return_entropy=True, backend=backend, **kw)
    (gh,) = torch.autograd.grad((lp.clamp(min=-1e30) * 0.7).sum() + ent.sum(), hh)
    return lp[row], ent[row], gh[row]


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trunc", [{}, dict(top_p=0.9), dict(top_k=30, min_p=0.01)])
def test_fused_rows_are_batch_invariant(device, backend, dtype, trunc, monkeypatch):
    D, V = 48, 523
    h0, w = _problem(1, D, V, dtype, seed=5, device=device)
    y0 = (h0.float() @ w.float().T).argmax(-1)  # a kept target
    g = torch.Generator().manual_seed(9)
    results = []
    for mb in ("0.05", "128"):  # the workspace size must not matter in this mode
        monkeypatch.setenv(_lm_head.WORKSPACE_ENV, mb)
        for n, pos in ((1, 0), (3, 2), (70, 66), (130, 5)):  # row counts around the 64-row chunk
            h = torch.randn(n, D, generator=g).to(dtype).to(device)
            y = torch.randint(0, V, (n,), generator=g).to(device)
            y[torch.arange(n, device=device) % 4 == 1] = -100  # ignored rows change which rows share a chunk
            h[pos], y[pos] = h0[0], y0[0]
            results.append(_fused_row(h, w, y, pos, backend, deterministic=True, **trunc))
    first = results[0]
    for r in results[1:]:
        for a, b in zip(first, r, strict=True):
            assert torch.equal(a, b), (a - b).abs().max()


# ---- fused GRPO: rollout correction, sequence-level ratios, truncation (two exact passes) -------------------------
def _grpo_problem(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(11)
    B, T, D, V = 4, 9, 16, 131
    h = torch.randn(B, T, D, generator=g).to(dtype).to(device)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype).to(device)
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).float().to(device)
    mask[2] = 0  # a fully masked row
    with torch.no_grad():
        lp = lk.fused_linear_token_logprobs(h, w, torch.where(mask != 0, y, -100), temperature=0.8)
    old = (lp + 0.05 * torch.randn(B, T, generator=g).to(device)) * mask
    roll = old + 0.4 * torch.randn(B, T, generator=g).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return h, w, y, mask, old, roll, adv


GRPO_CASES = [
    dict(ratio_level="sequence", eps_low=3e-2, eps_high=4e-2),
    dict(is_correction="tis", is_cap=1.5),
    dict(is_correction="mis", is_cap=1.5),
    dict(is_correction="icepop", is_band=(0.7, 1.4)),
    dict(is_correction="tis", is_level="sequence", is_cap=1.2, ratio_level="sequence"),
    dict(deterministic=True),
]


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
@pytest.mark.parametrize("case", GRPO_CASES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_fused_grpo_rl_matches_fp64(device, backend, case, loss_type):
    h, w, y, mask, old, roll, adv = _grpo_problem(device=device)
    kw = dict(case)
    is_kw = {}
    if "is_correction" in kw:
        kw["rollout_logp"] = roll
        mode = kw["is_correction"]
        is_kw = dict(mode=mode, cap=kw.get("is_cap", 2.0), band=kw.get("is_band", (0.5, 5.0)))
        is_kw["level"] = kw.get("is_level", "token")
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, stats = lk.fused_linear_grpo_loss(
        hh, ww, y, old, adv, mask, temperature=0.8, loss_type=loss_type, backend=backend, **kw
    )
    loss.backward()
    hr, wr = h.double().requires_grad_(True), w.double().requires_grad_(True)
    lp, _ = reference.fused_linear_token_logprobs(hr, wr, torch.where(mask != 0, y, -100), temperature=0.8)
    isw = reference.rollout_is_weights(old, roll, mask, **is_kw) if is_kw else None
    ref_loss, ref_stats = reference.grpo_loss_rl(
        lp, old, adv, mask, is_weight=isw, ratio_level=kw.get("ratio_level", "token"), loss_type=loss_type,
        eps_low=kw.get("eps_low", 0.2), eps_high=kw.get("eps_high"),
    )  # fmt: skip
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), atol=1e-6, rtol=1e-5)
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean"):
        torch.testing.assert_close(stats[k].double(), ref_stats[k].double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hh.grad.double(), hr.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ww.grad.double(), wr.grad, atol=1e-6, rtol=1e-4)
    if is_kw:
        assert "is/weight_mean" in stats


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
def test_fused_grpo_with_rollout_equal_old_is_todays_loss(device, backend):
    h, w, y, mask, old, _, adv = _grpo_problem(device=device)
    base, base_stats = lk.fused_linear_grpo_loss(h, w, y, old, adv, mask, temperature=0.8, backend=backend)
    for mode in ("none", "tis", "mis", "icepop"):
        loss, stats = lk.fused_linear_grpo_loss(
            h, w, y, old, adv, mask, temperature=0.8, backend=backend, rollout_logp=old, is_correction=mode
        )
        # Two passes (log-probs, then the loss) vs the one-pass tile kernels: the same sums in another order.
        torch.testing.assert_close(loss, base, atol=1e-7, rtol=1e-6)
        assert float(stats["is/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
def test_fused_grpo_truncated_matches_logits_level(device, backend):
    # Truncation in the fused loss = token_logprobs(top_p=...) on the materialized logits, then grpo_loss.
    h, w, y, mask, old, _, adv = _grpo_problem(device=device)
    keep = reference.kept_mask((h.double() @ w.double().T).cpu(), temperature=0.8, top_p=0.9).to(device)
    g = torch.Generator().manual_seed(2)
    z = torch.where(keep, (h.double() @ w.double().T).cpu() / 0.8, float("-inf"))
    y = torch.multinomial(torch.softmax(z.view(-1, z.shape[-1]), -1), 1, generator=g).view(y.shape).to(device)
    hh = h.clone().requires_grad_(True)
    loss, _ = lk.fused_linear_grpo_loss(hh, w, y, old, adv, mask, temperature=0.8, top_p=0.9, backend=backend)
    loss.backward()
    h2 = h.clone().requires_grad_(True)
    lp = lk.token_logprobs(h2 @ w.T, torch.where(mask != 0, y, -100), temperature=0.8, top_p=0.9, backend=backend)
    loss2, _ = lk.grpo_loss(lp, old, adv, mask, backend=backend)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hh.grad, h2.grad, atol=1e-6, rtol=1e-4)


def test_fused_grpo_rl_bad_arguments():
    h, w, y, mask, old, roll, adv = _grpo_problem()
    with pytest.raises(ValueError, match="top_p"):
        lk.fused_linear_grpo_loss(h, w, y, old, adv, mask, top_p=1.5)
    with pytest.raises(ValueError, match="ratio_level"):
        lk.fused_linear_grpo_loss(h, w, y, old, adv, mask, ratio_level="batch")
    with pytest.raises(ValueError, match="rollout_logp"):
        lk.fused_linear_grpo_loss(h, w, y, old, adv, mask, is_correction="tis")
    bad = y.clone()
    bad[0, 0] = -1
    mask2 = mask.clone()
    mask2[0, 0] = 1
    with pytest.raises(ValueError, match="targets"):
        lk.fused_linear_grpo_loss(h, w, bad, old, adv, mask2, ratio_level="sequence")
