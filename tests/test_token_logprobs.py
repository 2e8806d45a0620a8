"""token_logprobs: every backend against the fp64 reference, adversarial cases, gradients."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

from .helpers import ALL_BACKENDS, bf16_grad_atol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(logits, targets, *, device, backend, temperature=1.0, ignore_index=-100, rtol=0.0):
    """Forward + backward of logp and entropy vs the fp64 reference on the same (rounded) input values."""
    x = logits.to(device).detach().requires_grad_(True)
    y = targets.to(device)
    lp, ent = lk.token_logprobs(
        x, y, temperature=temperature, ignore_index=ignore_index, return_entropy=True, backend=backend
    )
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == y.shape and ent.shape == y.shape
    g_lp = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    g_ent = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (gx,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
    assert gx.dtype == x.dtype

    xr = x.detach().double().requires_grad_(True)
    rlp, rent = reference.token_logprobs(xr, y, temperature=temperature, ignore_index=ignore_index)
    (gr,) = torch.autograd.grad((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum(), xr)

    tol = 1e-5 if x.dtype == torch.float32 else 1e-4
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=rtol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=rtol)
    gtol = 1e-5 if x.dtype == torch.float32 else bf16_grad_atol(gr, x.dtype)
    torch.testing.assert_close(gx.double(), gr, atol=gtol, rtol=0)
    return lp, ent, gx


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
@pytest.mark.parametrize("V", [1, 3, 1000])
def test_matches_fp64_reference(device, backend, dtype, temperature, V):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(2, 5, V, generator=g) * 4).to(dtype)
    targets = torch.randint(0, V, (2, 5), generator=g)
    targets[0, 1] = -100
    _check(logits, targets, device=device, backend=backend, temperature=temperature)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [32003, 151936 + 7])
def test_large_odd_vocab(device, backend, dtype, V):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, V, generator=g) * 2).to(dtype)
    targets = torch.tensor([0, V - 1, 12345 % V])
    _check(logits, targets, device=device, backend=backend, temperature=1.3)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_tokens(device, backend, dtype):
    # softmax(x_y) -> 1: the true-class gradient is a difference of nearly equal numbers (Liger #1329).
    V = 777
    logits = torch.randn(6, V) * 0.5
    targets = torch.tensor([0, 5, 100, 776, 3, 9])
    logits[torch.arange(6), targets] += torch.tensor([8.0, 15.0, 30.0, 60.0, 12.0, 20.0])
    lp, _, gx = _check(logits.to(dtype), targets, device=device, backend=backend, temperature=0.6)
    assert (lp <= 0).all()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_huge_logits(device, backend, temperature):
    g = torch.Generator().manual_seed(3)
    logits = (torch.rand(4, 513, generator=g) * 2 - 1) * 1e4
    logits[1] = 1e4
    logits[2, :] = -1e4
    logits[2, 7] = 1e4
    targets = torch.tensor([3, 100, 7, 512])
    # Log-probs reach -3e4 here: an fp32 output holds them to ~2 ulps (4e-3 absolute), not to 1e-5.
    lp, ent, _ = _check(logits, targets, device=device, backend=backend, temperature=temperature, rtol=2.5e-7)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_ignored_rows_are_exactly_zero(device, backend):
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    targets = torch.tensor([-100, 3, -100, 7], device=device)
    lp, ent = lk.token_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert lp[0].item() == 0.0 and lp[2].item() == 0.0 and ent[0].item() == 0.0 and ent[2].item() == 0.0
    (lp.sum() + ent.sum()).backward()
    assert (logits.grad[[0, 2]] == 0).all()
    assert (logits.grad[[1, 3]] != 0).any()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_all_rows_ignored_and_empty_batch(device, backend):
    x = torch.randn(3, 10, device=device, requires_grad=True)
    lp = lk.token_logprobs(x, torch.full((3,), -1, device=device), ignore_index=-1, backend=backend)
    assert (lp == 0).all()
    lp.sum().backward()
    assert (x.grad == 0).all()
    e = torch.randn(0, 10, device=device, requires_grad=True)
    lp, ent = lk.token_logprobs(
        e, torch.zeros(0, dtype=torch.long, device=device), return_entropy=True, backend=backend
    )
    assert lp.shape == (0,) and ent.shape == (0,)
    lp.sum().backward()
    assert e.grad.shape == (0, 10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    base = torch.randn(5, 8, 300, device=device)
    logits = base.transpose(0, 1)[:, :, :257]  # (8, 5, 257): leading dims permuted, rows strided
    targets = torch.randint(0, 257, (5, 8), device=device).t()
    lp = lk.token_logprobs(logits, targets, backend=backend)
    ref, _ = reference.token_logprobs(logits, targets)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=0)
    # A strided vocabulary dimension is copied, not misread.
    x2 = torch.randn(300, 4, device=device).t()
    y2 = torch.randint(0, 300, (4,), device=device)
    torch.testing.assert_close(
        lk.token_logprobs(x2, y2, backend=backend).double(), reference.token_logprobs(x2, y2)[0], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_int32_targets_and_entropy_gradient_alone(device, backend):
    x = torch.randn(6, 40, device=device, dtype=torch.float64).float().requires_grad_(True)
    y = torch.randint(0, 40, (6,), device=device, dtype=torch.int32)
    _, ent = lk.token_logprobs(x, y, return_entropy=True, backend=backend, temperature=0.8)
    (g,) = torch.autograd.grad(ent.sum(), x)
    xr = x.detach().double().requires_grad_(True)
    _, rent = reference.token_logprobs(xr, y, temperature=0.8)
    (gr,) = torch.autograd.grad(rent.sum(), xr)
    torch.testing.assert_close(g.double(), gr, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_out_of_range_targets_give_nan_in_kernels(device, backend):
    # The public function raises on CPU (test_errors.py); the op itself never reads out of bounds.
    from lacot_kernels.ops import token_logprobs as op

    x = torch.randn(3, 20, device=device)
    y = torch.tensor([1, 25, -7], device=device)
    lp, ent, _ = op.FWD[backend](x, y, 1.0, -100, True)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2])
    assert torch.isnan(ent[1])


def test_gradcheck_reference_fp64():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6])
    assert torch.autograd.gradcheck(lambda t: reference.token_logprobs(t, y, temperature=0.7), (x,))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_gradcheck_op(device, backend):
    # The kernels compute in fp32, so finite differences are taken in fp32 with a matching eps / tolerance.
    x = torch.randn(3, 11, device=device, dtype=torch.float32, requires_grad=True)
    y = torch.tensor([0, 10, -100], device=device)

    def f(t):
        lp, ent = lk.token_logprobs(t, y, temperature=0.9, return_entropy=True, backend=backend)
        return lp, ent

    assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("LACOT_BACKEND", "torch")
    assert lk.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("LACOT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LACOT_BACKEND"):
        lk.resolve_backend("auto", torch.device("cpu"))
