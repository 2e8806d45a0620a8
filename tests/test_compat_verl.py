"""lacot_kernels.compat.verl against verl's formulas (log_softmax + gather; logsumexp - sum(softmax * logits)) in
fp64, on every backend, with the sliced (B, L, V) logits verl's actor passes, gradients, and the errors."""

from __future__ import annotations

import inspect

import pytest
import torch

import lacot_kernels._dropin as dropin
from lacot_kernels import reference
from lacot_kernels.compat import verl

from .helpers import ALL_BACKENDS


def verl_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """verl's torch fallback: log_softmax, then gather (fp64 here, as the oracle)."""
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    return torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1)


def _actor_logits(B=3, L=6, V=257, seed=0, dtype=torch.float32):
    """What verl's actor scores: logits of the whole sequence, temperature-divided, sliced to the response."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, L + 5, V, generator=g) * 4
    full[0, 2, 9] = 60.0  # a confident row
    full.div_(0.7)
    responses = torch.randint(0, V, (B, L), generator=g)
    return full.to(dtype)[:, -L - 1 : -1], responses


@pytest.fixture(params=ALL_BACKENDS, ids=[f"{d}-{b}" for d, b in ALL_BACKENDS])
def device(request, monkeypatch):
    device, backend = request.param
    monkeypatch.setenv("LACOT_BACKEND", backend)  # the verl signatures have no backend argument
    return device


def test_signatures_match_verl():
    # verl.utils.torch_functional / verl.utils.kernel.linear_cross_entropy, by parameter names and defaults.
    sig = inspect.signature(verl.logprobs_from_logits)
    assert list(sig.parameters) == ["logits", "labels", "inplace_backward"]
    assert sig.parameters["inplace_backward"].default is True
    assert list(inspect.signature(verl.entropy_from_logits).parameters) == ["logits"]
    sig = inspect.signature(verl.entropy_from_logits_with_chunking)
    assert list(sig.parameters) == ["logits", "chunk_size"] and sig.parameters["chunk_size"].default == 2048
    sig = inspect.signature(verl.linear_cross_entropy)
    assert list(sig.parameters) == ["hidden", "weight", "labels", "temperature", "reduction", "dist_process_group"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy(device, dtype):
    logits, labels = _actor_logits(dtype=dtype)
    logits, labels = logits.to(device), labels.to(device)
    lp = verl.logprobs_from_logits(logits, labels)
    ent = verl.entropy_from_logits(logits)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    # Against the fp64 formulas on the same (possibly bf16-rounded) values.
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(lp.double(), verl_logprobs(logits, labels), atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), verl_entropy(logits), atol=tol, rtol=0)
    flat = logits.reshape(-1, logits.shape[-1])
    torch.testing.assert_close(
        verl.entropy_from_logits_with_chunking(flat, chunk_size=4).double(), verl_entropy(flat), atol=tol, rtol=0
    )


def test_gradients(device):
    logits, labels = _actor_logits(seed=1)
    base = logits.detach().clone().to(device).requires_grad_(True)
    ref_in = logits.detach().double().to(device).requires_grad_(True)
    labels = labels.to(device)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (verl.logprobs_from_logits(base, labels) * g).sum().add(0.05 * verl.entropy_from_logits(base).sum()).backward()
    (verl_logprobs(ref_in, labels) * g.double()).sum().add(0.05 * verl_entropy(ref_in).sum()).backward()
    torch.testing.assert_close(base.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)


def test_ignored_labels_give_zero():
    logits, labels = _actor_logits(seed=3)
    labels[1, 2:] = -100
    lp = verl.logprobs_from_logits(logits, labels)
    assert bool((lp[1, 2:] == 0).all())
    torch.testing.assert_close(lp[0].double(), verl_logprobs(logits[0], labels[0]), atol=1e-5, rtol=0)


def test_sliced_logits_are_not_copied(monkeypatch):
    """verl's actor scores logits[:, -L-1:-1]: each sequence is handed to the op as a free view of the storage."""
    logits, labels = _actor_logits(B=4, seed=4)
    seen = []
    real = dropin.token_logprobs

    def spy(x, *args, **kwargs):
        seen.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(dropin, "token_logprobs", spy)
    lp = verl.logprobs_from_logits(logits, labels)
    assert len(seen) == logits.shape[0]
    for x in seen:
        assert x.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        x.view(-1, x.shape[-1])  # flattens without a copy
    torch.testing.assert_close(lp.double(), verl_logprobs(logits, labels), atol=1e-5, rtol=0)


def test_linear_cross_entropy(device):
    g = torch.Generator().manual_seed(5)
    B, T, D, V = 2, 5, 16, 300
    hidden = torch.randn(B, T, D, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.3).to(device).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    logp, ent = verl.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    assert logp.shape == ent.shape == (B * T,)  # flattened, as verl returns them
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref_lp, ref_ent = reference.fused_linear_token_logprobs(
        h64.reshape(-1, D), w64, labels.reshape(-1), temperature=0.8
    )
    torch.testing.assert_close(logp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    (logp.sum() - 0.1 * ent.sum()).backward()
    (ref_lp.sum() - 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=2e-5, rtol=1e-4)
    # None means the defaults, as in verl
    lp_none, _ = verl.linear_cross_entropy(hidden, weight, labels.reshape(-1), None, None)
    torch.testing.assert_close(lp_none, verl.linear_cross_entropy(hidden, weight, labels)[0])


def test_bad_arguments():
    logits, labels = _actor_logits(seed=6)
    with pytest.raises(ValueError, match=r"labels.shape must equal logits.shape\[:-1\] = \(3, 6\), got \(3, 5\)"):
        verl.logprobs_from_logits(logits, labels[:, 1:])
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        verl.logprobs_from_logits(logits, labels.tolist())
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        verl.logprobs_from_logits(logits, labels, inplace_backward="yes")
    with pytest.raises(TypeError, match="logits must have dtype float32/bfloat16/float16, got torch.float64"):
        verl.entropy_from_logits(logits.double())
    with pytest.raises(ValueError, match=r"logits must have shape \(N, V\), got \(3, 6, 257\)"):
        verl.entropy_from_logits_with_chunking(logits)
    with pytest.raises(ValueError, match="chunk_size must be > 0, got 0"):
        verl.entropy_from_logits_with_chunking(logits[0], chunk_size=0)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="reduction must be 'none'"):
        verl.linear_cross_entropy(h, w, y, 1.0, "mean")
    with pytest.raises(NotImplementedError, match="vocabulary-parallel"):
        verl.linear_cross_entropy(h, w, y, 1.0, "none", object())
    with pytest.raises(ValueError, match=r"labels must hold one id per token of hidden \(4 ="):
        verl.linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        verl.linear_cross_entropy(h, w, y, -1.0)
