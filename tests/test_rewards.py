"""group_advantages, interpolate_rewards, reward_anchors: test vectors, fp64 references, gradients, errors.

Test vectors: ../shared/research/dpo_grpo.md §5.5 (GRPO advantages) and ../shared/research/lacot.md §12 T1 / T1b
(reward anchors and interpolation). Every backend that can run here is checked.
"""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference
from lacot_kernels.ops import rewards as rewards_mod

from .helpers import DEVICES


def _backends(native_op: str):
    return [
        (d, b)
        for d in DEVICES
        for b in ["torch"]
        + (["triton"] if lk.triton_available(d) else [])
        + (["cuda"] if lk.native_available(d, native_op) else [])
    ]


ADV_BACKENDS = _backends("group_advantages_fwd_native")
INTERP_BACKENDS = _backends("interpolate_rewards_fwd_native")
NAN = float("nan")

# ---- group advantages: dpo_grpo.md §5.5 -------------------------------------------------------------------------
R55 = [1, 0, 0, 1, 1, 1, 1, 1, 0.2, 0.5, 0.9, 0.0]
V55 = {
    # TRL `group` (unbiased std, +1e-4)
    ("group", True, 1e-4): [
        0.865875,
        -0.865875,
        -0.865875,
        0.865875,
        0,
        0,
        0,
        0,
        -0.510624,
        0.255312,
        1.276559,
        -1.021247,
    ],
    # TRL `batch` (std over all 12 = 0.455937, +1e-4)
    ("batch", True, 1e-4): [
        1.096402,
        -1.096402,
        -1.096402,
        1.096402,
        0,
        0,
        0,
        0,
        -0.438561,
        0.219280,
        1.096402,
        -0.877121,
    ],
    # TRL `none` / Dr. GRPO
    ("none", True, 1e-4): [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.2, 0.1, 0.5, -0.4],
    # population-std variant (not TRL's)
    ("group", False, 1e-4): [0.9998, -0.9998, -0.9998, 0.9998, 0, 0, 0, 0, -0.589594, 0.294797, 1.473985, -1.179188],
}


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
@pytest.mark.parametrize("key", list(V55))
def test_vector_grpo_advantages(device, backend, key):
    scale, unbiased, eps = key
    r = torch.tensor(R55, device=device)
    a = lk.group_advantages(r, 4, scale=scale, unbiased=unbiased, eps=eps, backend=backend)
    assert a.dtype == torch.float32 and a.shape == (12,)
    torch.testing.assert_close(a.cpu(), torch.tensor(V55[key]), atol=1e-6, rtol=0)
    assert (a[4:8] == 0).all()  # the all-equal group: exactly 0
    # (B, G) input: the same numbers, the same shape back.
    a2 = lk.group_advantages(r.view(3, 4), 4, scale=scale, unbiased=unbiased, eps=eps, backend=backend)
    assert a2.shape == (3, 4)
    torch.testing.assert_close(a2.flatten(), a)


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
def test_vector_grpo_advantages_variants(device, backend):
    r = torch.tensor(R55, device=device)
    # verl: the same formula with eps = 1e-6 (dpo_grpo.md §5.5, first and last group).
    a = lk.group_advantages(r, 4, eps=1e-6, backend=backend).cpu()
    torch.testing.assert_close(a[0], torch.tensor(0.866024), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[8:], torch.tensor([-0.510753, 0.255376, 1.276882, -1.021505]), atol=1e-6, rtol=0)
    # G = 2 with rewards [1, 0].
    a = lk.group_advantages(torch.tensor([1.0, 0.0], device=device), 2, backend=backend).cpu()
    torch.testing.assert_close(a, torch.tensor([0.707007, -0.707007]), atol=1e-6, rtol=0)
    # TRL's NaN handling: [1, NaN, 0, 1] -> mean 2/3, std 0.577350, NaN -> 0.
    a = lk.group_advantages(torch.tensor([1.0, NAN, 0.0, 1.0], device=device), 4, backend=backend).cpu()
    torch.testing.assert_close(a, torch.tensor([0.577250, 0.0, -1.154501, 0.577250]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_and_singletons_are_exactly_zero(device, backend, scale):
    r = torch.tensor([3.5] * 8 + [1e6] * 4 + [-2.0] * 4, device=device)
    for eps in (1e-4, 0.0):
        a = lk.group_advantages(r, 4, scale=scale, eps=eps, backend=backend)
        assert (a == 0).all() and not torch.isnan(a).any()
    # Groups of size 1: the reward is its own mean (verl would return the raw reward instead).
    r1 = torch.tensor([0.3, -7.0, 1e4, NAN], device=device)
    for unbiased in (True, False):
        a = lk.group_advantages(r1, 1, scale=scale, unbiased=unbiased, backend=backend)
        assert (a == 0).all()
    # A group whose rewards are all missing.
    a = lk.group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0], device=device), 2, scale=scale, backend=backend)
    assert (a[:2] == 0).all() and torch.isfinite(a).all()


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [1, 3, 8, 37])
def test_advantages_match_reference(device, backend, dtype, scale, G):
    g = torch.Generator().manual_seed(G)
    r = (torch.randn(11 * G, generator=g) * 3).to(dtype)
    r[::7] = NAN
    for unbiased in (True, False):
        a = lk.group_advantages(r.to(device), G, scale=scale, unbiased=unbiased, backend=backend)
        ref = reference.group_advantages(r, G, scale=scale, unbiased=unbiased)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(a.cpu().double(), ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=tol)


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
def test_advantages_large_offset(device, backend):
    """Rewards 1e3 + O(0.1) in fp32: two-pass moments stay within ~1e-4 of fp64 on the same values, where the
    one-pass E[x^2] - E[x]^2 (x^2 ~ 1e6, ulp 0.06) loses the whole variance of 0.01."""
    g = torch.Generator().manual_seed(0)
    r = 1e3 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    for scale in ("group", "batch"):
        a = lk.group_advantages(r.float().to(device), 8, scale=scale, eps=0.0, backend=backend)
        ref = reference.group_advantages(r.float(), 8, scale=scale, eps=0.0)
        torch.testing.assert_close(a.cpu().double(), ref, atol=2e-3, rtol=0)
    x = r.float().view(-1, 8)
    one_pass = ((x * x).mean(1) - x.mean(1) ** 2) * 8 / 7
    assert ((one_pass.double() - r.view(-1, 8).var(1)).abs() > 1e-3).any()  # what the test guards against


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_gradients(device, backend, scale):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(20, generator=g, dtype=torch.float64)
    r[3] = NAN
    r[8:12] = 0.25  # an all-equal group: the std's subgradient 0
    r[16:18] = NAN  # a group with one reward left
    up = torch.randn(20, generator=g, dtype=torch.float64)
    x = r.clone().to(device).requires_grad_(True)
    (gx,) = torch.autograd.grad((lk.group_advantages(x, 4, scale=scale, backend=backend) * up.to(device)).sum(), x)
    y = r.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad((reference.group_advantages(y, 4, scale=scale) * up).sum(), y)
    torch.testing.assert_close(gx.cpu(), gy, atol=1e-9, rtol=1e-10)
    assert gx[3] == 0 and (gx[16:18] == 0).all()

    def f(t):
        return lk.group_advantages(t, 4, scale=scale, backend=backend)

    dense = torch.randn(12, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (dense,), fast_mode=backend == "triton")  # interpreter: few launches
    # bf16 rewards: the gradient comes back in bf16.
    xb = r.bfloat16().to(device).requires_grad_(True)
    (gb,) = torch.autograd.grad(lk.group_advantages(xb, 4, scale=scale, backend=backend).sum(), xb)
    assert gb.dtype == torch.bfloat16


