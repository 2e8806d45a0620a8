"""The LM-head tile engine (ops/_lm_head.py) and the fused Triton backward it serves: workspace rule, tile orders,
program order, precision options, and the contracts of the Triton dlogits path (no fp32 logits tile)."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference
from lacot_kernels.ops import _lm_head as lm
from lacot_kernels.ops import fused_linear as fl

from .helpers import bf16_grad_atol

needs_interp = pytest.mark.skipif(not lk.triton_available("cpu"), reason="Triton interpreter not active")


# ---- workspace rule -------------------------------------------------------------------------------------------
def test_one_workspace_rule(monkeypatch):
    monkeypatch.delenv(lm.WORKSPACE_ENV, raising=False)
    assert lm.workspace_bytes(torch.device("cpu")) == 128 << 20
    assert lm.workspace_bytes(torch.device("cuda")) == 2048 << 20
    monkeypatch.setenv(lm.WORKSPACE_ENV, "0.5")
    assert lm.workspace_bytes(torch.device("cpu")) == lm.workspace_bytes(torch.device("cuda")) == 1 << 19
    assert lm.rows_per_chunk(1024, 4, torch.device("cpu")) == 128
    assert lm.rows_per_chunk(1 << 30, 4, torch.device("cpu")) == 1  # never zero rows


# ---- host-side tile orders ------------------------------------------------------------------------------------
def test_tiles_cover_the_logits_exactly():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(37, 8, generator=g), torch.randn(1000, 8, generator=g), torch.randn(1000, generator=g)
    full = torch.zeros(37, 1000)
    count = torch.zeros(37, 1000)
    for r, v0, z in lm.tiles(h, w, b, tile_elems=16 * 300):
        assert z.dtype == torch.float32 and z.numel() <= max(16 * 300, 37 * 256)
        full[r, v0 : v0 + z.shape[1]] += z
        count[r, v0 : v0 + z.shape[1]] += 1
    assert (count == 1).all()
    torch.testing.assert_close(full, h @ w.T + b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["row_chunks", "vocab_blocks"])
def test_tile_orders_accumulate_the_gradient_gemms(order, monkeypatch):
    # With dlogits G given, the engine must produce dX = G W, dW = G^T X, db = sum G, tile by tile.
    monkeypatch.setenv(lm.WORKSPACE_ENV, "0.01")  # ~10 KB: many tiles in both directions
    g = torch.Generator().manual_seed(1)
    n, D, V = 50, 12, 700
    h, w, b = torch.randn(n, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    G = torch.randn(n, V, generator=g)
    if order == "row_chunks":
        rows = torch.arange(n)
        gh, gw, gb = lm.row_chunks(
            h, w, b, rows, bytes_per_elem=4, tile_fn=lambda logits, r: G[r], needs=(True, True, True)
        )
    else:
        seen = []

        def tile(hc, w_blk, b_blk, sl, v0):
            seen.append((hc.shape[0], w_blk.shape[0]))
            return G[sl, v0 : v0 + w_blk.shape[0]]

        gh, gw, gb = lm.vocab_blocks(h, w, b, bytes_per_elem=4, tile_fn=tile, needs=(True, True, True))
        assert len(seen) > 1 and max(r * c for r, c in seen) * 4 <= max(lm.workspace_bytes(h.device), 128 * 4)
    torch.testing.assert_close(gh, G @ w, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw.float(), G.T @ h, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gb, G.sum(0), atol=1e-4, rtol=1e-5)


def test_addmm_f32_is_in_place_and_fp32_accurate():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 40, generator=g).bfloat16(), torch.randn(40, 20, generator=g).bfloat16()
    acc = torch.ones(30, 20)
    ptr = acc.data_ptr()
    lm.addmm_f32_(acc, a, b)
    assert acc.data_ptr() == ptr and acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), 1 + a.double() @ b.double(), atol=1e-5, rtol=0)


def test_no_autocast_keeps_fp32_tiles():
    @lm.no_autocast
    def f(h, w):
        return lm.logits_tile(h, w, None).dtype, torch.is_autocast_enabled("cpu")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype, on = f(torch.randn(4, 8), torch.randn(6, 8))
    assert dtype == torch.float32 and not on


# ---- program order and grid -----------------------------------------------------------------------------------
def test_wave_splits_fill_whole_waves():
    # Headline shape on 132 SMs: 64 row blocks x 1188 vocabulary tiles; the critical path must be within 2% of the
    # best possible (N x V tiles spread evenly over 132 SMs), where 5 splits (the old rule) lose ~19% to the tail.
    s = lm.wave_splits(64, 1188, 132)
    cost = -(-(64 * s) // 132) * -(-1188 // s)
    best = 64 * 1188 / 132
    assert cost <= 1.03 * best, (s, cost, best)
    old = -(-(64 * 5) // 132) * -(-1188 // 5)
    assert old > 1.15 * best
    assert lm.wave_splits(2, 3, 132) == 3  # small problems: as many splits as tiles
    assert lm.wave_splits(264, 1000, 132) == 1  # row blocks already fill whole waves: no split


@needs_interp
def test_grouped_program_order_is_a_bijection():
    from lacot_kernels.ops._triton_utils import jit, tl

    @jit
    def probe(out_ptr, n_m, n_n, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pm, pn = lm._grouped_pid(pid, n_m, n_n, GROUP_M)
        tl.store(out_ptr + 2 * pid, pm)
        tl.store(out_ptr + 2 * pid + 1, pn)

    for n_m, n_n, group in ((11, 5, 4), (3, 7, 8), (16, 2, 8)):
        out = torch.full((n_m * n_n, 2), -1, dtype=torch.int32)
        probe[(n_m * n_n,)](out, n_m, n_n, GROUP_M=group)
        pairs = {tuple(p) for p in out.tolist()}
        assert pairs == {(m, n) for m in range(n_m) for n in range(n_n)}
        # consecutive programs stay within one group of row blocks
        first = out[: min(group, n_m) * n_n, 0]
        assert int(first.max()) < group


# ---- the fused Triton backward ----------------------------------------------------------------------------------
def test_triton_backward_is_the_cuda_default():
    if not lk.triton_available("cuda"):
        pytest.skip("Triton not installed")
    assert fl._resolve("auto", torch.device("cuda")) == "triton"


@needs_interp
def test_triton_backward_holds_no_fp32_logits_tile(monkeypatch):
    monkeypatch.setenv(lm.WORKSPACE_ENV, "0.02")  # 20 KB: several vocabulary blocks
    made, tiles = [], []
    monkeypatch.setattr(fl, "_logits_tile", lambda *a: made.append(1) or lm.logits_tile(*a))
    orig = fl._dlogits_triton

    def spy(h, w_blk, *args):
        out = orig(h, w_blk, *args)
        tiles.append(out)
        return out

    monkeypatch.setattr(fl, "_dlogits_triton", spy)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 16, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(900, 16, generator=g) * 0.3).bfloat16().requires_grad_(True)
    y = torch.randint(0, 900, (40,), generator=g)
    y[::3] = -100
    lp, ent = lk.fused_linear_token_logprobs(h, w, y, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert made == []  # neither the forward nor the backward built an fp32 logits tile
    assert len(tiles) > 1
    for t in tiles:  # only 16-bit dlogits of the valid rows, within the workspace
        assert t.dtype == torch.bfloat16 and t.shape[0] <= int((y != -100).sum())
        assert t.numel() * 2 <= max(lm.workspace_bytes(h.device), 128 * 2 * t.shape[0])
    rh, rw = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rlp, rent = reference.fused_linear_token_logprobs(rh, rw, y)
    (rlp.sum() + rent.sum()).backward()
    torch.testing.assert_close(h.grad.double(), rh.grad, atol=bf16_grad_atol(rh.grad, torch.bfloat16), rtol=0)
    torch.testing.assert_close(w.grad.double(), rw.grad, atol=bf16_grad_atol(rw.grad, torch.bfloat16), rtol=0)


# ---- precision="default" | "high" -------------------------------------------------------------------------------
def _softmax_dlogits(n, V, seed):
    """Realistic dlogits: g (onehot - p) - g_ent p (log p + H) of peaked softmax rows (they cancel in G W)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    logp = z.log_softmax(-1)
    p = logp.exp()
    H = -(p * logp).sum(-1, keepdim=True)
    y = torch.randint(0, V, (n,), generator=g)
    G = -p - 0.7 * p * (logp + H)
    G[torch.arange(n), y] += 1.0
    return G.float()


