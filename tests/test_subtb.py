"""subtb_loss: the O(B T) scans against the brute-force O(T^2) pair sum, the LaCoT test vectors, gradients, errors.

Test vectors are from ../shared/research/lacot.md §12 (T2: the SubTB core; T3: the 2-row batch, paper-faithful and
code-faithful). Every backend that can run here is checked (the CPU twin of the CUDA kernels when the extension
is built, Triton through the interpreter, torch).
"""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference
from lacot_kernels.ops import subtb as subtb_mod

from .helpers import DEVICES

NATIVE = "subtb_fwd_native"
BACKENDS = [
    (d, b)
    for d in DEVICES
    for b in ["torch"]
    + (["triton"] if lk.triton_available(d) else [])
    + (["cuda"] if lk.native_available(d, NATIVE) else [])
]


def _inputs(B, T, *, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    log_pf = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0
    log_term = torch.randn(B, T + 1, generator=g, dtype=torch.float64) - 3.0
    log_reward = scale * torch.cumsum(torch.randn(B, T + 1, generator=g, dtype=torch.float64), 1)
    return log_pf.to(dtype), log_term.to(dtype), log_reward.to(dtype)


def _run(inputs, lengths, *, device, backend, decay, reduction="none", grad_seed=3):
    xs = [x.to(device).detach().requires_grad_(True) for x in inputs]
    out = lk.subtb_loss(*xs, lengths.to(device), decay=decay, reduction=reduction, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * g.to(out.dtype).to(device)).sum(), xs)
    return out, grads, g


def _reference(inputs, lengths, *, decay, reduction="none", g=None):
    xs = [x.detach().cpu().double().requires_grad_(True) for x in inputs]
    out = reference.subtb_loss(*xs, lengths.cpu(), decay=decay, reduction=reduction)
    grads = torch.autograd.grad((out * g).sum(), xs) if g is not None else None
    return out, grads


# ---- the LaCoT test vectors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("decay,num,den", [(1.0, 8.75, 6.0), (0.5, 6.9375, 4.25)])
def test_vector_t2_subtb_core(device, backend, decay, num, den):
    """lacot.md §12 T2: delta = [1, -2, 0.5] (log_pf = delta, zero flows), so C = [0, 1, -1, -0.5]."""
    log_pf = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64, device=device, requires_grad=True)
    zeros = torch.zeros(1, 4, dtype=torch.float64, device=device)
    log_term = zeros.clone().requires_grad_(True)
    log_reward = zeros.clone().requires_grad_(True)
    lengths = torch.tensor([3], device=device)
    loss = lk.subtb_loss(log_pf, log_term, log_reward, lengths, decay=decay, reduction="none", backend=backend)
    torch.testing.assert_close(loss.cpu(), torch.tensor([num], dtype=torch.float64), atol=1e-12, rtol=0)
    mean = lk.subtb_loss(log_pf, log_term, log_reward, lengths, decay=decay, reduction="mean", backend=backend)
    torch.testing.assert_close(float(mean.detach()), num / den, atol=1e-12, rtol=0)
    if decay == 1.0:
        g_pf, g_t, g_r = torch.autograd.grad(loss.sum(), (log_pf, log_term, log_reward))
        # T2: d num / d delta = [-1, -10, -3] and d num / d C = [., 9, -7, -3] (C_0's entry: 1, so they sum to 0);
        # dL/dlogF_t = -dL/dC_t, logF = log_reward - log_term.
        torch.testing.assert_close(g_pf.cpu(), torch.tensor([[-1.0, -10.0, -3.0]], dtype=torch.float64))
        torch.testing.assert_close(g_r.cpu(), torch.tensor([[-1.0, -9.0, 7.0, 3.0]], dtype=torch.float64))
        torch.testing.assert_close(g_t.cpu(), torch.tensor([[1.0, 9.0, -7.0, -3.0]], dtype=torch.float64))


