"""Equality with the functions users run today: TRL (selective_log_softmax, entropy_from_logits,
ChunkedLogProbFunction), Liger (cross entropy, fused linear cross entropy) and Cut-Cross-Entropy, on shared cases."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk

from .helpers import ALL_BACKENDS

trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl not installed (pip install -r requirements-dev.txt)")


def _case(N=12, D=24, V=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax_and_entropy(device, backend, temperature):
    h, w, y = _case()
    logits = (h @ w.T).to(device)
    y = y.to(device)
    # TRL applies the temperature by dividing the logits before its functions.
    ref_lp = trl_utils.selective_log_softmax(logits / temperature, y)
    ref_ent = trl_utils.entropy_from_logits(logits / temperature)
    lp, ent = lk.token_logprobs(logits, y, temperature=temperature, return_entropy=True, backend=backend)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_trl_chunked_logprob_function(device, backend):
    from trl.kernels import ChunkedLogProbFunction

    h, w, y = _case(N=16, D=32, V=700, seed=1)
    h, w, y = h.to(device), w.to(device), y.to(device)
    b = torch.randn(700, device=device) * 0.1
    hs = [h.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    lp_t, ent_t, *_ = ChunkedLogProbFunction.apply(hs[0], ws[0], b, y, 0.8, 256, None, 1.0, ("entropy",))
    lp, ent = lk.fused_linear_token_logprobs(
        hs[1], ws[1], y, bias=b, temperature=0.8, return_entropy=True, backend=backend
    )
    torch.testing.assert_close(lp, lp_t, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent, ent_t, atol=2e-5, rtol=0)
    # TRL's chunked backward ignores the entropy gradient (kernel_anchors.md): compare log-prob gradients.
    lp_t.sum().backward()
    lp.sum().backward()
    torch.testing.assert_close(hs[1].grad, hs[0].grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ws[1].grad, ws[0].grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_liger_cross_entropy(device, backend):
    if device == "cpu" and not lk.triton_available("cpu"):
        pytest.skip("Liger's Triton kernels need a GPU or TRITON_INTERPRET=1")
    liger = pytest.importorskip("liger_kernel.transformers")
    h, w, y = _case(N=10, D=16, V=300, seed=2)
    logits, y = (h @ w.T).to(device), y.to(device)
    y[3] = -100
    ce = liger.LigerCrossEntropyLoss(reduction="none")(logits.clone(), y)
    lp = lk.token_logprobs(logits, y, backend=backend)
    torch.testing.assert_close(-ce, lp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_liger_fused_linear_cross_entropy(device, backend):
    if device == "cpu" and not lk.triton_available("cpu"):
        pytest.skip("Liger's Triton kernels need a GPU or TRITON_INTERPRET=1")
    liger = pytest.importorskip("liger_kernel.transformers")
    h, w, y = _case(N=10, D=16, V=300, seed=3)
    h, w, y = h.to(device), w.to(device), y.to(device)
    y[0] = -100
    ce = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")(w, h, y)
    lp = lk.fused_linear_token_logprobs(h, w, y, backend=backend)
    torch.testing.assert_close(-ce, lp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_cut_cross_entropy(device, backend):
    cce = pytest.importorskip("cut_cross_entropy")
    h, w, y = _case(N=10, D=16, V=300, seed=4)
    h, w, y = h.to(device), w.to(device), y.to(device)
    impl = "cce" if device == "cuda" else "torch_compile"
    loss = cce.linear_cross_entropy(h, w, y, reduction="none", impl=impl)
    lp = lk.fused_linear_token_logprobs(h, w, y, backend=backend)
    torch.testing.assert_close(-loss.float(), lp, atol=1e-5, rtol=0)
