"""fused_linear_token_logprobs: every backend against the fp64 reference; memory and row-skipping contracts."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference
from lacot_kernels.ops import fused_linear as fl

from .helpers import ALL_BACKENDS, bf16_grad_atol


def _run(h, w, b, y, *, device, backend, temperature=1.0):
    hh, ww = h.to(device).requires_grad_(True), w.to(device).requires_grad_(True)
    bb = b.to(device).requires_grad_(True) if b is not None else None
    y = y.to(device)
    lp, ent = lk.fused_linear_token_logprobs(
        hh, ww, y, bias=bb, temperature=temperature, return_entropy=True, backend=backend
    )
    g_lp = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    g_ent = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device)
    inputs = [t for t in (hh, ww, bb) if t is not None]
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), inputs)

    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    rb = ref_in[2] if b is not None else None
    rlp, rent = reference.fused_linear_token_logprobs(ref_in[0], ref_in[1], y, bias=rb, temperature=temperature)
    rgrads = torch.autograd.grad((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum(), ref_in)
    return (lp, ent, grads), (rlp, rent, rgrads)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.6, 1.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_fp64_reference(device, backend, dtype, temperature, with_bias):
    g = torch.Generator().manual_seed(0)
    N, D, V = 37, 48, 301  # odd sizes: partial row blocks, vocab tiles and K tiles
    h = torch.randn(3, N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.2).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if with_bias else None
    y = torch.randint(0, V, (3, N), generator=g)
    y[0, :10] = -100
    y[2, 5] = -100
    (lp, ent, grads), (rlp, rent, rgrads) = _run(h, w, b, y, device=device, backend=backend, temperature=temperature)
    assert lp.shape == y.shape and lp.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=0)
    for name, gx, gr in zip(("hidden", "weight", "bias"), grads, rgrads, strict=False):
        assert gx.dtype == dtype, name
        # fp32: accumulation over ~100 rows / 300 vocab entries; 16-bit: the stored gradient's rounding.
        atol = 2e-5 * max(1.0, float(gr.abs().max())) if dtype == torch.float32 else bf16_grad_atol(gr, dtype)
        torch.testing.assert_close(gx.double(), gr, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_equals_token_logprobs_on_materialized_logits(device, backend):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(20, 32, generator=g).to(device)
    w = torch.randn(1000, 32, generator=g).to(device) * 0.3
    y = torch.randint(0, 1000, (20,), generator=g).to(device)
    a = lk.fused_linear_token_logprobs(h, w, y, temperature=0.7, backend=backend)
    c = lk.token_logprobs(h @ w.T, y, temperature=0.7, backend="torch")
    torch.testing.assert_close(a, c, atol=2e-5, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_ignored_rows_are_never_multiplied(device, backend):
    # NaN hidden states on ignored rows: any matmul work on them would poison dW / db (NaN * 0 = NaN).
    g = torch.Generator().manual_seed(1)
    h = torch.randn(24, 16, generator=g)
    y = torch.randint(0, 200, (24,), generator=g)
    y[::2] = -100
    h[::2] = float("nan")
    h = h.to(device).requires_grad_(True)
    w = torch.randn(200, 16, generator=g).to(device).requires_grad_(True)
    b = torch.randn(200, generator=g).to(device).requires_grad_(True)
    lp, ent = lk.fused_linear_token_logprobs(h, w, y.to(device), bias=b, return_entropy=True, backend=backend)
    assert (lp[::2] == 0).all() and (ent[::2] == 0).all() and torch.isfinite(lp).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    assert (h.grad[::2] == 0).all() and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_tiled_path_bounds_the_logits_tile(backend, monkeypatch):
    if backend == "cuda" and not lk.native_available("cpu"):
        pytest.skip("compiled extension not built")
    seen = []
    orig = fl._logits_tile

    def spy(h, w, b):
        out = orig(h, w, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(fl, "_logits_tile", spy)
    monkeypatch.setenv("LACOT_FUSED_WORKSPACE_MB", "0.25")  # 262144 bytes -> 64 fp32 logits rows at V=1024
    N, D, V = 300, 8, 1024
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[:100] = -100
    lp = lk.fused_linear_token_logprobs(h, w, y, backend=backend)
    lp.sum().backward()
    assert seen, "the tiled path was not used"
    assert max(r * c for r, c in seen) <= (1 << 18) // 4, seen  # never more than the workspace of fp32 logits
    assert sum(r for r, c in seen if c == V) <= 2 * 200  # forward and backward each touch only the 200 valid rows
    ref, _ = reference.fused_linear_token_logprobs(h.detach(), w.detach(), y)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_no_grad_saves_nothing(device, backend):
    h = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(64, 16, device=device, requires_grad=True)
    y = torch.randint(0, 64, (8,), device=device)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            lp = lk.fused_linear_token_logprobs(h, w, y, backend=backend)
        assert packed == [] and lp.grad_fn is None
        lk.fused_linear_token_logprobs(h, w, y, backend=backend)
        assert len(packed) > 0  # with grad enabled the op does save its inputs and statistics


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_empty_batch_and_only_some_grads(device, backend):
    w = torch.randn(10, 4, device=device, requires_grad=True)
    h = torch.randn(0, 4, device=device, requires_grad=True)
    lp = lk.fused_linear_token_logprobs(h, w, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert (w.grad == 0).all()
    # Only the weight needs a gradient (frozen backbone), and the reverse.
    h2 = torch.randn(5, 4, device=device)
    y2 = torch.randint(0, 10, (5,), device=device)
    (gw,) = torch.autograd.grad(lk.fused_linear_token_logprobs(h2, w, y2, backend=backend).sum(), w)
    ref = torch.autograd.grad(reference.fused_linear_token_logprobs(h2, w, y2)[0].sum(), w)[0]
    torch.testing.assert_close(gw.double(), ref.double(), atol=1e-5, rtol=0)
    h2.requires_grad_(True)
    (gh,) = torch.autograd.grad(lk.fused_linear_token_logprobs(h2, w.detach(), y2, backend=backend).sum(), h2)
    assert gh.shape == h2.shape


@pytest.mark.parametrize("splits_env", ["1", "3"])
def test_triton_split_merge_is_exact(splits_env, monkeypatch):
    """The vocabulary split merge gives the same answer whatever the number of splits."""
    if not lk.triton_available("cpu"):
        pytest.skip("Triton interpreter not active")
    orig = fl._fwd_config

    def cfg(N, V, D, device, dtype=None):
        bm, bn, bk, _, w, s = orig(N, V, D, device, dtype)
        return bm, 32, bk, int(splits_env), w, s

    monkeypatch.setattr(fl, "_fwd_config", cfg)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 16, generator=g)
    w = torch.randn(150, 16, generator=g)
    y = torch.randint(0, 150, (10,), generator=g)
    lp, ent = lk.fused_linear_token_logprobs(h, w, y, temperature=0.8, return_entropy=True, backend="triton")
    rlp, rent = reference.fused_linear_token_logprobs(h, w, y, temperature=0.8)
    torch.testing.assert_close(lp.double(), rlp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=1e-5, rtol=0)