def _t3_paper_inputs(dtype=torch.float64):
    """lacot.md §12 T3, paper-faithful: row 0 has n = 3, row 1 n = 5; the terminal reward logR[e+1] is moved to
    state n; entries past a row's length are garbage (never read)."""
    log_pf = torch.tensor([[-0.5, -1.0, -0.2, 7.0, 7.0, 7.0], [-0.4, -0.6, -0.9, -0.1, -0.7, 7.0]], dtype=dtype)
    log_term = torch.tensor([[-3.0, -2.5, -1.5, -0.3, 9, 9, 9], [-4.0, -3.0, -2.0, -2.5, -1.0, -0.2, 9]], dtype=dtype)
    log_reward = torch.tensor([[-6.0, -5.5, -5.0, -4.2, 9, 9, 9], [-7.0, -6.2, -5.9, -5.1, -4.8, -4.4, 9]], dtype=dtype)
    return log_pf, log_term, log_reward, torch.tensor([3, 5])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_vector_t3_paper_faithful(device, backend):
    log_pf, log_term, log_reward, lengths = (x.to(device) for x in _t3_paper_inputs())
    args = (log_pf, log_term, log_reward, lengths)
    rows = lk.subtb_loss(*args, reduction="none", backend=backend)
    torch.testing.assert_close(rows.cpu(), torch.tensor([2.27, 26.09], dtype=torch.float64), atol=1e-10, rtol=0)
    assert abs(float(lk.subtb_loss(*args, reduction="sum", backend=backend)) - 28.36) < 1e-10
    # The pooled (code-style) mean: (2.27 + 26.09) / (6 + 15) windows.
    assert abs(float(lk.subtb_loss(*args, reduction="mean", backend=backend)) - 1.350476) < 1e-6

    # Row-0 gradients of the per-row loss num / den (den = 6 windows).
    x = [log_pf.clone().requires_grad_(True), log_term.clone().requires_grad_(True)]
    row0 = lk.subtb_loss(x[0], x[1], log_reward, lengths, reduction="none", backend=backend)[0] / 6.0
    g_pf, g_t = torch.autograd.grad(row0, x)
    torch.testing.assert_close(
        g_pf[0, :3].cpu(), torch.tensor([-0.766667, -0.866667, -0.3], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        g_t[0, :4].cpu(), torch.tensor([0.766667, 0.1, -0.566667, -0.3], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert (g_pf[0, 3:] == 0).all() and (g_t[0, 4:] == 0).all() and (g_pf[1] == 0).all()


@pytest.mark.parametrize("decay,expected", [(1.0, 5.597619), (0.9, 5.115950)])
def test_vector_t3_code_faithful_official_formulation(decay, expected):
    """lacot.md §12 T3, code-faithful: the released loss with its eos-count mask (`cumsum(text == eos) > 1`) counts
    every window of both rows. This pins the official formulation the benchmark times against."""
    text = torch.tensor([[7, 7, 7, 2, 0, 0, 2], [7, 7, 7, 7, 7, 2, 2]])
    log_pf = torch.tensor([[-0.5, -1.0, -0.2, -0.3, 0, 0, 0], [-0.4, -0.6, -0.9, -0.1, -0.7, -0.2, 0]])
    log_eos = torch.tensor([[-3.0, -2.5, -1.5, -0.3, 0, 0, 0], [-4.0, -3.0, -2.0, -2.5, -1.0, -0.2, 0]])
    log_r = torch.tensor([[-6.0, -5.5, -5.0, -4.6, -4.2, 0, 0], [-7.0, -6.2, -5.9, -5.1, -4.8, -4.5, -4.4]])
    excluded = ((text == 2).cumsum(-1) > 1)[:, :6]
    loss = reference.subtb_loss_official(log_pf[:, :-1], log_eos, log_r, excluded, decay=decay, dtype=torch.float64)
    assert abs(float(loss) - expected) < 1e-6


def test_official_formulation_with_per_row_mask_is_the_mean():
    inputs = _inputs(3, 17, dtype=torch.float64, seed=5)
    lengths = torch.tensor([17, 0, 9])
    excluded = torch.arange(17)[None, :] >= lengths[:, None]
    for decay in (1.0, 0.8):
        official = reference.subtb_loss_official(*inputs, excluded, decay=decay, dtype=torch.float64)
        ours = lk.subtb_loss(*inputs, lengths, decay=decay, reduction="mean", backend="torch")
        torch.testing.assert_close(ours, official, atol=1e-10, rtol=1e-12)


# ---- closed form / scans == brute force ---------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("decay", [1.0, 0.9, 0.0])
def test_matches_bruteforce(device, backend, dtype, decay):
    B, T = 5, 23
    inputs = _inputs(B, T, dtype=dtype, seed=int(decay * 10) + 1, scale=3.0)
    lengths = torch.tensor([0, 1, T, 11, T - 1])
    out, grads, g = _run(inputs, lengths, device=device, backend=backend, decay=decay)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(gr.dtype == dtype for gr in grads)
    # The reference sees the same (rounded) input values and the decay the kernels see.
    w = decay if dtype == torch.float64 else float(torch.tensor(decay, dtype=torch.float32))
    ref, ref_grads = _reference(inputs, lengths, decay=w, g=g)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol * scale, rtol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        gscale = float(want.abs().max())
        gtol = tol if dtype != torch.bfloat16 else 1e-2  # gradients are stored in the input dtype
        torch.testing.assert_close(got.cpu().double(), want, atol=gtol * gscale, rtol=gtol)
    assert float(out[0].detach()) == 0.0  # length 0: no pair
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_multi_chunk_rows(device, backend, monkeypatch):
    """Rows longer than one kernel chunk (the carried summaries across chunks): force 16-state chunks."""
    monkeypatch.setattr(subtb_mod, "_block", lambda T: (16, 1) if subtb_mod.INTERPRET else (128, 2))
    B, T = 3, 50
    inputs = _inputs(B, T, dtype=torch.float64, seed=11, scale=2.0)
    lengths = torch.tensor([T, 33, 16])
    for decay in (1.0, 0.7):
        out, grads, g = _run(inputs, lengths, device=device, backend=backend, decay=decay)
        ref, ref_grads = _reference(inputs, lengths, decay=decay, g=g)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-9, rtol=1e-12)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.cpu(), want, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_gradcheck_fp64(device, backend, decay):
    inputs = [x.to(device).requires_grad_(True) for x in _inputs(2, 6, dtype=torch.float64, seed=2)]
    lengths = torch.tensor([6, 4], device=device)

    def f(log_pf, log_term, log_reward):
        return lk.subtb_loss(log_pf, log_term, log_reward, lengths, decay=decay, reduction="none", backend=backend)

    # The interpreter pays ~0.1 s per launch: Triton gets the random-projection check (a few launches).
    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6, fast_mode=backend == "triton")


def test_gradcheck_reference():
    inputs = [x.requires_grad_(True) for x in _inputs(2, 5, dtype=torch.float64, seed=4)]
    lengths = torch.tensor([5, 3])
    f = lambda a, b, c: reference.subtb_loss(a, b, c, lengths, decay=0.8, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(inputs))


# ---- numerics ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("decay", [1.0, 0.99])
def test_large_flows_no_cancellation(device, backend, decay):
    """|logR| ~ 1.5e3 and C drifting to ~1e3 (the untrained regime): fp32 results stay within a few ulps of the
    fp64 brute force, where the textbook closed form (n+1) sum C^2 - (sum C)^2 in fp32 loses ~1e-5 relative."""
    T = 48 if backend == "triton" else 400
    g = torch.Generator().manual_seed(7)
    t = torch.arange(T + 1, dtype=torch.float64)
    log_reward = (-1500.0 + 0.5 * t + torch.randn(3, T + 1, generator=g, dtype=torch.float64)).float()
    log_term = (0.3 * torch.randn(3, T + 1, generator=g) - 3.0).float()
    log_pf = (-2.0 * torch.rand(3, T, generator=g) - 2.0).float()
    lengths = torch.tensor([T, T - 7, T // 2])
    inputs = (log_pf, log_term, log_reward)
    out, grads, gw = _run(inputs, lengths, device=device, backend=backend, decay=decay)
    w = float(torch.tensor(decay, dtype=torch.float32))
    ref, ref_grads = _reference(inputs, lengths, decay=w, g=gw)
    # Powers of the decay are products of fp32 numbers: relative error ~ sqrt(T) eps for decay < 1.
    rtol = 2e-6 if decay == 1.0 else 1e-5
    torch.testing.assert_close(out.cpu().double(), ref, atol=0, rtol=rtol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.cpu().double(), want, atol=rtol * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_padding_is_never_read(device, backend):
    B, T = 3, 12
    log_pf, log_term, log_reward = (x.clone() for x in _inputs(B, T, seed=9))
    lengths = torch.tensor([5, 0, 12])
    for row, n in enumerate(lengths.tolist()):
        log_pf[row, n:] = float("nan")
        log_term[row, n + 1 :] = float("inf")
        log_reward[row, n + 1 :] = float("-inf")
    out, grads, g = _run((log_pf, log_term, log_reward), lengths, device=device, backend=backend, decay=0.9)
    assert torch.isfinite(out).all()
    ref, _ = _reference((log_pf, log_term, log_reward), lengths, decay=float(torch.tensor(0.9)))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-6, atol=1e-6)
    for row, n in enumerate(lengths.tolist()):
        assert (grads[0][row, n:] == 0).all()
        assert (grads[1][row, n + 1 :] == 0).all() and (grads[2][row, n + 1 :] == 0).all()
        assert torch.isfinite(grads[0][row]).all() and torch.isfinite(grads[2][row]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_reductions_and_empty(device, backend):
    inputs = [x.to(device) for x in _inputs(3, 8, seed=1)]
    lengths = torch.tensor([8, 3, 0], device=device)
    rows = lk.subtb_loss(*inputs, lengths, reduction="none", backend=backend)
    total = lk.subtb_loss(*inputs, lengths, reduction="sum", backend=backend)
    mean = lk.subtb_loss(*inputs, lengths, reduction="mean", backend=backend)
    assert rows.shape == (3,) and total.shape == () and mean.shape == ()
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(mean, rows.sum() / (36 + 6))  # n(n+1)/2 windows with decay 1
    empty = lk.subtb_loss(*inputs, torch.zeros(3, dtype=torch.int64, device=device), reduction="mean", backend=backend)
    assert float(empty) == 0.0
    # T = 0 (every row has only its initial state) and B = 0.
    z = lk.subtb_loss(
        torch.zeros(2, 0), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), backend=backend
    )
    assert float(z) == 0.0
    e = lk.subtb_loss(
        torch.zeros(0, 4),
        torch.zeros(0, 5),
        torch.zeros(0, 5),
        torch.zeros(0, dtype=torch.int64),
        reduction="none",
        backend=backend,
    )
    assert e.shape == (0,)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in BACKENDS if b != "triton"])
def test_long_rows_linear_memory(device, backend):
    """T = 2^17: a T x T tensor would need 64 GiB; O(T) work and memory finish in about a second. Oracle: the
    decay-1 closed form (n + 1) sum (C - mean C)^2 in fp64 (fine there)."""
    T = 1 << 17
    g = torch.Generator().manual_seed(0)
    log_pf = (-torch.rand(1, T, generator=g)).to(device)
    log_term = torch.full((1, T + 1), -2.0, device=device)
    log_reward = (torch.randn(1, T + 1, generator=g) * 0.1).to(device)
    lengths = torch.tensor([T], device=device)
    x = log_pf.clone().requires_grad_(True)
    loss = lk.subtb_loss(x, log_term, log_reward, lengths, backend=backend)
    (gx,) = torch.autograd.grad(loss, x)
    lf = log_reward.double() - log_term.double()
    c = torch.cat([torch.zeros(1, dtype=torch.float64), (lf[0, :-1] + log_pf[0].double() - lf[0, 1:]).cumsum(0)])
    expected = (T + 1) * ((c - c.mean()) ** 2).sum()
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5 * float(expected)
    assert torch.isfinite(gx).all()


def test_invalid_lengths_give_nan_in_the_kernels():
    """What an unchecked CUDA call gets for lengths outside [0, T] (the host check is skipped there): NaN rows."""
    inputs = _inputs(3, 6, seed=3)
    lengths = torch.tensor([7, -1, 4])
    g = torch.ones(3)
    for name in (
        ["torch"]
        + (["triton"] if lk.triton_available("cpu") else [])
        + (["cuda"] if lk.native_available("cpu", NATIVE) else [])
    ):
        loss, weight = subtb_mod.FWD[name](*inputs, lengths, 1.0)
        assert torch.isnan(loss[:2]).all() and torch.isnan(weight[:2]).all() and torch.isfinite(loss[2])
        g_pf, g_t, g_r = subtb_mod.BWD[name](g, *inputs, lengths, 1.0)
        assert torch.isnan(g_pf[:2]).all() and torch.isnan(g_r[:2]).all() and torch.isfinite(g_t[2]).all()


# ---- bad input -----------------------------------------------------------------------------------------------------
PF, LT, LR = _inputs(2, 5)
LEN = torch.tensor([5, 2])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(log_pf=PF[:, :4]), ValueError, r"log_term must have shape \(B, T \+ 1\) = \(2, 5\), got \(2, 6\)"),
        (dict(log_term=LT[:, :5]), ValueError, r"log_term must have shape \(B, T \+ 1\) = \(2, 6\), got \(2, 5\)"),
        (dict(log_reward=LR[:1]), ValueError, r"log_reward must have shape \(B, T \+ 1\) = \(2, 6\), got \(1, 6\)"),
        (dict(lengths=LEN[:1]), ValueError, r"lengths must have shape \(B,\) = \(2,\), got \(1,\)"),
        (dict(log_pf=PF[0]), ValueError, r"log_pf must be 2-D \(B, T\), got shape \(5,\)"),
        (dict(lengths=torch.tensor([6, 2])), ValueError, r"lengths must be in \[0, T\] = \[0, 5\].*got 6 at row 0"),
        (dict(lengths=torch.tensor([5, -1])), ValueError, r"lengths must be in \[0, T\].*got -1 at row 1"),
        (dict(lengths=LEN.float()), TypeError, r"lengths must have dtype int32/int64, got torch.float32"),
        (
            dict(log_pf=PF.long()),
            TypeError,
            r"log_pf must have dtype float32/bfloat16/float16/float64, got torch.int64",
        ),
        (
            dict(log_term=LT.double()),
            TypeError,
            r"log_term must have the dtype of log_pf \(torch.float32\), got torch.float64",
        ),
        (dict(log_reward=[[0.0]]), TypeError, r"log_reward must be a torch.Tensor, got list"),
        (dict(decay=-0.1), ValueError, r"decay must be finite and >= 0, got -0.1"),
        (dict(decay=float("nan")), ValueError, r"decay must be finite and >= 0, got nan"),
        (dict(decay="1"), TypeError, r"decay must be a Python float, got str"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of \('sum', 'mean', 'none'\), got 'avg'"),
        (dict(backend="cudnn"), ValueError, r"backend must be one of .*got 'cudnn'"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(log_pf=PF, log_term=LT, log_reward=LR, lengths=LEN)
    opts = {k: kwargs.pop(k) for k in ("decay", "reduction", "backend") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lk.subtb_loss(args["log_pf"], args["log_term"], args["log_reward"], args["lengths"], **opts)


# ---- registration --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    inputs = [x.to(device).requires_grad_(True) for x in _inputs(3, 7, seed=6)]
    lengths = torch.tensor([7, 0, 3], device=device)
    torch.library.opcheck(torch.ops.lacot.subtb_loss.default, (*inputs, lengths, 0.8, backend))
    g = torch.randn(3, device=device)
    torch.library.opcheck(
        torch.ops.lacot.subtb_loss_backward.default, (g, *(x.detach() for x in inputs), lengths, 1.0, backend)
    )


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    inputs = [x.to(device).requires_grad_(True) for x in _inputs(2, 9, seed=8)]
    lengths = torch.tensor([9, 4], device=device)

    def step(log_pf, log_term, log_reward):
        return lk.subtb_loss(log_pf, log_term, log_reward, lengths, decay=0.9, reduction="mean", backend=backend)

    explanation = torch._dynamo.explain(step)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    ref = step(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
