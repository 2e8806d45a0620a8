"""Preference losses: DPO variants with TRL's semantics, and per-sequence log-probs from per-token ones.

Both are composites of a handful of elementwise torch ops on (B,) or (B, T) tensors (there is nothing to fuse:
the expensive part, the per-token log-probs, is :func:`fused_linear_token_logprobs` / :func:`token_logprobs`).
They run under ``torch.compile(fullgraph=True)`` as they are. Arithmetic is fp32 (fp64 when given fp64, so that
gradcheck can run on them).

DPO, with l_w = logp(y_w) - ref_logp(y_w), l_l likewise, x = beta (l_w - l_l), per pair:
    sigmoid  -(1 - eps) log s(x) - eps log s(-x)          (eps = label_smoothing: old TRL's cDPO; eps = 0: TRL)
    hinge    max(0, 1 - x)
    ipo      (l_w / |y_w| - l_l / |y_l| - 1 / (2 beta))^2 (TRL normalizes the log-ratios by the lengths)
    robust   (-(1 - eps) log s(x) + eps log s(-x)) / (1 - 2 eps)
and the loss is the batch mean; rewards are beta l_w and beta l_l (unnormalized, as TRL logs them, also for ipo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
_MASK_DTYPES = (
    (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    + _checks.FLOAT_DTYPES
    + (torch.float64,)
)
_FLOATS = _checks.FLOAT_DTYPES + (torch.float64,)


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """Per-sequence log-prob ``sum_t M[t] logp[t]``, or with ``normalize=True`` its mean ``/ sum_t M[t]``.

    Args:
        token_logp: ``(..., T)`` float32 / bfloat16 / float16 / float64 per-token log-probs (differentiable).
        mask: ``(..., T)`` bool / integer / float, same shape: 1 on the tokens to count (fractional values weight
            them). Masked positions contribute exactly 0 whatever they hold (NaN, -inf).
        normalize: divide by the (weighted) token count: the length-mean used by IPO / SimPO-style losses.

    Returns:
        ``(...)`` float32 (float64 for float64 input). A row without tokens gives 0 (not NaN), with 0 gradient.
    """
    _checks.check_tensor("token_logp", token_logp)
    _checks.check_tensor("mask", mask)
    _checks.check_dtype("token_logp", token_logp, _FLOATS)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"mask must have dtype bool, an integer or a float dtype, got {mask.dtype}")
    if token_logp.dim() < 1:
        raise ValueError(f"token_logp must have shape (..., T), got {tuple(token_logp.shape)}")
    if tuple(mask.shape) != tuple(token_logp.shape):
        raise ValueError(f"mask must have the shape of token_logp {tuple(token_logp.shape)}, got {tuple(mask.shape)}")
    _checks.check_same_device(("token_logp", token_logp), ("mask", mask))
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    dt = _compute_dtype(token_logp)
    w = mask.to(dt)
    on = w != 0
    s = torch.where(on, token_logp.to(dt) * w, 0.0).sum(-1)
    if not normalize:
        return s
    n = w.sum(-1)
    # A safe denominator, not a where() around s / n: 0/0 in the unused branch would still send NaN gradients.
    return s / torch.where(n != 0, n, 1.0)


def _check_pair_tensor(name: str, x: object, shape: tuple[int, ...] | None) -> torch.Tensor:
    _checks.check_tensor(name, x)
    _checks.check_dtype(name, x, _FLOATS)
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) (one summed log-prob per sequence), got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (that of policy_chosen_logps), got {tuple(x.shape)}")
    return x


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss as TRL's ``DPOTrainer`` (reverse KL): batch mean of the per-pair loss of ``loss_type``.

    ``x = beta ((pc - rc) - (pr - rr))``; ``sigmoid``: ``-log s(x)`` (with ``label_smoothing = eps > 0``:
    ``-(1-eps) log s(x) - eps log s(-x)``, the cDPO of old TRL and of LLaVA-Reasoner's vendored trainer; current
    TRL has no smoothing there); ``hinge``: ``max(0, 1 - x)``; ``ipo``: ``(d - 1/(2 beta))^2`` with ``d`` the
    difference of length-normalized log-ratios; ``robust``: ``(-(1-eps) log s(x) + eps log s(-x)) / (1-2 eps)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` float, the policy's **summed** completion log-probs
            (e.g. :func:`sequence_logprobs`); differentiable.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` float, the same under the frozen reference.
        beta: finite, > 0 (the IPO tau for ``ipo``).
        loss_type: ``"sigmoid" | "hinge" | "ipo" | "robust"``.
        label_smoothing: ``sigmoid``: in ``[0, 0.5]``; ``robust``: the label-flip rate, in ``[0, 0.5)``;
            must be 0 for ``hinge`` and ``ipo`` (which do not use it).
        chosen_lengths, rejected_lengths: ``ipo`` only, ``(B,)`` completion token counts: each log-ratio is
            divided by its length (current TRL). Without them the inputs are taken as already length-averaged
            (``sequence_logprobs(..., normalize=True)``, old TRL's ``average_log_prob``), which is the same number.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: ``loss`` 0-d (0 for an empty batch), differentiable with
        respect to the policy log-probs; rewards ``(B,)`` = ``beta (policy - ref)``, detached (logging
        statistics, unnormalized even for ``ipo``, as TRL logs them). float32 (float64 for float64 input).
    """
    _check_pair_tensor("policy_chosen_logps", policy_chosen_logps, None)
    shape = tuple(policy_chosen_logps.shape)
    _check_pair_tensor("policy_rejected_logps", policy_rejected_logps, shape)
    _check_pair_tensor("ref_chosen_logps", ref_chosen_logps, shape)
    _check_pair_tensor("ref_rejected_logps", ref_rejected_logps, shape)
    _checks.check_same_device(
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    beta = _checks.check_float("beta", beta, low=0, low_open=True)
    eps = _checks.check_float("label_smoothing", label_smoothing)
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5] for loss_type='sigmoid', got {label_smoothing}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and eps != 0.0:
        raise ValueError(f"label_smoothing is not used by loss_type={loss_type!r}: it must be 0, got {label_smoothing}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together (or neither)")
    if chosen_lengths is not None:
        if loss_type != "ipo":
            raise ValueError(f"chosen_lengths/rejected_lengths apply to loss_type='ipo' only, got {loss_type!r}")
        for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            _checks.check_tensor(name, x)
            _checks.check_dtype(name, x, _checks.INDEX_DTYPES + _FLOATS)
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
            _checks.check_lengths_in_range(x, 0, None, name=name, what=" (a completion length)")

    dt = _compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen = policy_chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    rejected = policy_rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    x = beta * (chosen - rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(x) if eps == 0.0 else -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    elif loss_type == "hinge":
        losses = torch.relu(1 - x)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    else:  # ipo
        if chosen_lengths is not None:
            # TRL clamps the lengths at 1: an empty completion contributes its (zero) log-ratio undivided.
            d = chosen / chosen_lengths.to(dt).clamp(min=1.0) - rejected / rejected_lengths.to(dt).clamp(min=1.0)
        else:
            d = chosen - rejected
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    loss = losses.sum() / max(losses.numel(), 1)
    return loss, (beta * chosen).detach(), (beta * rejected).detach()
