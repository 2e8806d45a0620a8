"""dpo_loss and sequence_logprobs: research vectors (dpo_grpo.md §5.1, §5.2), the fp64 reference, Liger's
chunked fused-linear DPO loss, gradients, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from .helpers import ALL_BACKENDS

NAN = float("nan")


# ----------------------------------------------------------------------------------------------------------------
# dpo_grpo.md §5.1: DPO from sequence log-prob sums (beta = 0.1)
# ----------------------------------------------------------------------------------------------------------------
def _seq_vec(dtype=torch.float32):
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    return t([-10.0, -8.0]), t([-12.0, -7.0]), t([-11.0, -8.5]), t([-11.5, -7.5])


@pytest.mark.parametrize(
    "loss_type,eps,per_pair,mean",
    [
        ("sigmoid", 0.0, [0.620957, 0.693147], 0.657052),
        ("sigmoid", 0.1, [0.635957, 0.693147], 0.664552),  # cDPO (old TRL / LLaVA-Reasoner's vendored trainer)
        ("robust", 0.1, [0.602207, 0.693147], 0.647677),
        ("hinge", 0.0, [0.85, 1.0], 0.925),
    ],
)
def test_vector_5_1(loss_type, eps, per_pair, mean):
    pc, pr, rc, rr = _seq_vec()
    loss, cr, rj = lk.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(mean, abs=1e-6)
    # per-pair values: each pair alone is a batch of one.
    for i, v in enumerate(per_pair):
        sl = slice(i, i + 1)
        one = lk.dpo_loss(pc[sl], pr[sl], rc[sl], rr[sl], beta=0.1, loss_type=loss_type, label_smoothing=eps)[0]
        assert one.item() == pytest.approx(v, abs=1e-6)
    torch.testing.assert_close(cr, torch.tensor([0.1, 0.05]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rj, torch.tensor([-0.05, 0.05]), atol=1e-6, rtol=0)
    assert (cr > rj).float().mean().item() == 0.5  # rewards/accuracies: a tie counts as wrong
    assert (cr - rj).mean().item() == pytest.approx(0.075, abs=1e-7)
    assert not cr.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# dpo_grpo.md §5.2: DPO from per-token log-probs with masks (sum vs mean), padding contributes 0
# ----------------------------------------------------------------------------------------------------------------
def _token_vec(device):
    def rows(a, b):
        x = torch.full((2, 4), NAN)  # padding holds NaN: it must not leak anywhere
        x[0, : len(a)] = torch.tensor(a)
        x[1, : len(b)] = torch.tensor(b)
        m = torch.zeros(2, 4, dtype=torch.bool)
        m[0, : len(a)] = True
        m[1, : len(b)] = True
        return x.to(device), m.to(device)

    pc, mc = rows([-0.5, -1.0, -1.5], [-0.2, -0.3])
    rc, _ = rows([-0.6, -1.1, -1.4], [-0.25, -0.45])
    pr, mr = rows([-2.0, -1.0], [-0.4, -0.9, -1.2, -0.7])
    rr, _ = rows([-1.8, -0.9], [-0.5, -0.8, -1.0, -0.4])
    return pc, pr, rc, rr, mc, mr


@pytest.mark.parametrize("device", sorted({d for d, _ in ALL_BACKENDS}))
def test_vector_5_2(device):
    pc, pr, rc, rr, mc, mr = _token_vec(device)
    pc = pc.requires_grad_(True)
    pr = pr.requires_grad_(True)
    s = {k: lk.sequence_logprobs(v, m) for k, v, m in (("pc", pc, mc), ("pr", pr, mr), ("rc", rc, mc), ("rr", rr, mr))}
    for k, want in (("pc", [-3.0, -0.5]), ("pr", [-3.0, -3.2]), ("rc", [-3.1, -0.7]), ("rr", [-2.7, -2.7])):
        torch.testing.assert_close(s[k].detach().cpu(), torch.tensor(want), atol=1e-6, rtol=0)

    loss, cr, rj = lk.dpo_loss(s["pc"], s["pr"], s["rc"], s["rr"], beta=0.1)
    assert loss.item() == pytest.approx(0.666053, abs=1e-6)
    torch.testing.assert_close(cr.cpu(), torch.tensor([0.01, 0.02]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rj.cpu(), torch.tensor([-0.03, -0.05]), atol=1e-6, rtol=0)
    assert (cr > rj).float().mean().item() == 1.0
    assert (cr - rj).mean().item() == pytest.approx(0.055, abs=1e-7)
    # d(mean sigmoid loss)/dDelta_i = -beta s(-beta Delta_i) / 2, reaching every unmasked token of pc (and - for pr).
    gpc, gpr = torch.autograd.grad(loss, (pc, pr))
    dd = torch.tensor([-0.0245, -0.024125])
    torch.testing.assert_close(gpc.cpu(), torch.where(mc.cpu(), dd[:, None], 0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(gpr.cpu(), torch.where(mr.cpu(), -dd[:, None], 0.0), atol=1e-6, rtol=0)

    # IPO: length-normalized log-ratios, from summed log-probs + lengths (current TRL) ...
    lengths_c, lengths_r = mc.sum(-1), mr.sum(-1)
    ipo, cr2, _ = lk.dpo_loss(
        s["pc"],
        s["pr"],
        s["rc"],
        s["rr"],
        beta=0.1,
        loss_type="ipo",
        chosen_lengths=lengths_c,
        rejected_lengths=lengths_r,
    )
    assert ipo.item() == pytest.approx(23.000451, abs=1e-5)
    torch.testing.assert_close(cr2, cr)  # rewards stay unnormalized for ipo
    # ... or from per-token means (old TRL's average_log_prob): the same number.
    mean = {
        k: lk.sequence_logprobs(v, m, normalize=True)
        for k, v, m in (("pc", pc, mc), ("pr", pr, mr), ("rc", rc, mc), ("rr", rr, mr))
    }
    ipo2 = lk.dpo_loss(mean["pc"], mean["pr"], mean["rc"], mean["rr"], beta=0.1, loss_type="ipo")[0]
    assert ipo2.item() == pytest.approx(23.000451, abs=1e-5)
    for i, v in enumerate([23.200278, 22.800625]):
        sl = slice(i, i + 1)
        one = lk.dpo_loss(mean["pc"][sl], mean["pr"][sl], mean["rc"][sl], mean["rr"][sl], beta=0.1, loss_type="ipo")[0]
        assert one.item() == pytest.approx(v, abs=1e-5)


def test_sequence_logprobs_edges():
    x = torch.tensor([[-1.0, -2.0, NAN], [NAN, -float("inf"), 0.5], [-3.0, -1.0, -2.0]], requires_grad=True)
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    s = lk.sequence_logprobs(x, m)
    a = lk.sequence_logprobs(x, m, normalize=True)
    torch.testing.assert_close(s.detach(), torch.tensor([-3.0, 0.0, -6.0]))
    torch.testing.assert_close(a.detach(), torch.tensor([-1.5, 0.0, -2.0]))  # an empty row gives 0, not NaN
    (g,) = torch.autograd.grad(a.sum() + s.sum(), x)
    want = torch.tensor([[1.5, 1.5, 0.0], [0.0, 0.0, 0.0], [4 / 3, 4 / 3, 4 / 3]])
    torch.testing.assert_close(g, want)
    # fractional weights, leading dims, bf16 in -> fp32 out
    w = torch.tensor([[0.5, 0.25, 0.0]]).expand(2, 3)[None]
    y = torch.tensor([[[-2.0, -4.0, -8.0]]]).expand(1, 2, 3).bfloat16()
    out = lk.sequence_logprobs(y, w, normalize=True)
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    torch.testing.assert_close(out, torch.full((1, 2), (-1.0 - 1.0) / 0.75))


def test_matches_fp64_reference_random():
    g = torch.Generator().manual_seed(0)
    B, T = 7, 11
    tok = -torch.rand(4, B, T, generator=g) * 2
    mask = torch.rand(4, B, T, generator=g) > 0.3
    lens = mask.sum(-1)
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("robust", 0.3), ("ipo", 0.0)):
        for beta in (0.05, 0.5):
            seq = [lk.sequence_logprobs(tok[i], mask[i]) for i in range(4)]
            kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
            if loss_type == "ipo":
                kw.update(chosen_lengths=lens[0], rejected_lengths=lens[1])
            x = seq[0].clone().requires_grad_(True)
            loss, cr, rj = lk.dpo_loss(x, seq[1], seq[2], seq[3], **kw)
            (gx,) = torch.autograd.grad(loss, x)
            seq64 = [reference.sequence_logprobs(tok[i], mask[i]) for i in range(4)]
            x64 = seq64[0].clone().requires_grad_(True)
            rloss, rcr, rrj = reference.dpo_loss(x64, seq64[1], seq64[2], seq64[3], **kw)
            (rg,) = torch.autograd.grad(rloss, x64)
            assert abs(loss.item() - rloss.item()) < 1e-6 * max(1.0, abs(rloss.item())), (loss_type, beta)
            torch.testing.assert_close(gx.double(), rg, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(cr.double(), rcr, atol=1e-6, rtol=0)
            torch.testing.assert_close(rj.double(), rrj, atol=1e-6, rtol=0)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    lens = torch.tensor([3, 1, 4, 2, 5])
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("robust", 0.2), ("ipo", 0.0)):
        kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps)
        if loss_type == "ipo":
            kw.update(chosen_lengths=lens, rejected_lengths=lens.flip(0))
        inputs = tuple(a.clone().requires_grad_(True) for a in args)
        assert torch.autograd.gradcheck(lambda *a, kw=kw: lk.dpo_loss(*a, **kw)[0], inputs)
    tok = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6, [1] * 6])
    for norm in (False, True):
        assert torch.autograd.gradcheck(lambda t, n=norm: lk.sequence_logprobs(t, mask, normalize=n), (tok,))


def test_empty_batch():
    e = torch.zeros(0)
    loss, cr, rj = lk.dpo_loss(e, e, e, e)
    assert loss.item() == 0.0 and cr.shape == (0,) and rj.shape == (0,)


# ----------------------------------------------------------------------------------------------------------------
# Peer: Liger's chunked fused-linear DPO loss (CPU, compiled=False) vs our fused log-probs + sequence sum + dpo_loss
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_equals_liger_fused_linear_dpo(device, backend, loss_type, eps):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    g = torch.Generator().manual_seed(3)
    B, T, D, V = 3, 7, 16, 90
    h = (torch.randn(2 * B, T, D, generator=g) * 0.5).to(device)
    h_ref = (h.cpu() + 0.05 * torch.randn(2 * B, T, D, generator=g)).to(device)
    w = (torch.randn(V, D, generator=g) * 0.3).to(device)
    w_ref = (w.cpu() + 0.02 * torch.randn(V, D, generator=g)).to(device)
    b = (torch.randn(V, generator=g) * 0.1).to(device)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = -100  # prompt positions
    y[1, 5:] = -100  # padding
    y = y.to(device)

    liger = chunked.LigerFusedLinearDPOLoss(
        beta=0.1, compiled=False, use_ref_model=True, loss_type=loss_type, label_smoothing=eps
    )
    hl, wl, bl = (t.clone().requires_grad_(True) for t in (h, w, b))
    loss_l, aux = liger(wl, hl, y, bias=bl, ref_input=h_ref, ref_weight=w_ref, ref_bias=b)
    loss_l.backward()

    ho, wo, bo = (t.clone().requires_grad_(True) for t in (h, w, b))
    lp = lk.fused_linear_token_logprobs(ho, wo, y, bias=bo, backend=backend)
    seq = lk.sequence_logprobs(lp, y != -100)
    with torch.no_grad():
        ref_seq = lk.sequence_logprobs(
            lk.fused_linear_token_logprobs(h_ref, w_ref, y, bias=b, backend=backend), y != -100
        )
    loss_o, cr, rj = lk.dpo_loss(
        seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=0.1, loss_type=loss_type, label_smoothing=eps
    )
    loss_o.backward()

    assert abs(loss_o.item() - loss_l.item()) < 2e-6
    torch.testing.assert_close(cr, aux[-2].detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(rj, aux[-1].detach(), atol=2e-6, rtol=0)
    for ours, theirs in ((ho.grad, hl.grad), (wo.grad, wl.grad), (bo.grad, bl.grad)):
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_compile_fullgraph():
    torch._dynamo.reset()
    tok = torch.randn(4, 6, requires_grad=True)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3

    def step(tok):
        s = lk.sequence_logprobs(tok, mask)
        a = lk.sequence_logprobs(tok, mask, normalize=True)
        l1, cr, rj = lk.dpo_loss(
            s[:2], s[2:], s[:2].detach() - 1, s[2:].detach(), loss_type="robust", label_smoothing=0.1
        )
        l2, _, _ = lk.dpo_loss(a[:2], a[2:], a[2:].detach(), a[:2].detach(), loss_type="ipo")
        return l1 + l2 + (cr - rj).mean()

    explanation = torch._dynamo.explain(step)(tok)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(step, fullgraph=True)(tok)
    (g,) = torch.autograd.grad(out, tok)
    want = step(tok)
    (wg,) = torch.autograd.grad(want, tok)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, wg)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
_S = torch.zeros(3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(loss_type="kto"),
            ValueError,
            r"loss_type must be one of \('sigmoid', 'hinge', 'ipo', 'robust'\), got 'kto'",
        ),
        (dict(pr=torch.zeros(4)), ValueError, r"policy_rejected_logps must have shape \(3,\).*got \(4,\)"),
        (dict(pc=torch.zeros(3, 2)), ValueError, r"policy_chosen_logps must have shape \(B,\).*got \(3, 2\)"),
        (dict(rr=torch.zeros(3, dtype=torch.int64)), TypeError, r"ref_rejected_logps must have dtype"),
        (dict(rc=[0.0, 0.0, 0.0]), TypeError, r"ref_chosen_logps must be a torch.Tensor, got list"),
        (dict(beta=0.0), ValueError, r"beta must be finite and > 0, got 0.0"),
        (dict(beta="0.1"), TypeError, r"beta must be a Python float, got str"),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, r"\[0, 0.5\) for loss_type='robust', got 0.5"),
        (dict(label_smoothing=0.7), ValueError, r"\[0, 0.5\] for loss_type='sigmoid', got 0.7"),
        (dict(loss_type="hinge", label_smoothing=0.1), ValueError, r"label_smoothing is not used by loss_type='hinge'"),
        (dict(loss_type="ipo", chosen_lengths=torch.ones(3)), ValueError, r"must be given together"),
        (
            dict(chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3)),
            ValueError,
            r"apply to loss_type='ipo' only",
        ),
        (
            dict(loss_type="ipo", chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(3)),
            ValueError,
            r"chosen_lengths must have shape \(3,\), got \(2,\)",
        ),
    ],
)
def test_dpo_bad_input(kwargs, exc, match):
    t = {k: kwargs.pop(k, _S) for k in ("pc", "pr", "rc", "rr")}
    with pytest.raises(exc, match=match):
        lk.dpo_loss(t["pc"], t["pr"], t["rc"], t["rr"], **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (
            (torch.zeros(2, 3), torch.ones(2, 4)),
            {},
            ValueError,
            r"mask must have the shape of token_logp \(2, 3\), got \(2, 4\)",
        ),
        ((torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)), {}, TypeError, r"token_logp must have dtype"),
        ((torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.complex64)), {}, TypeError, r"mask must have dtype bool"),
        ((torch.zeros(()), torch.ones(())), {}, ValueError, r"token_logp must have shape \(..., T\), got \(\)"),
        ((torch.zeros(2, 3), torch.ones(2, 3)), dict(normalize=1), TypeError, r"normalize must be a bool, got int"),
    ],
)
def test_sequence_logprobs_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.sequence_logprobs(*args, **kwargs)