def test_hi_lo_split_reconstructs_fp32_dlogits():
    G = _softmax_dlogits(64, 3000, 4)
    hi, lo = lm.split_hi_lo(G, torch.bfloat16)
    assert hi.dtype == lo.dtype == torch.bfloat16
    err_default = (hi.double() - G.double()).abs()
    err_high = (hi.double() + lo.double() - G.double()).abs()
    scale = G.double().abs()
    assert float((err_default / scale.clamp_min(1e-30)).max()) <= 2.0**-8
    assert float((err_high / scale.clamp_min(1e-30)).max()) <= 2.0**-16


def test_high_precision_gradient_is_closer_to_fp64_than_default():
    # dX = G W with bf16 tensor-core operands and fp32 accumulation: "default" feeds G rounded to bf16 (one GEMM),
    # "high" feeds hi and lo (two GEMMs). Both are emulated exactly on the CPU (bf16 values, fp32/fp64 sums).
    G = _softmax_dlogits(128, 2048, 5)
    w = (torch.randn(2048, 64, generator=torch.Generator().manual_seed(6)) * 0.05).bfloat16()
    exact = G.double() @ w.double()
    default = G.bfloat16().float() @ w.float()
    hi, lo = lm.split_hi_lo(G, torch.bfloat16)
    high = hi.float() @ w.float() + lo.float() @ w.float()
    e_def = float((default.double() - exact).abs().max())
    e_high = float((high.double() - exact).abs().max())
    assert e_high * 50 < e_def, (e_high, e_def)