@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
def test_advantages_multi_tile(device, backend, monkeypatch):
    """Groups longer than a tile and more groups than a program holds (column chunks and tile loops)."""
    monkeypatch.setattr(rewards_mod, "_adv_blocks", lambda n, G: (2, 4, 1))
    g = torch.Generator().manual_seed(2)
    r = torch.randn(7 * 11, generator=g, dtype=torch.float64)
    r[5] = NAN
    up = torch.randn(77, generator=g, dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        x = r.clone().to(device).requires_grad_(True)
        a = lk.group_advantages(x, 11, scale=scale, backend=backend)
        (gx,) = torch.autograd.grad((a * up.to(device)).sum(), x)
        y = r.clone().requires_grad_(True)
        ref = reference.group_advantages(y, 11, scale=scale)
        (gy,) = torch.autograd.grad((ref * up).sum(), y)
        torch.testing.assert_close(a.cpu(), ref.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(gx.cpu(), gy, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (
            (torch.randn(10), 4),
            {},
            ValueError,
            r"group_size must divide the number of rewards: 10 rewards .* groups of 4",
        ),
        ((torch.randn(3, 4), 2), {}, ValueError, r"one group per row, so group_size must be 4, got 2"),
        ((torch.randn(8), 0), {}, ValueError, r"group_size must be >= 1, got 0"),
        ((torch.randn(8), 2.0), {}, TypeError, r"group_size must be a Python int, got float"),
        (
            (torch.randn(2, 2, 2), 2),
            {},
            ValueError,
            r"rewards must be 1-D \(B \* G,\) or 2-D \(B, G\), got shape \(2, 2, 2\)",
        ),
        (
            (torch.arange(8), 2),
            {},
            TypeError,
            r"rewards must have dtype float32/bfloat16/float16/float64, got torch.int64",
        ),
        (([1.0, 2.0], 2), {}, TypeError, r"rewards must be a torch.Tensor, got list"),
        (
            (torch.randn(8), 2),
            dict(scale="std"),
            ValueError,
            r"scale must be one of \('group', 'batch', 'none'\), got 'std'",
        ),
        ((torch.randn(8), 2), dict(eps=-1e-4), ValueError, r"eps must be finite and >= 0, got -0.0001"),
        ((torch.randn(8), 2), dict(eps=float("inf")), ValueError, r"eps must be finite and >= 0, got inf"),
        ((torch.randn(8), 2), dict(unbiased=1), TypeError, r"unbiased must be a bool, got int"),
        ((torch.randn(8), 2), dict(backend="cudnn"), ValueError, r"backend must be one of .*got 'cudnn'"),
    ],
)
def test_advantages_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.group_advantages(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_one_launch_no_sync_gpu(backend, scale):
    if backend == "cuda" and not lk.native_available("cuda", "group_advantages_fwd_native"):
        pytest.skip("extension built without CUDA kernels")
    r = torch.randn(65536, device="cuda")
    lk.group_advantages(r, 8, scale=scale, backend=backend)  # compile / warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the op raises
        try:
            lk.group_advantages(r, 8, scale=scale, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


# ---- interpolation: lacot.md §12 T1 / T1b ----------------------------------------------------------------------------
def _f(k):
    """The reward oracle of T1 / T1b: f(k) = -(0.5 k + 0.01 k^2) for a prefix of k tokens."""
    return -(0.5 * k + 0.01 * k * k)


@pytest.mark.parametrize("device,backend", INTERP_BACKENDS)
def test_vector_t1b_paper_faithful_interpolation(device, backend):
    lengths = torch.tensor([15], device=device)
    mask = lk.reward_anchors(lengths, 4, max_len=15)
    assert mask[0].nonzero().flatten().tolist() == [0, 4, 8, 12, 15]
    k = torch.arange(16, dtype=torch.float64)
    values = torch.where(mask.cpu()[0], _f(k), NAN)[None].to(device)  # only the anchors are ever scored
    out = lk.interpolate_rewards(values.float(), mask, backend=backend)
    expected = [
        0,
        -0.54,
        -1.08,
        -1.62,
        -2.16,
        -2.78,
        -3.40,
        -4.02,
        -4.64,
        -5.34,
        -6.04,
        -6.74,
        -7.44,
        -8.21,
        -8.98,
        -9.75,
    ]
    torch.testing.assert_close(out[0].cpu(), torch.tensor(expected), atol=1e-5, rtol=0)


def test_vector_t1_code_faithful_anchor_positions():
    """T1: Tmin = 4, lambda = 4, eos at index 14 -> exact rewards at indices 0, 5, 9, 13 and the final one at 15.
    The code scores after token i = Tmin, Tmin + lambda, ..., i.e. min_len = Tmin + 1; unlike the code, the last
    partial segment (index 14) is closed by interpolation rather than left at 0."""
    mask = lk.reward_anchors(torch.tensor([15]), 4, min_len=5, max_len=20)
    assert mask[0].nonzero().flatten().tolist() == [0, 5, 9, 13, 15]
    values = torch.zeros(1, 21)
    values[0, 0] = -1.0
    for i in (5, 9, 13, 15):
        values[0, i] = _f(i)
    out = lk.interpolate_rewards(values, mask, backend="torch")[0]
    # Code-faithful anchor values and lerps (T1): indices 5..13.
    torch.testing.assert_close(out[5:14], torch.tensor([-2.75, -3.39, -4.03, -4.67, -5.31, -6.03, -6.75, -7.47, -8.19]))
    torch.testing.assert_close(out[14], torch.tensor((_f(13) + _f(15)) / 2))
    assert (out[16:] == 0).all()


def _random_masks(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, S, generator=g) < 0.25
    mask[0] = False  # no anchor
    mask[1] = False
    mask[1, S // 2] = True  # a single anchor in the middle
    mask[2] = False
    mask[2, 0] = True  # a single anchor at the start
    mask[3] = False
    mask[3, S - 1] = True  # a single anchor at the end
    mask[4] = True  # every position
    mask[5] = False
    mask[5, [0, 1, 2, S - 2, S - 1]] = True  # adjacent anchors and one long gap
    return mask


@pytest.mark.parametrize("device,backend", INTERP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_interpolation_matches_python_loop(device, backend, dtype):
    B, S = 9, 41
    mask = _random_masks(B, S, seed=3)
    g = torch.Generator().manual_seed(4)
    values = (torch.randn(B, S, generator=g) * 10).to(dtype)
    values = torch.where(mask, values, torch.tensor(NAN, dtype=dtype))  # non-anchor values are never read
    x = values.to(device).requires_grad_(True)
    out = lk.interpolate_rewards(x, mask.to(device), backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference.interpolate_rewards(values, mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol * 10, rtol=tol)
    assert (out[0] == 0).all()
    up = torch.randn(B, S, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((out * up.to(out.dtype).to(device)).sum(), x)
    assert gx.dtype == dtype
    M = reference.interpolation_matrix(mask)
    gref = (M.transpose(1, 2) @ up.unsqueeze(-1)).squeeze(-1)
    gtol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(gx.cpu().double(), gref, atol=gtol * 10, rtol=gtol)
    assert (gx.cpu()[~mask] == 0).all()  # only anchors receive gradient


@pytest.mark.parametrize("device,backend", INTERP_BACKENDS)
def test_interpolation_multi_chunk(device, backend, monkeypatch):
    """Rows longer than a kernel chunk: gaps and segmented sums that cross chunk boundaries."""
    monkeypatch.setattr(rewards_mod, "_interp_block", lambda S: (16, 1) if rewards_mod.INTERPRET else (128, 4))
    B, S = 6, 70
    mask = _random_masks(B, S, seed=5)
    mask[4] = False
    mask[4, [3, 40, 41, 69]] = True  # a gap spanning chunks
    g = torch.Generator().manual_seed(6)
    values = torch.randn(B, S, generator=g, dtype=torch.float64)
    x = values.to(device).requires_grad_(True)
    out = lk.interpolate_rewards(x, mask.to(device), backend=backend)
    torch.testing.assert_close(out.cpu(), reference.interpolate_rewards(values, mask), atol=1e-12, rtol=0)
    up = torch.randn(B, S, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((out * up.to(device)).sum(), x)
    M = reference.interpolation_matrix(mask)
    torch.testing.assert_close(gx.cpu(), (M.transpose(1, 2) @ up.unsqueeze(-1)).squeeze(-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device,backend", INTERP_BACKENDS)
def test_interpolation_gradcheck_and_shapes(device, backend):
    mask = _random_masks(6, 13, seed=7).to(device)
    v = torch.randn(6, 13, dtype=torch.float64, device=device, requires_grad=True)
    f = lambda t: lk.interpolate_rewards(t, mask, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (v,), fast_mode=backend == "triton")  # interpreter: few launches
    # Leading dimensions are kept; a 1-D row works too; empty shapes.
    v3 = torch.randn(2, 3, 13, device=device)
    m3 = mask[:3].expand(2, 3, 13)
    out = lk.interpolate_rewards(v3, m3, backend=backend)
    assert out.shape == (2, 3, 13)
    torch.testing.assert_close(out[1], lk.interpolate_rewards(v3[1], mask[:3], backend=backend))
    assert lk.interpolate_rewards(v3[0, 0], mask[5], backend=backend).shape == (13,)
    assert lk.interpolate_rewards(
        torch.zeros(0, 5, device=device), torch.zeros(0, 5, dtype=torch.bool, device=device), backend=backend
    ).shape == (0, 5)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (
            (torch.randn(2, 5), torch.ones(2, 4, dtype=torch.bool)),
            ValueError,
            r"anchor_mask must have the shape of values \(2, 5\), got \(2, 4\)",
        ),
        ((torch.randn(2, 5), torch.ones(2, 5)), TypeError, r"anchor_mask must have dtype bool, got torch.float32"),
        (
            (torch.arange(10).view(2, 5), torch.ones(2, 5, dtype=torch.bool)),
            TypeError,
            r"values must have dtype .*got torch.int64",
        ),
        ((torch.tensor(1.0), torch.tensor(True)), ValueError, r"values must have at least 1 dimension"),
    ],
)
def test_interpolation_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        lk.interpolate_rewards(*args)


# ---- reward_anchors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride,min_len", [(1, 0), (4, 0), (3, 5), (8, 64), (16, 65)])
def test_reward_anchors_match_reference(stride, min_len):
    lengths = torch.tensor([0, 1, 7, 40, 100, 99])
    got = lk.reward_anchors(lengths, stride, min_len=min_len, max_len=100)
    want = reference.reward_anchors(lengths, stride, min_len=min_len, max_len=100)
    assert got.dtype == torch.bool and got.shape == (6, 101)
    assert torch.equal(got, want)
    assert got[:, 0].all()
    assert got[torch.arange(6), lengths].all()  # the terminal state
    assert not got[0, 1:].any()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
        (dict(min_len=-1), ValueError, r"min_len must be >= 0, got -1"),
        (dict(max_len=-2), ValueError, r"max_len must be >= 0, got -2"),
        (dict(max_len=5), ValueError, r"lengths must be in \[0, max_len\] = \[0, 5\], got 9 at row 1"),
        (dict(lengths=torch.tensor([1.0])), TypeError, r"lengths must have dtype int32/int64, got torch.float32"),
        (dict(stride=2.5), TypeError, r"stride must be a Python int, got float"),
    ],
)
def test_reward_anchors_bad_input(kwargs, exc, match):
    args = dict(lengths=torch.tensor([3, 9]), stride=4, min_len=0, max_len=16)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lk.reward_anchors(args["lengths"], args["stride"], min_len=args["min_len"], max_len=args["max_len"])


# ---- registration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", ADV_BACKENDS)
def test_opcheck_group_advantages(device, backend):
    r = torch.randn(12, device=device, requires_grad=True)
    for scale in ("group", "batch", "none"):
        torch.library.opcheck(torch.ops.lacot.group_advantages.default, (r, 4, scale, 1e-4, True, backend))
    torch.library.opcheck(
        torch.ops.lacot.group_advantages_backward.default,
        (torch.randn(12, device=device), r.detach(), 4, "batch", 1e-4, False, backend),
    )


@pytest.mark.parametrize("device,backend", INTERP_BACKENDS)
def test_opcheck_interpolate_rewards(device, backend):
    mask = _random_masks(6, 11, seed=1).to(device)
    v = torch.randn(6, 11, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lacot.interpolate_rewards.default, (v, mask, backend))
    torch.library.opcheck(
        torch.ops.lacot.interpolate_rewards_backward.default, (torch.randn(6, 11, device=device), mask, backend)
    )


@pytest.mark.parametrize("device,backend", INTERP_BACKENDS)
def test_compile_fullgraph_lacot_pipeline(device, backend):
    """anchors -> interpolated rewards -> SubTB loss, and the GRPO advantages, in one graph with no break."""
    torch._dynamo.reset()
    B, T = 3, 12
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 5, 9], device=device)
    scores = torch.randn(B, T + 1, generator=g).to(device).requires_grad_(True)
    log_pf = (-torch.rand(B, T, generator=g)).to(device).requires_grad_(True)
    log_term = (torch.randn(B, T + 1, generator=g) - 2).to(device)
    rewards = torch.randn(B * 2, generator=g).to(device).requires_grad_(True)

    def step(scores, log_pf, rewards):
        mask = lk.reward_anchors(lengths, 4, max_len=T)
        log_r = lk.interpolate_rewards(scores, mask, backend=backend)
        loss = lk.subtb_loss(log_pf, log_term, log_r, lengths, reduction="mean", backend=backend)
        return loss + lk.group_advantages(rewards, 2, backend=backend).pow(2).sum()

    explanation = torch._dynamo.explain(step)(scores, log_pf, rewards)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(scores, log_pf, rewards)
    grads = torch.autograd.grad(out, (scores, log_pf, rewards))
    ref = step(scores, log_pf, rewards)
    ref_grads = torch.autograd.grad(ref, (scores, log_pf, rewards))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
