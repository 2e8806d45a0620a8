"""The compiled token_logprobs kernels (csrc/), through their CPU twin, against an fp64 torch reference.

The CPU twin computes every number with the same helpers as the CUDA kernels (csrc/token_logprobs_math.h), so
these CPU-only tests check the kernels' math: online max / sum rescaling, entropy in shifted form, the
gradient formula, ignored and out-of-range targets, huge and masked logits.
"""

from __future__ import annotations

import pytest
import torch

import lacot_kernels  # noqa: F401  (defines the schemas and loads lacot_kernels._C when it was built)

HAS_CPU_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("lacot::token_logprobs_fwd_native", "CPU")
pytestmark = pytest.mark.skipif(
    not HAS_CPU_KERNELS,
    reason="lacot_kernels._C is not built (no CPU kernels for lacot::token_logprobs_*_native); build it with "
    "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`",
)

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fwd(x, y, T=1.0, ignore_index=IGNORE, compute_entropy=True):
    return torch.ops.lacot.token_logprobs_fwd_native(x, y, T, ignore_index, compute_entropy)


def bwd(g_logp, g_ent, x, y, stats, entropy, T=1.0, ignore_index=IGNORE):
    return torch.ops.lacot.token_logprobs_bwd_native(g_logp, g_ent, x, y, stats, entropy, T, ignore_index)


def reference(x, y, T, ignore_index, g_logp=None, g_ent=None):
    """fp64 logp, entropy (and d(g_logp.logp + g_ent.H)/dx) of the same values as `x`, upcast.

    Ignored rows: 0; rows with an out-of-range target: NaN. -inf logits are replaced by -1e30 (exactly the
    same probabilities in fp64) so that autograd does not form 0 * -inf.
    """
    N, V = x.shape
    xd = x.detach().double().clone()
    xd[xd == float("-inf")] = -1e30
    xd.requires_grad_(g_logp is not None)
    lsm = torch.log_softmax(xd / T, dim=-1)
    ignored = y == ignore_index
    invalid = ~ignored & ((y < 0) | (y >= V))
    logp = lsm.gather(-1, y.clamp(0, V - 1)[:, None])[:, 0]
    ent = -(lsm.exp() * lsm).sum(-1)
    grad = None
    if g_logp is not None:
        loss = (g_logp.double() * logp).sum()
        if g_ent is not None:
            loss = loss + (g_ent.double() * ent).sum()
        (grad,) = torch.autograd.grad(loss, xd)
        grad = grad.masked_fill(ignored[:, None], 0.0).masked_fill(invalid[:, None], float("nan"))
    logp = logp.detach().masked_fill(ignored, 0.0).masked_fill(invalid, float("nan"))
    ent = ent.detach().masked_fill(ignored, 0.0).masked_fill(invalid, float("nan"))
    return logp, ent, grad


