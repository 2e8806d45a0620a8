"""Batch invariance (deterministic=True / LACOT_BATCH_INVARIANT=1): a row's outputs and gradients are bitwise the
same whatever the other rows, the row count, the padding width and the chunk (workspace) size, on every backend."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels.ops import batch_invariance as bi
from lacot_kernels.ops import sampler_truncation as st
from lacot_kernels.ops import token_logprobs as tlp

from .helpers import ALL_BACKENDS, GPU_MARKED_BACKENDS

V = 4099  # odd, > one tree_sum lane block


def _tlp_row(x, y, row, backend, **kw):
    x = x.clone().requires_grad_(True)
    lp, ent = lk.token_logprobs(x, y, return_entropy=True, backend=backend, **kw)
    (gx,) = torch.autograd.grad((lp.clamp(min=-1e30) * 0.7).sum() + ent.sum(), x)
    return lp[row], ent[row], gx[row]


def _batches(x0, y0, seed):
    """(logits, targets, row index of x0) for row counts 1, 3, 17 with random other rows at various positions."""
    g = torch.Generator().manual_seed(seed)
    out = [(x0[None], y0[None], 0)]
    for n, pos in ((3, 2), (17, 5)):
        x = (torch.randn(n, x0.shape[-1], generator=g) * 4).to(x0.dtype)
        y = torch.randint(0, x0.shape[-1], (n,), generator=g)
        x[pos], y[pos] = x0, y0
        out.append((x, y, pos))
    return out


def _assert_same(results):
    for r in results[1:]:
        for a, b in zip(results[0], r, strict=True):
            assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trunc", [{}, dict(top_p=0.9), dict(top_k=50, min_p=0.01)])
def test_token_logprobs_rows_are_batch_invariant(device, backend, dtype, trunc, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(V, generator=g) * 4).to(dtype)
    y0 = torch.tensor(int(torch.argmax(x0.float())))  # a kept target: finite log-prob
    results = []
    for chunk in (1 << 22, 3 * V):  # the torch backends' workspace: rows per step
        monkeypatch.setattr(tlp, "_TORCH_CHUNK_ELEMS", chunk)
        monkeypatch.setattr(st, "_CHUNK_ELEMS", chunk)
        for x, y, row in _batches(x0, y0, seed=chunk % 7):
            results.append(_tlp_row(x.to(device), y.to(device), row, backend, deterministic=True, **trunc))
    _assert_same(results)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in ALL_BACKENDS if b != "torch"])
def test_compiled_and_triton_log_probs_are_batch_invariant_by_default(device, backend):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(V, generator=g) * 4
    y0 = torch.tensor(7)
    _assert_same([_tlp_row(x.to(device), y.to(device), r, backend) for x, y, r in _batches(x0, y0, 3)])


def test_env_variable_turns_it_on(monkeypatch):
    monkeypatch.setenv("LACOT_BATCH_INVARIANT", "1")
    assert bi.enabled(None) and not bi.enabled(False)
    monkeypatch.setenv("LACOT_BATCH_INVARIANT", "0")
    assert not bi.enabled(None) and bi.enabled(True)
    with pytest.raises(TypeError, match="deterministic"):
        bi.enabled(1)


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
def test_deterministic_mode_keeps_the_values(device, backend):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(5, V, generator=g) * 4).to(device)
    y = torch.randint(0, V, (5,), generator=g).to(device)
    a = lk.token_logprobs(x, y, return_entropy=True, backend=backend)
    b = lk.token_logprobs(x, y, return_entropy=True, backend=backend, deterministic=True)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=2e-6, rtol=1e-6)


def test_tree_sums_match_torch():
    x = torch.randn(3, 5000, dtype=torch.float64)
    torch.testing.assert_close(bi.tree_sum(x), x.sum(-1))
    torch.testing.assert_close(bi.tree_cumsum(x), x.cumsum(-1))


def _grpo_row_grad(lp, old, roll, ref, adv, mask, row, backend, **kw):
    x = lp.clone().requires_grad_(True)
    loss, _ = lk.grpo_loss(
        x, old, adv, mask, ref_logp=ref, beta=0.04, loss_type="dapo", dapo_normalizer=37.0, backend=backend,
        rollout_logp=roll, deterministic=True, **kw,
    )  # fmt: skip
    (gx,) = torch.autograd.grad(loss, x)
    return (gx[row, :ROW_T],)


ROW_T = 1500  # > the fixed block: the row spans two blocks


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(ratio_level="sequence"), dict(is_correction="tis", is_cap=1.1)])
def test_grpo_rows_are_batch_and_padding_invariant(device, backend, kw):
    g = torch.Generator().manual_seed(4)

    def rand_rows(n, T):
        lp = torch.randn(n, T, generator=g) * 0.5 - 1
        old = lp + torch.randn(n, T, generator=g) * 0.05
        return lp, old, old + torch.randn(n, T, generator=g) * 0.1, lp + torch.randn(n, T, generator=g) * 0.1

    row = rand_rows(1, ROW_T)
    mask_row = (torch.rand(1, ROW_T, generator=g) > 0.2).float()
    adv_row = torch.tensor([0.8])
    results = []
    for n, pos, T in ((1, 0, ROW_T), (4, 1, ROW_T), (6, 4, ROW_T + 700), (2, 1, 2 * 1024 + 3)):
        ts = list(rand_rows(n, T))
        mask = (torch.rand(n, T, generator=g) > 0.2).float()
        adv = torch.randn(n, generator=g)
        for t, r in zip(ts, row, strict=True):
            t[pos, :ROW_T] = r[0]
            t[pos, ROW_T:] = 0.0
        mask[pos] = 0.0
        mask[pos, :ROW_T] = mask_row[0]
        adv[pos] = adv_row[0]
        lp, old, roll, ref = (t.to(device) for t in ts)
        results.append(_grpo_row_grad(lp, old, roll, ref, adv.to(device), mask.to(device), pos, backend, **kw))
    _assert_same(results)


@pytest.mark.parametrize("device,backend", GPU_MARKED_BACKENDS)
def test_deterministic_grpo_keeps_the_values(device, backend):
    g = torch.Generator().manual_seed(5)
    lp = (torch.randn(4, 1300, generator=g) * 0.5 - 1).to(device)
    old = lp + 0.05
    adv = torch.randn(4, generator=g).to(device)
    mask = (torch.rand(4, 1300, generator=g) > 0.3).float().to(device)
    res = []
    for det in (False, True):
        x = lp.clone().requires_grad_(True)
        loss, stats = lk.grpo_loss(x, old, adv, mask, loss_type="grpo", backend=backend, deterministic=det)
        res.append((loss, torch.autograd.grad(loss, x)[0], *stats.values()))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
