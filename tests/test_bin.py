"""bin_rank: LaCoT's BiN ranking against research vector T6 (lacot.md §12), a per-question Python loop (the
fp64 reference), absent candidates, ties, NaN, gradients, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import lacot_kernels as lk
from lacot_kernels import reference

# T6: three rationales |Z| = [50, 80, 70], three answers |Y| = [10, 10, 20]; S[j][i] = joint summed log-lik of
# answer j with rationale i; M = S / (|Z_i| + |Y_j|) the per-token (length-normalized) matrix.
S = torch.tensor([[-30.0, -45.0, -38.0], [-28.0, -60.0, -90.0], [-35.0, -44.0, -40.0]], dtype=torch.float64)
Z_LEN = torch.tensor([50.0, 80.0, 70.0], dtype=torch.float64)
Y_LEN = torch.tensor([10.0, 10.0, 20.0], dtype=torch.float64)
M = S / (Z_LEN[None, :] + Y_LEN[:, None])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vector_t6(dtype):
    torch.testing.assert_close(
        M,
        torch.tensor(
            [[-0.5, -0.5, -0.475], [-0.466667, -0.666667, -1.125], [-0.5, -0.44, -0.444444]], dtype=torch.float64
        ),
        atol=1e-6,
        rtol=0,
    )
    cases = [
        (M, "mean", [-0.491667, -0.752778, -0.461481], 2, 1e-6),  # BiN as coded (official lmms-eval)
        (M, "logmeanexp", [-0.491597, -0.716649, -0.461111], 2, 1e-6),  # log-mean-exp of M
        (S, "logmeanexp", [-31.098, -29.099, -36.092], 1, 1e-3),  # probability averaging, un-normalized
    ]
    for scores, reduce, want, arg, tol in cases:
        best, marginal = lk.bin_rank(scores[None].to(dtype), reduce=reduce)
        assert marginal.dtype == dtype and best.dtype == torch.int64
        torch.testing.assert_close(marginal[0].double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=0)
        assert best.tolist() == [arg]


def test_vector_t6_best_of_n_baseline():
    # BoN with answer-only sums [-2, -1.5, -6] and lengths [10, 10, 20]: one "rationale" (its own), N = 1.
    scores = (torch.tensor([-2.0, -1.5, -6.0]) / torch.tensor([10.0, 10.0, 20.0]))[None, :, None]
    best, marginal = lk.bin_rank(scores)
    torch.testing.assert_close(marginal[0], torch.tensor([-0.2, -0.15, -0.3]))
    assert best.tolist() == [1]


def test_absent_candidates_ties_and_nan():
    scores = torch.tensor(
        [
            [[-1.0, -1.0], [NAN := float("nan"), 5.0], [-0.5, -0.5]],  # q0: the NaN candidate is invalid
            [[-2.0, -2.0], [-2.0, -2.0], [-3.0, -3.0]],  # q1: tie between 0 and 1 -> 0
            [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],  # q2: no valid candidate -> -1
            # q3: a NaN marginal never wins; [-inf, -1] is -inf under "mean" but log(e^-1 / 2) under "logmeanexp"
            [[NAN, 0.0], [-float("inf"), -1.0], [-7.0, -7.0]],
            [[-float("inf")] * 2, [-float("inf")] * 2, [1.0, 1.0]],  # q4: only valid one has -inf marginal
        ],
        requires_grad=True,
    )
    valid = torch.tensor(
        [[True, False, True], [True, True, True], [False, False, False], [True, True, True], [False, True, False]]
    )
    for reduce in ("mean", "logmeanexp"):
        best, marginal = lk.bin_rank(scores, valid=valid, reduce=reduce)
        assert best.tolist() == [2, 0, -1, 2 if reduce == "mean" else 1, 1], reduce
        assert torch.isinf(marginal[~valid]).all() and (marginal[~valid] < 0).all()
        rbest, rmarg = reference.bin_rank(scores.detach(), valid=valid, reduce=reduce)
        assert best.tolist() == rbest.tolist()
        torch.testing.assert_close(marginal.detach().double(), rmarg, equal_nan=True)
    # Gradient: absent candidates' scores (NaN included) receive exactly 0.
    _, marginal = lk.bin_rank(scores, valid=valid, reduce="logmeanexp")
    (g,) = torch.autograd.grad(marginal[0, [0, 2]].sum() + marginal[1].sum(), scores)
    assert (g[~valid] == 0).all() and torch.isfinite(g[:2]).all()


@pytest.mark.parametrize("reduce", ["mean", "logmeanexp"])
def test_matches_reference_random(reduce):
    g = torch.Generator().manual_seed(0)
    Q, A, N = 6, 5, 7
    scores = -torch.rand(Q, A, N, generator=g, dtype=torch.float64) * 3
    scores[1, 2] = scores[1, 4]  # an exact tie: the lower index wins
    valid = torch.rand(Q, A, generator=g) > 0.25
    valid[1, 2] = valid[1, 4] = True
    valid[3] = False
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        x = scores.to(dt)
        best, marginal = lk.bin_rank(x, valid=valid, reduce=reduce)
        rbest, rmarg = reference.bin_rank(x, valid=valid, reduce=reduce)
        torch.testing.assert_close(marginal.double(), rmarg, atol=1e-6 if dt != torch.float64 else 1e-12, rtol=0)
        if dt == torch.float64:
            assert best.tolist() == rbest.tolist()
    assert best[3].item() == -1


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, False, True]])
    for reduce in ("mean", "logmeanexp"):
        f = lambda x, r=reduce: torch.where(valid, lk.bin_rank(x, valid=valid, reduce=r)[1], 0.0)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(3, 4, 5, requires_grad=True)
    valid = torch.tensor([[True, True, False, True], [False] * 4, [True] * 4])

    def f(x):
        best, marginal = lk.bin_rank(x, valid=valid, reduce="logmeanexp")
        return best, torch.where(valid, marginal, 0.0).sum()

    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    best, total = torch.compile(f, fullgraph=True)(x)
    rbest, rtotal = f(x)
    assert best.tolist() == rbest.tolist() == [best[0].item(), -1, best[2].item()]
    torch.testing.assert_close(total, rtotal)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.zeros(3, 4),), {}, ValueError, r"scores must have shape \(Q, A, N\), got \(3, 4\)"),
        ((torch.zeros(2, 3, 4, dtype=torch.int64),), {}, TypeError, r"scores must have dtype"),
        ((torch.zeros(2, 0, 4),), {}, ValueError, r"at least one answer and one rationale.*\(2, 0, 4\)"),
        ((torch.zeros(2, 3, 0),), {}, ValueError, r"at least one answer and one rationale.*\(2, 3, 0\)"),
        (
            (torch.zeros(2, 3, 4),),
            dict(reduce="max"),
            ValueError,
            r"reduce must be one of \('mean', 'logmeanexp'\), got 'max'",
        ),
        (
            (torch.zeros(2, 3, 4),),
            dict(valid=torch.ones(2, 3)),
            TypeError,
            r"valid must have dtype bool, got torch.float32",
        ),
        (
            (torch.zeros(2, 3, 4),),
            dict(valid=torch.ones(3, 2, dtype=torch.bool)),
            ValueError,
            r"valid must have shape \(Q, A\) = \(2, 3\)",
        ),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.bin_rank(*args, **kwargs)


def test_marginal_is_finite_for_extreme_scores():
    # log-mean-exp of very negative per-token scores (long sequences) must not underflow to -inf.
    x = torch.tensor([[[-1e4, -1e4 - 1.0]]])
    _, m = lk.bin_rank(x, reduce="logmeanexp")
    assert m.item() == pytest.approx(-1e4 + math.log((1 + math.exp(-1)) / 2), abs=1e-2)