def assert_close(actual, expected, atol, what, rtol=4e-7):
    """|actual - expected| <= atol + rtol |expected| (rtol: the fp32 rounding of huge values), NaN == NaN."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    if (~nan_e).any():
        a, e = actual[~nan_e], expected[~nan_e]
        assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: inf pattern differs"
        fin = torch.isfinite(e)
        assert torch.equal(a[~fin], e[~fin]), f"{what}: infinities differ"
        excess = ((a - e).abs() - rtol * e.abs())[fin]
        err = excess.max().item() if excess.numel() else 0.0
        assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g} (+ {rtol:g} relative)"


def make_logits(N, V, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * scale
    if N > 1 and V > 1:
        x[1] = torch.randn(V, generator=g)  # a confident row: one logit 30 above the rest
        x[1, (7 * V) // 11] += 30.0
    return x.to(dtype)


def make_targets(N, V, seed):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, V, (N,), generator=g)
    if N > 1 and V > 1:
        y[1] = (7 * V) // 11  # the confident row's favourite ...
        y[0] = (y[1] + 1) % V  # ... and a row whose target is not it
    y[2::5] = IGNORE  # ignored rows
    return y


def grad_atol(dtype, ref_grad):
    if dtype == torch.float32:
        return 1e-5
    scale = ref_grad[~torch.isnan(ref_grad)].abs().max().item()
    return 2 * torch.finfo(dtype).eps * scale + 1e-7


def check_case(x, y, T, ignore_index=IGNORE, with_backward=True):
    dtype = x.dtype
    N = x.shape[0]
    logp, ent, stats = fwd(x, y, T, ignore_index, True)
    assert logp.dtype == ent.dtype == stats.dtype == torch.float32
    assert logp.shape == ent.shape == (N,) and stats.shape == (N, 2)
    g = torch.Generator().manual_seed(123)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    ref_logp, ref_ent, ref_grad = reference(x, y, T, ignore_index, g_logp, g_ent)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert_close(logp, ref_logp, tol, "logp")
    assert_close(ent, ref_ent, tol, "entropy")

    ignored = y == ignore_index
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (stats[ignored] == 0).all()

    # Without the entropy: same log-probs and statistics, an empty entropy.
    logp2, ent2, stats2 = fwd(x, y, T, ignore_index, False)
    assert ent2.shape == (0,) and ent2.dtype == torch.float32
    assert_close(logp2, logp, 1e-6, "logp (compute_entropy=False)")
    assert_close(stats2, stats, 1e-6, "stats (compute_entropy=False)")
    if not with_backward:
        return

    grad = bwd(g_logp, g_ent, x, y, stats, ent, T, ignore_index)
    assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
    assert_close(grad, ref_grad, grad_atol(dtype, ref_grad), "grad (logp + entropy)")
    assert (grad[ignored] == 0).all()

    # Without grad_entropy the entropy tensor may be empty and is not read.
    _, _, ref_grad_lp = reference(x, y, T, ignore_index, g_logp, None)
    grad_lp = bwd(g_logp, None, x, y, stats, torch.empty(0), T, ignore_index)
    assert_close(grad_lp, ref_grad_lp, grad_atol(dtype, ref_grad_lp), "grad (logp only)")


@pytest.mark.parametrize("V", [1, 3, 1000, 32003])
@pytest.mark.parametrize("T", [0.6, 1.0, 1.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_fp64_reference(dtype, T, V):
    N = {1: 9, 3: 17, 1000: 33, 32003: 6}[V]
    x = make_logits(N, V, dtype, seed=V)
    y = make_targets(N, V, seed=V)
    check_case(x, y, T)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_huge_logits(dtype):
    N, V = 8, 5000
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(N, V, generator=g) * 4  # differences must be formed before scaling
    x[3] = torch.where(torch.rand(V, generator=g) < 0.5, -1e4, 1e4)  # +-1e4 mixture
    x[4] = -1e4 + torch.randn(V, generator=g)
    x[5, :4000] = -1e4  # the max far away in a later vocabulary block
    y = torch.randint(0, V, (N,), generator=g)
    y[6] = IGNORE
    for T in (0.6, 1.3):
        check_case(x.to(dtype), y, T)


def test_masked_logits():
    """-inf logits (a masked vocabulary) contribute nothing, and never produce NaN (no 0 * -inf)."""
    N, V = 6, 4500
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, V, generator=g)
    x[:, 100:2500] = float("-inf")  # a whole vocabulary block and parts of two others
    x[2, :] = float("-inf")
    x[2, 4321] = 0.5  # a single live logit, in the last block
    y = torch.tensor([0, 3000, 4321, 4499, IGNORE, 99])
    logp, ent, stats = fwd(x, y, 0.8)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(stats).all()
    assert logp[2].item() == 0.0 and abs(ent[2].item()) < 1e-6
    check_case(x, y, 0.8)
    # A masked target has probability 0.
    logp, _, _ = fwd(x, torch.tensor([200, 0, 4321, 0, 0, 0]), 0.8)
    assert logp[0].item() == float("-inf")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_out_of_range_targets_give_nan(dtype):
    N, V = 6, 300
    x = make_logits(N, V, dtype, seed=5)
    y = torch.tensor([0, V, -1, 10**12, IGNORE, V - 1])
    logp, ent, stats = fwd(x, y)
    bad = torch.tensor([False, True, True, True, False, False])
    assert torch.isnan(logp[bad]).all() and torch.isnan(ent[bad]).all()
    assert torch.isfinite(logp[~bad]).all() and torch.isfinite(ent[~bad]).all()
    grad = bwd(torch.ones(N), torch.ones(N), x, y, stats, ent)
    assert torch.isnan(grad[bad].float()).all()
    assert (grad[4] == 0).all() and torch.isfinite(grad[[0, 5]].float()).all()
    check_case(x, y, 1.0)


def test_in_range_ignore_index():
    N, V = 5, 50
    x = make_logits(N, V, torch.float32, seed=6)
    y = torch.tensor([0, 1, 0, 7, 49])
    check_case(x, y, 1.0, ignore_index=0)
    logp, ent, stats = fwd(x, y, 1.0, 0)
    assert logp[0] == 0 and logp[2] == 0 and (stats[[0, 2]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_empty_batch(dtype):
    x = torch.empty(0, 1000, dtype=dtype)
    y = torch.empty(0, dtype=torch.long)
    logp, ent, stats = fwd(x, y)
    assert logp.shape == (0,) and ent.shape == (0,) and stats.shape == (0, 2)
    assert fwd(x, y, compute_entropy=False)[1].shape == (0,)
    grad = bwd(torch.empty(0), torch.empty(0), x, y, stats, ent)
    assert grad.shape == (0, 1000) and grad.dtype == dtype
    assert bwd(torch.empty(0), None, x, y, stats, torch.empty(0)).shape == (0, 1000)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_strided_rows(dtype):
    """Rows with a stride wider than V (a slice of a wider tensor) and a start offset."""
    N, V = 12, 2100
    wide = make_logits(N, V + 13, dtype, seed=7)
    x = wide[:, 3 : 3 + V]
    assert not x.is_contiguous() and x.stride() == (V + 13, 1)
    y = make_targets(N, V, seed=7)
    check_case(x, y, 1.3)
    ref = fwd(x.contiguous(), y, 1.3)
    for a, b in zip(fwd(x, y, 1.3), ref, strict=True):
        assert torch.equal(a, b)
    stats, ent = ref[2], ref[1]
    g = torch.randn(N)
    assert torch.equal(bwd(g, g, x, y, stats, ent, 1.3), bwd(g, g, x.contiguous(), y, stats, ent, 1.3))


def test_strided_upstream_grads():
    """grad_logp / grad_entropy may be strided or expanded (autograd hands over expanded gradients)."""
    N, V = 7, 900
    x = make_logits(N, V, torch.float32, seed=9)
    y = make_targets(N, V, seed=9)
    logp, ent, stats = fwd(x, y)
    g_logp = torch.full((1,), 0.75).expand(N)
    g_ent = torch.randn(2 * N)[::2]
    assert g_logp.stride() == (0,) and g_ent.stride() == (2,)
    grad = bwd(g_logp, g_ent, x, y, stats, ent)
    assert torch.equal(grad, bwd(g_logp.contiguous(), g_ent.contiguous(), x, y, stats, ent))
    _, _, ref = reference(x, y, 1.0, IGNORE, g_logp, g_ent)
    assert_close(grad, ref, 1e-5, "grad (strided upstream gradients)")


def test_broadcast_rows():
    """A row stride of 0 (an expanded row) is read correctly."""
    V = 777
    row = torch.randn(1, V)
    x = row.expand(4, V)
    y = torch.tensor([1, 2, IGNORE, 700])
    check_case(x, y, 1.0)


def test_nan_logit_propagates():
    x = torch.randn(3, 5000)
    x[0, 4000] = float("nan")
    x[1, 0] = float("nan")
    logp, ent, _ = fwd(x, torch.tensor([1, 2, 3]))
    assert torch.isnan(logp[:2]).all() and torch.isnan(ent[:2]).all() and torch.isfinite(logp[2])


def test_thread_count_does_not_change_results():
    x = make_logits(64, 3000, torch.float32, seed=8)
    y = make_targets(64, 3000, seed=8)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fwd(x, y, 0.7)
        g1 = bwd(torch.ones(64), torch.ones(64), x, y, one[2], one[1], 0.7)
    finally:
        torch.set_num_threads(n)
    many = fwd(x, y, 0.7)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g1, bwd(torch.ones(64), torch.ones(64), x, y, many[2], many[1], 0.7))


def test_argument_errors():
    x = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    stats = torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="logits.*float32, bfloat16 or float16.*Double"):
        fwd(x.double(), y)
    with pytest.raises(RuntimeError, match="logits.*2-D"):
        fwd(x[None], y)
    with pytest.raises(RuntimeError, match="unit stride"):
        fwd(x.t(), torch.randint(0, 4, (10,)))
    with pytest.raises(RuntimeError, match="targets.*Long.*Int"):
        fwd(x, y.int())
    with pytest.raises(RuntimeError, match=r"targets.*shape \(4,\)"):
        fwd(x, y[:3])
    with pytest.raises(RuntimeError, match="targets.*contiguous"):
        fwd(x, torch.randint(0, 10, (8,))[::2])
    with pytest.raises(RuntimeError, match="temperature"):
        fwd(x, y, 0.0)
    with pytest.raises(RuntimeError, match="at least one column"):
        fwd(torch.empty(4, 0), y)
    with pytest.raises(RuntimeError, match="grad_logp.*Float"):
        bwd(torch.ones(4).double(), None, x, y, stats, torch.empty(0))
    with pytest.raises(RuntimeError, match=r"stats.*shape \(4, 2\)"):
        bwd(torch.ones(4), None, x, y, stats[:, :1], torch.empty(0))
    with pytest.raises(RuntimeError, match="entropy"):
        bwd(torch.ones(4), torch.ones(4), x, y, stats, torch.empty(0))
