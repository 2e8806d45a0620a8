"""Bad input gives a TypeError / ValueError that names the argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

import lacot_kernels as lk

X = torch.randn(4, 10)
Y = torch.randint(0, 10, (4,))
H = torch.randn(4, 6)
W = torch.randn(10, 6)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logits=X.long()), TypeError, r"logits must have dtype float32/bfloat16/float16, got torch.int64"),
        (dict(logits=X.double()), TypeError, r"logits must have dtype .*got torch.float64"),
        (dict(targets=Y.float()), TypeError, r"targets must have dtype int32/int64, got torch.float32"),
        (dict(logits=[[1.0]]), TypeError, r"logits must be a torch.Tensor, got list"),
        (dict(targets=Y[:3]), ValueError, r"targets.shape must equal logits.shape\[:-1\] = \(4,\), got \(3,\)"),
        (dict(logits=torch.randn(4, 0)), ValueError, r"non-empty vocabulary.*\(4, 0\)"),
        (dict(temperature=0.0), ValueError, r"temperature must be finite and > 0, got 0.0"),
        (dict(temperature=-1.0), ValueError, r"temperature must be finite and > 0, got -1.0"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be finite and > 0, got nan"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be finite and > 0, got inf"),
        (dict(temperature=torch.tensor(1.0)), TypeError, r"temperature must be a Python float, got Tensor"),
        (dict(temperature=1e-320), ValueError, r"temperature must be >= 5.42\d*e-20 \(2\*\*-64.*got 1e-320"),
        (dict(temperature=1e-30), ValueError, r"temperature must be >= .*got 1e-30"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be a Python int, got float"),
        (dict(backend="cudnn"), ValueError, r"backend must be one of .*got 'cudnn'"),
        (
            dict(targets=torch.tensor([0, 10, 1, 2])),
            ValueError,
            r"targets must be in \[0, 10\).*got 10 at flat position 1",
        ),
        (dict(targets=torch.tensor([0, -5, 1, 2])), ValueError, r"got -5 at flat position 1"),
    ],
)
def test_token_logprobs_bad_input(kwargs, exc, match):
    args = dict(logits=X, targets=Y)
    args.update(kwargs)
    logits, targets = args.pop("logits"), args.pop("targets")
    with pytest.raises(exc, match=match):
        lk.token_logprobs(logits, targets, **args)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(hidden=H.long()), TypeError, r"hidden must have dtype"),
        (
            dict(weight=W.half()),
            TypeError,
            r"weight must have the dtype of hidden \(torch.float32\), got torch.float16",
        ),
        (dict(bias=torch.randn(10).half()), TypeError, r"bias must have the dtype of weight"),
        (dict(weight=torch.randn(10, 5)), ValueError, r"weight.shape\[1\] must equal hidden.shape\[-1\] = 6"),
        (dict(weight=torch.randn(10)), ValueError, r"weight must have shape \(V, D\), got \(10,\)"),
        (dict(weight=torch.randn(0, 6)), ValueError, r"at least one vocabulary row"),
        (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \(10,\), got \(9,\)"),
        (
            dict(targets=Y.reshape(2, 2)),
            ValueError,
            r"targets.shape must equal hidden.shape\[:-1\] = \(4,\), got \(2, 2\)",
        ),
        (dict(targets=torch.tensor([0, 1, 2, 99])), ValueError, r"targets must be in \[0, 10\).*got 99"),
        (dict(temperature=0), ValueError, r"temperature must be finite and > 0, got 0"),
        (dict(backend="x"), ValueError, r"backend must be one of"),
        (dict(weight=torch.randn(10, 6, device="meta")), ValueError, r"weight is on meta but hidden is on cpu"),
    ],
)
def test_fused_bad_input(kwargs, exc, match):
    args = dict(hidden=H, weight=W, targets=Y)
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=match):
        lk.fused_linear_token_logprobs(hidden, weight, targets, **args)


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match=r"targets is on meta but logits is on cpu"):
        lk.token_logprobs(X, torch.zeros(4, dtype=torch.long, device="meta"))


def test_explicit_backend_that_cannot_run_is_explained(monkeypatch):
    from lacot_kernels import _registry

    monkeypatch.setattr(_registry, "native_available", lambda dev, op="": False)
    with pytest.raises(RuntimeError, match=r"backend='cuda' was requested for cpu tensors.*_C has no cpu kernels"):
        lk.token_logprobs(X, Y, backend="cuda")
    monkeypatch.setattr(_registry, "triton_available", lambda dev: False)
    with pytest.raises(RuntimeError, match=r"backend='triton' was requested"):
        lk.token_logprobs(X, Y, backend="triton")


def test_bounds_check_on_cuda_is_opt_in(monkeypatch):
    """On CUDA tensors the range check reads a flag back (a host sync): only with LACOT_CHECK_BOUNDS=1."""
    from lacot_kernels import _checks

    t = torch.tensor([0, 50])
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")), raising=False)
    try:
        monkeypatch.delenv("LACOT_CHECK_BOUNDS", raising=False)
        _checks.check_targets_in_range(t, 10, -100)  # skipped: no sync on the hot path
        monkeypatch.setenv("LACOT_CHECK_BOUNDS", "1")
        with pytest.raises(ValueError, match=r"got 50"):
            _checks.check_targets_in_range(t, 10, -100)
    finally:
        monkeypatch.undo()
