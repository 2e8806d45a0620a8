"""token_logprobs under the sampler's truncation (top-k / top-p / min-p): kept sets, fp64 reference, gradients."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference
from lacot_kernels.ops import sampler_truncation as st

from .helpers import ALL_BACKENDS, bf16_grad_atol

SETTINGS = [
    dict(top_k=5),
    dict(top_p=0.8),
    dict(min_p=0.05),
    dict(top_k=20, top_p=0.9),
    dict(top_k=50, top_p=0.7, min_p=0.02),
    dict(top_p=0.95, min_p=0.1),
    dict(top_k=1),
    dict(top_p=1.0),
]


def _logits(N, V, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("order", ["vllm", "hf"])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_kept_threshold_matches_fp64_definition(order, settings, dtype, temperature):
    x = _logits(16, 301, dtype)
    tau = st.kept_threshold(x, temperature=temperature, order=order, **settings)
    ref = reference.kept_mask(x, temperature=temperature, order=order, **settings)
    got = st.sampler_mask(x, tau)
    assert torch.equal(got, ref)
    assert got.any(-1).all()  # the largest logit is always kept


def test_order_matters_only_through_top_p():
    # A flat tail that min_p removes: vLLM's top-p then sees a renormalized head and keeps fewer tokens.
    # p(5 | head) = 0.881 >= 0.85: vLLM keeps 1 token; over the full row 5 has 0.40, so HF's top-p keeps the head
    # and part of the tail, and min_p (ratio e^-5 < 0.05) then removes the tail: 2 tokens.
    x = torch.cat([torch.tensor([[5.0, 3.0]]), torch.full((1, 200), 0.0)], -1)
    kv = st.sampler_mask(x, st.kept_threshold(x, top_p=0.85, min_p=0.05, order="vllm"))
    kh = st.sampler_mask(x, st.kept_threshold(x, top_p=0.85, min_p=0.05, order="hf"))
    assert int(kv.sum()) == 1 and int(kh.sum()) == 2
    assert torch.equal(kv, reference.kept_mask(x, top_p=0.85, min_p=0.05, order="vllm"))
    assert torch.equal(kh, reference.kept_mask(x, top_p=0.85, min_p=0.05, order="hf"))


def test_ties_at_top_k_are_kept():
    x = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert st.sampler_mask(x, st.kept_threshold(x, top_k=2)).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("settings", SETTINGS)
def test_kept_set_matches_transformers_warpers(settings):
    tr = pytest.importorskip("transformers.generation.logits_process")
    T = 0.8
    x = _logits(8, 257, seed=3)
    scores = tr.TemperatureLogitsWarper(T)(None, x.clone())
    if settings.get("top_k") is not None:
        scores = tr.TopKLogitsWarper(top_k=settings["top_k"])(None, scores)
    if settings.get("top_p") is not None:
        scores = tr.TopPLogitsWarper(top_p=settings["top_p"])(None, scores)
    if settings.get("min_p") is not None:
        scores = tr.MinPLogitsWarper(min_p=settings["min_p"])(None, scores)
    ours = st.sampler_mask(x, st.kept_threshold(x, temperature=T, order="hf", **settings))
    assert torch.equal(ours, torch.isfinite(scores))


def _targets(x, keep, seed=1):
    """Half the rows target a kept token, the others a dropped one when there is one; one ignored row."""
    g = torch.Generator().manual_seed(seed)
    N, V = x.shape
    y = torch.empty(N, dtype=torch.int64)
    for n in range(N):
        pool = keep[n].nonzero().flatten() if n % 2 == 0 or keep[n].all() else (~keep[n]).nonzero().flatten()
        y[n] = pool[torch.randint(0, len(pool), (1,), generator=g)]
    y[3] = -100
    return y


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("settings", [dict(top_k=7), dict(top_p=0.85, min_p=0.01), dict(top_k=40, top_p=0.9)])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_truncated_logprobs_match_fp64_reference(device, backend, dtype, settings, temperature):
    x = _logits(10, 1003, dtype, seed=5).to(device)
    keep = reference.kept_mask(x.cpu(), temperature=temperature, **settings)
    y = _targets(x.cpu(), keep).to(device)
    xg = x.detach().requires_grad_(True)
    lp, ent = lk.token_logprobs(xg, y, temperature=temperature, return_entropy=True, backend=backend, **settings)
    g_lp = torch.randn(10, generator=torch.Generator().manual_seed(2)).to(device)
    g_ent = torch.randn(10, generator=torch.Generator().manual_seed(3)).to(device)
    finite = torch.isfinite(lp)
    (gx,) = torch.autograd.grad((torch.where(finite, lp, 0.0) * g_lp).sum() + (ent * g_ent).sum(), xg)

    xr = x.detach().cpu().double().requires_grad_(True)
    rlp, rent = reference.token_logprobs_truncated(xr, y.cpu(), keep.to(device="cpu"), temperature=temperature)
    # By definition a dropped target's log-prob is the constant -inf: the reference gets no upstream gradient there.
    rfinite = torch.isfinite(rlp)
    (gr,) = torch.autograd.grad(
        (torch.where(rfinite, rlp, 0.0) * g_lp.cpu().double()).sum() + (rent * g_ent.cpu().double()).sum(), xr
    )

    assert torch.equal(finite.cpu(), rfinite)
    assert (~finite[::2][y[::2] != -100]).sum() == 0  # kept targets are finite
    assert bool((lp.cpu()[1::2] == float("-inf")).any())  # some dropped targets
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(
        torch.where(finite, lp, 0.0).cpu().double(), torch.where(rfinite, rlp, 0.0).detach(), atol=tol, rtol=0
    )
    torch.testing.assert_close(ent.cpu().double(), rent.detach(), atol=tol, rtol=0)
    gtol = 1e-5 if dtype == torch.float32 else bf16_grad_atol(gr, dtype)
    torch.testing.assert_close(gx.cpu().double(), gr, atol=gtol, rtol=0)
    # Dropped logits get exactly zero gradient.
    assert bool((gx.cpu()[~keep] == 0).all())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_dropped_target_gives_minus_inf_and_zero_gradient(device, backend):
    x = torch.tensor([[5.0, 4.0, -3.0, 0.0]], device=device, requires_grad=True)
    y = torch.tensor([2], device=device)
    lp = lk.token_logprobs(x, y, top_k=2, backend=backend)
    assert lp.item() == float("-inf")
    (gx,) = torch.autograd.grad(lp.sum(), x)
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_truncation_is_bitwise_the_plain_op(device, backend, dtype):
    x = _logits(6, 517, dtype, seed=9).to(device).requires_grad_(True)
    y = torch.randint(0, 517, (6,), generator=torch.Generator().manual_seed(0)).to(device)
    lp0, e0 = lk.token_logprobs(x, y, return_entropy=True, temperature=0.9, backend=backend)
    (g0,) = torch.autograd.grad(lp0.sum() + e0.sum(), x)
    # top_k >= V keeps everything: tau = -inf, the truncated kernels' arithmetic is then the plain one.
    lp1, e1 = lk.token_logprobs(x, y, return_entropy=True, temperature=0.9, backend=backend, top_k=517)
    (g1,) = torch.autograd.grad(lp1.sum() + e1.sum(), x)
    assert torch.equal(lp0, lp1) and torch.equal(e0, e1) and torch.equal(g0, g1)


def test_bad_arguments():
    x = torch.zeros(2, 5)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="top_k"):
        lk.token_logprobs(x, y, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        lk.token_logprobs(x, y, top_k=2.0)
    with pytest.raises(ValueError, match="top_p"):
        lk.token_logprobs(x, y, top_p=1.5)
    with pytest.raises(ValueError, match="min_p"):
        lk.token_logprobs(x, y, min_p=0.0)
    with pytest.raises(ValueError, match="order"):
        lk.token_logprobs(x, y, top_p=0.5, sampler_order="sglang")


@pytest.mark.skipif(not lk.native_available("cpu"), reason="compiled extension not built")
def test_native_kernels_check_tau():
    x = torch.zeros(2, 5)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="tau"):
        torch.ops.lacot.token_logprobs_fwd_native(x, y, 1.0, -100, False, torch.zeros(3))
    with pytest.raises(RuntimeError, match="tau"):
        torch.ops.lacot.token_logprobs_fwd_native(x, y, 1.0, -100, False, torch.zeros(2, dtype=torch.float64))