@needs_interp
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_precision_high_wiring(backend, monkeypatch):
    # The Triton kernel writes the hi/lo pair (stored as two bf16 tiles); the torch path keeps fp32 dlogits on the
    # CPU. Either way the gradients match the fp64 reference, and "high" is at least as close as "default".
    pairs = []
    orig = fl._dlogits_triton
    monkeypatch.setattr(fl, "_dlogits_triton", lambda *a: pairs.append(orig(*a)) or pairs[-1])
    g = torch.Generator().manual_seed(7)
    h = torch.randn(30, 32, generator=g).bfloat16()
    w = (torch.randn(500, 32, generator=g) * 0.2).bfloat16()
    y = torch.randint(0, 500, (30,), generator=g)
    rh = h.double().requires_grad_(True)
    rlp, rent = reference.fused_linear_token_logprobs(rh, w.double(), y)
    (ref,) = torch.autograd.grad(rlp.sum() + 0.5 * rent.sum(), rh)
    errs = {}
    for precision in ("default", "high"):
        hh = h.clone().requires_grad_(True)
        lp, ent = lk.fused_linear_token_logprobs(hh, w, y, return_entropy=True, backend=backend, precision=precision)
        (gh,) = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), hh)
        torch.testing.assert_close(gh.double(), ref, atol=bf16_grad_atol(ref, torch.bfloat16), rtol=0)
        errs[precision] = float((gh.double() - ref).abs().max())
    assert errs["high"] <= errs["default"]
    if backend == "triton":
        assert any(isinstance(p, tuple) for p in pairs) and any(not isinstance(p, tuple) for p in pairs)


def test_precision_is_validated():
    h, w, y = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="precision"):
        lk.fused_linear_token_logprobs(h, w, y, precision="fast")


# ---- fp32 inputs: one precision rule for forward and backward -----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp32_ignores_allow_tf32_in_forward_and_backward():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        g = torch.Generator().manual_seed(8)
        h = torch.randn(64, 256, generator=g).cuda().requires_grad_(True)
        w = torch.randn(3000, 256, generator=g).cuda().requires_grad_(True)
        y = torch.randint(0, 3000, (64,), generator=g).cuda()
        lp = lk.fused_linear_token_logprobs(h, w, y)
        (gh,) = torch.autograd.grad(lp.sum(), h)
        assert torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    rh = h.detach().double().requires_grad_(True)
    rlp, _ = reference.fused_linear_token_logprobs(rh, w.detach().double(), y)
    (rg,) = torch.autograd.grad(rlp.sum(), rh)
    torch.testing.assert_close(lp.double(), rlp, atol=1e-5, rtol=0)  # TF32 would be ~1e-3 off
    torch.testing.assert_close(gh.double(), rg, atol=2e-5 * float(rg.abs().max()), rtol=0)


def test_fixed_gpu_configs_per_shape_bucket(monkeypatch):
    # The GPU configs are fixed per (dtype, N) bucket; tests/test_sm90_compile.py compiles exactly these for sm_90
    # (no spills, wgmma in 16 bits). A change here must pass that check again.
    monkeypatch.setattr(fl, "INTERPRET", False)
    monkeypatch.setattr(fl, "_sm_count", lambda device: 132)
    dev = torch.device("cuda")
    big = fl._fwd_config(8192, 152064, 4096, dev, torch.bfloat16)
    assert big[:3] == (128, 128, 64) and big[4:] == (8, 3)
    assert big[3] == lm.wave_splits(64, 1188, 132)
    assert fl._fwd_config(1024, 152064, 4096, dev, torch.float16)[:3] == (64, 128, 64)
    assert fl._fwd_config(8192, 152064, 4096, dev, torch.float32)[:3] == (64, 64, 32)
    assert fl._dlogits_config(8192, 131072, 4096, torch.bfloat16) == (128, 128, 64, 8, 3)
    assert fl._dlogits_config(8192, 131072, 4096, torch.float32) == (64, 64, 32, 4, 2)
