"""The bad-input contract of README.md ("### Bad input"): one test per row, each on every backend of the op.

Also the regression tests of issue 12 (what an independent fuzz run found): fractional-mask GRPO statistics,
exact 0 for equal reward groups, empty tensors with odd strides on the compiled backend, D = 0 in the fused
op, -1 targets at active tokens of the fused GRPO loss, NaN tokens in the Triton GRPO path, tiny temperatures,
negative DPO lengths; and the ones our own fuzz suite found (tests/fuzz): 0 * inf = NaN GRPO loss with beta = 0,
S = 0 in interpolate_rewards, infinite rewards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference as R

NAN, INF = math.nan, math.inf


def _ok(backend: str) -> bool:
    if backend == "cuda":
        return lk.native_available("cpu")
    if backend == "triton":
        return lk.triton_available("cpu")
    return True


def _backends(*names: str):
    return [pytest.param(b, marks=pytest.mark.skipif(not _ok(b), reason=f"{b} backend not available")) for b in names]


ALL = _backends("cuda", "triton", "torch")  # op families with a compiled kernel, Triton and torch
GRPO = _backends("triton", "torch")  # grpo_loss: no compiled kernel (cuda means the auto order)


def _same_nan(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), equal_nan=True, rtol=1e-5, atol=1e-5)


# ---- token_logprobs / fused_linear_token_logprobs -----------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_nonfinite_logits(backend):
    x = torch.randn(6, 7)
    x[0, 2] = NAN  # NaN in an active row -> that row NaN
    x[1, 4] = INF  # +inf -> NaN row (inf - inf)
    x[2, 5] = -INF  # -inf: probability 0, the row stays finite
    x[3, :] = -INF  # all -inf -> NaN
    x[4, 1] = -INF  # the target sits at -inf -> logp = -inf
    x[5, :] = NAN  # ignored row: never read
    t = torch.tensor([0, 0, 0, 0, 1, -100])
    lp, ent = lk.token_logprobs(x, t, return_entropy=True, backend=backend)
    want_lp, want_ent = R.token_logprobs(torch.where(t[:, None] != -100, x, 0.0), t)
    _same_nan(lp, want_lp)
    _same_nan(ent, want_ent)
    assert torch.isnan(lp[:2]).all() and torch.isnan(lp[3]) and lp[4] == -INF and lp[5] == 0 and ent[5] == 0
    xg = x.clone().requires_grad_()
    lk.token_logprobs(xg, t, backend=backend).nan_to_num(0.0).sum().backward()
    assert torch.equal(xg.grad[5], torch.zeros(7)) and torch.isfinite(xg.grad[2]).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("trunc", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2)])
@pytest.mark.parametrize("fused", [False, True])
def test_truncated_log_probs_keep_nan(backend, trunc, fused):
    # The same NaN row as without truncation: a dropped logit is read as -inf only when it is *below* the
    # threshold, so a NaN logit is never silently dropped (it was on the Triton and torch backends).
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 7, generator=g)
    eye = torch.eye(7)
    x = h.clone()
    x[0, 2] = NAN
    x[1, 4] = INF
    t = x.nan_to_num(0.0, 0.0).argmax(-1)  # a kept target in the finite rows
    xg = x.clone().requires_grad_()
    if fused:
        lp, ent = lk.fused_linear_token_logprobs(xg, eye, t, return_entropy=True, backend=backend, **trunc)
    else:
        lp, ent = lk.token_logprobs(xg, t, return_entropy=True, backend=backend, **trunc)
    assert torch.isnan(lp[:2]).all() and torch.isnan(ent[:2]).all()
    assert torch.isfinite(lp[2:]).all() and torch.isfinite(ent[2:]).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isnan(xg.grad[:2]).any(-1).all() and torch.isfinite(xg.grad[2:]).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [7, -5, -1])
def test_token_logprobs_out_of_range_ids(backend, bad):
    with pytest.raises(ValueError, match=rf"targets must be in \[0, 7\).*got {bad} at flat position 1"):
        lk.token_logprobs(torch.randn(3, 7), torch.tensor([0, bad, 2]), backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_empty_inputs_with_odd_strides(backend):
    odd = torch.randn(0, 10)[:, ::2]
    zs = torch.from_numpy(np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(0, 5), strides=(0, 0)))
    none = torch.zeros(0, dtype=torch.long)
    for x in (odd, zs):
        assert lk.token_logprobs(x, none, backend=backend).shape == (0,)
        assert lk.interpolate_rewards(x, torch.zeros(0, 5, dtype=torch.bool), backend=backend).shape == (0, 5)
        assert lk.subtb_loss(x[:, :4], x, x, none, reduction="none", backend=backend).shape == (0,)
        assert lk.fused_linear_token_logprobs(x, torch.randn(3, 5), none, backend=backend).shape == (0,)
    assert lk.group_advantages(torch.randn(0, 4)[:, ::2], 2, backend=backend).shape == (0, 2)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        lk.token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_fused_token_logprobs_zero_hidden_size(backend):
    # D = 0: the logits are the bias (or 0): a defined answer, not a reshape error.
    h = torch.randn(2, 3, 0, requires_grad=True)
    w = torch.randn(5, 0, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    t = torch.tensor([[1, 2, 3], [0, 4, -100]])
    for bias in (None, b):
        lp, ent = lk.fused_linear_token_logprobs(h, w, t, bias=bias, return_entropy=True, backend=backend)
        want_lp, want_ent = R.fused_linear_token_logprobs(h, w, t, bias=bias)
        torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=1e-6, atol=1e-6)
        (lp.sum() + ent.sum()).backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape
    assert torch.isfinite(b.grad).all()


@pytest.mark.parametrize("backend", ALL)
def test_temperature_range(backend):
    x = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, -1.0]])
    t = torch.tensor([1, 2])
    # The smallest accepted temperature (2**-64): log-probs of -(x_max - x_y) / T, finite in fp32, as the reference.
    T = lk._checks.MIN_TEMPERATURE
    lp = lk.token_logprobs(x, t, temperature=T, backend=backend)
    assert lp[0] == 0
    torch.testing.assert_close(lp[1].double(), R.token_logprobs(x, t, temperature=T)[0][1], rtol=1e-6, atol=0)
    # A huge one: the uniform distribution.
    torch.testing.assert_close(
        lk.token_logprobs(x, t, temperature=1e30, backend=backend), torch.full((2,), -math.log(3))
    )
    for bad in (1e-320, 1e-30, lk._checks.MIN_TEMPERATURE / 2):
        with pytest.raises(ValueError, match=r"temperature must be >= 5.42\d*e-20"):
            lk.token_logprobs(x, t, temperature=bad, backend=backend)
        with pytest.raises(ValueError, match=r"temperature must be >= "):
            lk.fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(3, 4), t, temperature=bad, backend=backend)
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (NAN, ValueError), (INF, ValueError), (True, TypeError)):
        with pytest.raises(exc, match="temperature must be"):
            lk.token_logprobs(x, t, temperature=bad, backend=backend)


# ---- grpo_loss / fused_linear_grpo_loss ----------------------------------------------------------------------------
def _grpo_inputs():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    old = lp + torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1]])
    ref = lp - 0.1
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return lp, old, adv, mask, ref


@pytest.mark.parametrize("backend", GRPO)
@pytest.mark.parametrize("where", ["logp", "old", "ref", "adv"])
def test_grpo_nan_at_active_token_is_nan(backend, where):
    # Issue 12: the Triton path dropped such tokens (tl.minimum ignores NaN); now NaN on every backend, as torch.
    lp, old, adv, mask, ref = _grpo_inputs()
    {"logp": lp, "old": old, "ref": ref}.get(where, lp)[0, 0] = NAN if where != "adv" else lp[0, 0]
    if where == "adv":
        adv[0] = NAN
    lp.requires_grad_()
    loss, _ = lk.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.1, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(lp.grad[0, 0])


@pytest.mark.parametrize("backend", GRPO)
def test_grpo_garbage_under_masked_tokens_is_never_read(backend):
    lp, old, adv, mask, ref = _grpo_inputs()
    clean, clean_stats = lk.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.1, backend=backend)
    for t in (lp, old, ref):
        t[0, 2], t[1, 1] = NAN, INF
    lp.requires_grad_()
    loss, stats = lk.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.1, backend=backend)
    assert loss == clean and all(stats[k] == clean_stats[k] for k in stats)
    loss.backward()
    assert lp.grad[0, 2] == 0 and lp.grad[1, 1] == 0


@pytest.mark.parametrize("backend", GRPO)
def test_grpo_nonfinite_mask_is_nan(backend):
    lp, old, adv, mask, ref = _grpo_inputs()
    mask[0, 0] = INF
    loss, stats = lk.grpo_loss(lp, old, adv, mask, ref_logp=ref, backend=backend)
    assert torch.isnan(loss) and all(torch.isnan(v) for v in stats.values())


def _trl_global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    # TRL 1.16 GRPOTrainer._compute_loss, `global_masked_mean` on one process: sum(x * mask) / clamp(sum(mask), 1).
    local_sum, local_count = (x * mask).sum(), mask.sum().float()
    return float(local_sum / local_count.clamp(min=1.0))


@pytest.mark.parametrize("backend", _backends("cuda", "triton", "torch"))
def test_grpo_stats_with_fractional_mask_follow_trl(backend):
    # Issue 12 reported kl = 0.07436 where "the masked mean" sum(kl m) / sum(m) is 0.09915. TRL 1.16 itself
    # divides by clamp(sum(mask), min=1) (global_masked_mean), so 0.07436 *is* TRL's value: kept, and pinned here,
    # identical on every backend and in the fused op.
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[0.5, 0.25]])
    old = torch.tensor([[-1.0, -1.5]])
    ref = torch.tensor([[-0.5, -2.0]])
    adv = torch.tensor([1.0])
    kl_tok = torch.exp(ref - lp) - (ref - lp) - 1
    want_kl = _trl_global_masked_mean(kl_tok, mask)
    assert abs(want_kl - 0.07436) < 1e-4
    r = torch.exp(lp - old)
    want_high = _trl_global_masked_mean(((r > 1.2) & (adv[:, None] > 0)).float(), mask)
    if backend != "cuda":
        _, stats = lk.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04, backend=backend)
        assert abs(float(stats["kl"]) - want_kl) < 1e-6
        assert abs(float(stats["clip_ratio/high_mean"]) - want_high) < 1e-6
    # The fused op: logits whose log-softmax at the targets is exactly lp (two-token vocabulary per position).
    h = torch.eye(2).reshape(1, 2, 2)
    w = torch.log(torch.stack([lp[0].exp(), 1 - lp[0].exp()], 0))  # (V=2, D=2): w[v, d] = logit of v at d
    _, fstats = lk.fused_linear_grpo_loss(
        h, w, torch.zeros(1, 2, dtype=torch.long), old, adv, mask, ref_logp=ref, beta=0.04, backend=backend
    )
    assert abs(float(fstats["kl"]) - want_kl) < 1e-5


@pytest.mark.parametrize("backend", GRPO)
def test_grpo_empty_batches_give_zero(backend):
    for B, T in ((0, 3), (2, 0)):
        lp = torch.zeros(B, T, requires_grad=True)
        for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
            loss, stats = lk.grpo_loss(lp, lp.detach(), torch.zeros(B), torch.ones(B, T), loss_type=lt, backend=backend)
            assert loss == 0 and all(v == 0 for v in stats.values())
    lp, old, adv, mask, ref = _grpo_inputs()
    loss, stats = lk.grpo_loss(lp, old, adv, torch.zeros_like(mask), ref_logp=ref, backend=backend)
    assert loss == 0 and all(v == 0 for v in stats.values())


@pytest.mark.parametrize("backend", GRPO)
@pytest.mark.parametrize("rl", [{}, dict(ratio_level="sequence"), dict(is_correction="tis"), dict(deterministic=True)])
def test_grpo_beta_zero_with_overflowing_kl_is_finite(backend, rl):
    # Found by tests/fuzz: beta = 0 with a KL that overflows fp32 gave 0 * inf = NaN on every backend (and again in
    # the RL variant of the kernels).
    lp = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    roll = lp.detach() if rl.get("is_correction") else None
    loss, stats = lk.grpo_loss(
        lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2), ref_logp=ref, backend=backend, rollout_logp=roll, **rl
    )
    assert torch.isfinite(loss) and stats["kl"] == INF
    loss.backward()
    assert torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("backend", GRPO)
@pytest.mark.parametrize("rl", [{}, dict(ratio_level="sequence"), dict(deterministic=True)])
def test_grpo_kl_term_whose_exponential_alone_overflows(backend, rl):
    # Found by tests/fuzz: e^(ref - logp) = e^91 overflows fp32 while beta e^91 = 1.3e38 fits; the loss and its
    # gradient were inf / NaN. beta e^d is now formed as e^(d + log beta).
    lp = torch.tensor([[-92.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, _ = lk.grpo_loss(
        lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logp=ref, beta=0.04, backend=backend, **rl
    )
    want, _ = R.grpo_loss(lp.detach().double(), lp.detach().double(), torch.zeros(1, dtype=torch.float64),
                          torch.ones(1, 2, dtype=torch.float64), ref_logp=ref.double(), beta=0.04)  # fmt: skip
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    loss.backward()
    assert torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [-1, 5, -100])
def test_fused_grpo_target_out_of_range_at_active_token(backend, bad):
    # Issue 12: -1 at an active token returned a loss; every out-of-range id there raises on CPU.
    h, w = torch.randn(1, 2, 4), torch.randn(5, 4)
    args = (torch.zeros(1, 2), torch.ones(1))
    with pytest.raises(ValueError, match=rf"targets must be in \[0, 5\) at every active token.*got {bad}"):
        lk.fused_linear_grpo_loss(h, w, torch.tensor([[1, bad]]), *args, torch.ones(1, 2), backend=backend)
    # Under a masked token any id is fine (never read).
    loss, _ = lk.fused_linear_grpo_loss(
        h, w, torch.tensor([[1, bad]]), *args, torch.tensor([[1.0, 0.0]]), backend=backend
    )
    assert torch.isfinite(loss)


# ---- group_advantages / interpolate_rewards / subtb_loss -----------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equal_reward_groups_are_exactly_zero(backend, dtype):
    # Issue 12: the torch backend gave 2.98e-4 (0.935 with eps=0) on a group of equal rewards; the others could
    # too, for other values and sizes (the rounded mean is now kept in [min, max] of the group).
    g = torch.Generator().manual_seed(0)
    vals = (torch.randn(40, generator=g, dtype=torch.float64) * torch.logspace(-5, 4, 40, dtype=torch.float64)).to(
        dtype
    )
    for n in (2, 3, 7, 13, 33):
        r = vals[:, None].expand(40, n).contiguous()
        for scale in ("group", "batch", "none"):
            for eps in (0.0, 1e-4):
                a = lk.group_advantages(r.reshape(-1), n, scale=scale, eps=eps, backend=backend)
                assert torch.equal(a, torch.zeros_like(a)), (n, scale, eps)
    r = torch.full((7,), 0.1, dtype=dtype)
    assert torch.equal(lk.group_advantages(r, 7, eps=0.0, backend=backend), torch.zeros(7, dtype=a.dtype))


@pytest.mark.parametrize("backend", ALL)
def test_group_advantages_nonfinite_rewards(backend):
    r = torch.tensor([1.0, NAN, 0.0, 2.0, 1.0, INF, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    for scale in ("group", "none"):
        a = lk.group_advantages(r, 4, scale=scale, backend=backend)
        assert a[1] == 0 and torch.isfinite(a[:4]).all()  # NaN: a missing reward, advantage 0
        assert torch.isnan(a[4:8]).all()  # an infinite reward: NaN for its group
        _same_nan(a[8:], R.group_advantages(r[8:], 4, scale=scale))
    assert torch.isnan(lk.group_advantages(r, 4, scale="batch", backend=backend)).all()
    _same_nan(lk.group_advantages(r, 4, backend=backend), R.group_advantages(r, 4))
    assert lk.group_advantages(torch.zeros(0), 3, backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", ALL)
def test_interpolate_rewards_nonfinite_and_empty(backend):
    v = torch.tensor([[1.0, NAN, INF, 3.0, NAN], [NAN, 2.0, -INF, 4.0, 6.0]])
    m = torch.tensor([[True, False, False, True, False], [False, True, False, True, False]])
    out = lk.interpolate_rewards(v, m, backend=backend)  # non-anchor values are never read
    torch.testing.assert_close(out, torch.tensor([[1.0, 5 / 3, 7 / 3, 3.0, 0.0], [0.0, 2.0, 3.0, 4.0, 0.0]]))
    v[0, 3] = NAN  # a NaN anchor: NaN on the segments it closes, nowhere else
    out = lk.interpolate_rewards(v, m, backend=backend)
    assert out[0, 0] == 1 and torch.isnan(out[0, 1:4]).all() and out[0, 4] == 0 and torch.isfinite(out[1]).all()
    for shape in ((0, 5), (3, 0), (0, 0)):
        x = torch.zeros(shape)
        assert lk.interpolate_rewards(x, x.bool(), backend=backend).shape == shape


@pytest.mark.parametrize("backend", ALL)
def test_subtb_lengths_and_garbage_past_them(backend):
    B, T = 2, 5
    pf, lt, lr = torch.randn(B, T), torch.randn(B, T + 1), torch.randn(B, T + 1)
    n = torch.tensor([3, 5])
    clean = lk.subtb_loss(pf, lt, lr, n, reduction="none", backend=backend)
    pf[0, 3:], lt[0, 4:], lr[0, 4:] = NAN, INF, NAN  # past row 0's length: never read
    torch.testing.assert_close(lk.subtb_loss(pf, lt, lr, n, reduction="none", backend=backend), clean)
    for bad in (-1, T + 1):
        with pytest.raises(ValueError, match=r"lengths"):
            lk.subtb_loss(pf, lt, lr, torch.tensor([bad, 1]), backend=backend)
    assert (
        lk.subtb_loss(
            torch.zeros(0, T),
            torch.zeros(0, T + 1),
            torch.zeros(0, T + 1),
            torch.zeros(0, dtype=torch.long),
            backend=backend,
        )
        == 0
    )
    assert (
        lk.subtb_loss(
            torch.zeros(1, 0), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), backend=backend
        )
        == 0
    )


# ---- composites (pure torch; one backend) -------------------------------------------------------------------------
def test_dpo_loss_lengths_nonfinite_and_empty():
    x = [torch.randn(3) for _ in range(4)]
    ok = torch.tensor([3, 0, 5])
    for bad in (torch.tensor([3, -1, 5]), torch.tensor([3.0, NAN, 5.0]), torch.tensor([3.0, -INF, 5.0])):
        with pytest.raises(ValueError, match=r"chosen_lengths must be >= 0 \(a completion length\), got"):
            lk.dpo_loss(*x, loss_type="ipo", chosen_lengths=bad, rejected_lengths=ok)
        with pytest.raises(ValueError, match=r"rejected_lengths must be >= 0"):
            lk.dpo_loss(*x, loss_type="ipo", chosen_lengths=ok, rejected_lengths=bad)
    x[0][1] = NAN
    assert torch.isnan(lk.dpo_loss(*x)[0])
    e = torch.zeros(0)
    assert lk.dpo_loss(e, e, e, e)[0] == 0


def test_sequence_logprobs_and_bin_rank_nonfinite():
    lp = torch.tensor([[-1.0, NAN, -INF], [NAN, -2.0, -3.0]])
    m = torch.tensor([[True, False, False], [False, True, True]])
    torch.testing.assert_close(lk.sequence_logprobs(lp, m), torch.tensor([-1.0, -5.0]))
    m[0, 1] = True
    assert torch.isnan(lk.sequence_logprobs(lp, m)[0])
    s = torch.tensor([[[NAN, 0.0], [-1.0, -2.0], [-INF, -INF]]])
    best, marg = lk.bin_rank(s)
    assert int(best[0]) == 1 and torch.isnan(marg[0, 0]) and marg[0, 2] == -INF
    best, _ = lk.bin_rank(s, valid=torch.tensor([[True, False, True]]))
    assert int(best[0]) == 2  # -inf is a valid (worst) score; NaN never wins
    best, _ = lk.bin_rank(s, valid=torch.tensor([[False, False, False]]))
    assert int(best[0]) == -1


def test_reward_anchors_out_of_range_lengths():
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=r"lengths must be in \[0, max_len\] = \[0, 8\]"):
            lk.reward_anchors(torch.tensor([3, bad]), 2, max_len=8)
    assert lk.reward_anchors(torch.zeros(0, dtype=torch.long), 2, max_len=8).shape == (0, 9)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda v: lk.grpo_loss(*_grpo_inputs()[:4], beta=v), "beta"),
        (lambda v: lk.grpo_loss(*_grpo_inputs()[:4], eps_low=v), "eps_low"),
        (lambda v: lk.group_advantages(torch.randn(4), 2, eps=v), "eps"),
        (
            lambda v: lk.subtb_loss(
                torch.randn(1, 2), torch.randn(1, 3), torch.randn(1, 3), torch.tensor([2]), decay=v
            ),
            "decay",
        ),
        (lambda v: lk.dpo_loss(*[torch.randn(2)] * 4, beta=v), "beta"),
        (lambda v: lk.dpo_loss(*[torch.randn(2)] * 4, label_smoothing=v), "label_smoothing"),
        (lambda v: lk.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), temperature=v), "temperature"),
    ],
)
def test_float_options_one_check(call, name):
    # One helper (_checks.check_float) for every Python-float option: the same errors everywhere.
    for bad in (NAN, INF, -INF):
        with pytest.raises(ValueError, match=rf"{name} must be finite.*got {bad}"):
            call(bad)
    for bad in (torch.tensor(0.1), "0.1", True, None):
        with pytest.raises(TypeError, match=rf"{name} must be a Python float, got {type(bad).__name__}"):
            call(bad)


@pytest.mark.parametrize("backend", ALL)
def test_fused_backward_at_tiny_temperature_is_finite(backend):
    # Found by tests/fuzz: the Triton backward recomputes the logits with another GEMM than its forward, so a
    # logit could exceed the saved max by a rounding; times 1/T = 1e12 that gave exp(+large) = inf gradients.
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 17, generator=g) * 0.03).requires_grad_()
    w = torch.randn(57, 17, generator=g) * 0.007
    t = torch.tensor([0, 27, 42])
    lp = lk.fused_linear_token_logprobs(h, w, t, temperature=1e-12, backend=backend)
    (lp * torch.tensor([-0.08, 0.55, -0.89])).sum().backward()
    # (At T = 1e-12 the fp32 logits' rounding decides the softmax: the values are checked by the fuzz suite's
    # error model; here only that no overflow appears.)
    assert torch.isfinite(lp).all() and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("rl", [{}, dict(ratio_level="sequence"), dict(is_correction="mis"), dict(deterministic=True)])
def test_grpo_overflowing_ratio_with_zero_advantage_is_nan_on_every_backend(rl):
    # Found by tests/fuzz (grpo_loss_rl): ratio e^200 = inf times a zero advantage is inf * 0 = NaN in torch; the
    # Triton RL kernels' min/max dropped the NaN (finite loss). Every backend now gives torch's NaN.
    lp = torch.tensor([[-1.0, -2.0]])
    old = lp - 200.0  # every ratio (and the sequence mean) e^200 = inf
    roll = old if rl.get("is_correction") else None
    got = {}
    for backend in [p.values[0] for p in GRPO if _ok(p.values[0])]:
        loss, _ = lk.grpo_loss(lp, old, torch.tensor([0.0]), torch.ones(1, 2), backend=backend, rollout_logp=roll, **rl)
        got[backend] = loss
    assert all(torch.isnan(v) for v in got.values()), got
