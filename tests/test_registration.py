"""Registration layer: every op exists as torch.ops.lacot.*, passes opcheck, and compiles with fullgraph."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import _registry

from .helpers import ALL_BACKENDS


def test_every_schema_is_an_op():
    for name in _registry.SCHEMAS:
        assert hasattr(torch.ops.lacot, name), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lacot::token_logprobs", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lacot::fused_linear_token_logprobs", "CPU")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_token_logprobs(device, backend, dtype):
    x = torch.randn(5, 33, device=device, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 32, -100, 4, 7], device=device)
    for entropy in (True, False):
        torch.library.opcheck(torch.ops.lacot.token_logprobs.default, (x, y, 0.7, -100, entropy, backend))
    st = torch.zeros(5, 2, device=device)
    torch.library.opcheck(
        torch.ops.lacot.token_logprobs_backward.default,
        (torch.randn(5, device=device), None, x.detach(), y, st, torch.zeros(0, device=device), 1.0, -100, backend),
    )


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_opcheck_fused(device, backend):
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    y = torch.tensor([0, 39, -100, 4, 7, -100], device=device)
    torch.library.opcheck(torch.ops.lacot.fused_linear_token_logprobs.default, (h, w, b, y, 0.7, -100, True, backend))
    torch.library.opcheck(
        torch.ops.lacot.fused_linear_token_logprobs.default, (h, w, None, y, 1.0, -100, False, backend)
    )


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("trunc", [(5, None, None, False), (None, 0.9, 0.05, False), (None, None, None, True)])
def test_opcheck_fused_rowwise(device, backend, trunc):
    top_k, top_p, min_p, det = trunc
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    y = (h.detach() @ w.detach().T + b.detach()).argmax(-1)  # kept targets: finite log-probs
    y[2] = -100
    args = (h, w, b, y, 0.7, -100, True, top_k, top_p, min_p, "vllm", det, 4 if not det else 64, backend)
    torch.library.opcheck(torch.ops.lacot.fused_linear_token_logprobs_rowwise.default, args)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_compile_fullgraph_forward_backward(device, backend):
    torch._dynamo.reset()
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    y = torch.tensor([0, 39, -100, 4, 7, 1], device=device)

    def step(h, w, y):
        logits = h @ w.T
        lp, ent = lk.token_logprobs(logits, y, temperature=0.9, return_entropy=True, backend=backend)
        flp, fent = lk.fused_linear_token_logprobs(h, w, y, temperature=0.9, return_entropy=True, backend=backend)
        # The row-wise variant (sampler truncation + batch invariance) compiles the same way.
        tlp = lk.fused_linear_token_logprobs(h, w, y, temperature=0.9, backend=backend, min_p=0.01, deterministic=True)
        return (lp - 0.1 * ent).sum() + (flp - 0.1 * fent).sum() + tlp.clamp(min=-1e4).sum()

    explanation = torch._dynamo.explain(step)(h, w, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h, w, y)
    gh, gw = torch.autograd.grad(out, (h, w))
    ref = step(h, w, y)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_compile_inductor_cpu():
    torch._dynamo.reset()
    x = torch.randn(4, 50, requires_grad=True)
    y = torch.tensor([1, 2, -100, 49])
    f = torch.compile(lambda x, y: (lk.token_logprobs(x * 2.0, y) ** 2).sum(), fullgraph=True)
    out = f(x, y)
    out.backward()
    assert torch.isfinite(x.grad).all()
