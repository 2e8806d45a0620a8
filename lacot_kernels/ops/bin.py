"""BiN (LaCoT's Bayesian inference over N rationales): rank candidate answers by their marginal over rationales.

scores[q, a, n] is the length-normalized log-likelihood of candidate answer a of question q given rationale n,
``log pi(Z_n Y_a | X) / |Z_n Y_a|``. The marginal of an answer over the N rationales is either

  * ``reduce="mean"``: ``(1/N) sum_n scores[q, a, n]``, the ranking LaCoT's released evaluation code computes
    (``lmms-eval/models/qwen2_5_vl_gfn.py``: mean over rationales of the mean per-token log-prob; a geometric
    mean of per-token probabilities), or
  * ``reduce="logmeanexp"``: ``log (1/N) sum_n exp(scores[q, a, n])``, the paper's estimate (Eq. 9), which
    averages (length-normalized) likelihoods, not log-likelihoods.

The two can pick different answers: one rationale under which an answer is very likely dominates a
log-mean-exp, while the mean punishes an answer that is very unlikely under any rationale (research note
lacot.md §6.2, test T6). Pass unnormalized joint log-likelihoods as ``scores`` to get the un-normalized
probability average.

A composite of a reduction, a where and an argmax over (Q, A): tiny next to the N x A teacher-forced scoring
passes that produce ``scores`` (which :func:`fused_linear_token_logprobs` serves without a full-vocabulary
log-softmax).
"""

from __future__ import annotations

import math

import torch

from .. import _checks

REDUCTIONS = ("mean", "logmeanexp")


def bin_rank(
    scores: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate answer per question by its marginal over rationales: ``argmax_a reduce_n scores[q, a, n]``.

    Args:
        scores: ``(Q, A, N)`` float32 / bfloat16 / float16 / float64: length-normalized log-likelihood of
            answer ``a`` given rationale ``n`` for question ``q`` (differentiable).
        valid: optional ``(Q, A)`` bool: False for absent candidates (padding when questions have fewer than
            ``A`` answers). Their scores are never read.
        reduce: ``"mean"`` (LaCoT's official ranking) or ``"logmeanexp"`` (the paper's marginal likelihood).

    Returns:
        ``(best, marginal)``: ``best`` ``(Q,)`` int64, the index of the valid answer with the largest marginal
        (ties: the lowest index; NaN marginals never win), or -1 when a question has no valid, non-NaN
        candidate; ``marginal`` ``(Q, A)`` float32 (float64 for float64 input), ``-inf`` for invalid candidates.
    """
    _checks.check_tensor("scores", scores)
    _checks.check_dtype("scores", scores, _checks.FLOAT_DTYPES + (torch.float64,))
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (Q, A, N), got {tuple(scores.shape)}")
    Q, A, N = scores.shape
    if A == 0 or N == 0:
        raise ValueError(f"scores needs at least one answer and one rationale per question, got shape {(Q, A, N)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if valid is not None:
        _checks.check_tensor("valid", valid)
        _checks.check_dtype("valid", valid, (torch.bool,))
        if tuple(valid.shape) != (Q, A):
            raise ValueError(f"valid must have shape (Q, A) = {(Q, A)}, got {tuple(valid.shape)}")
        _checks.check_same_device(("scores", scores), ("valid", valid))

    dt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.to(dt)
    if valid is not None:
        # Zero the absent candidates' scores before reducing: NaN there would otherwise leak into the gradient.
        x = torch.where(valid[..., None], x, 0.0)
    if reduce == "mean":
        marginal = x.mean(-1)
    else:
        marginal = torch.logsumexp(x, -1) - math.log(N)
    ok = ~torch.isnan(marginal)
    if valid is not None:
        marginal = torch.where(valid, marginal, float("-inf"))
        ok = ok & valid
    key = torch.where(ok, marginal, float("-inf"))
    top = key.amax(-1, keepdim=True)
    # Candidates equal to the maximum (a valid one at -inf included), first one wins (argmax returns the first).
    cand = ok & (key == top)
    first = cand.to(torch.uint8).argmax(-1)
    best = torch.where(cand.any(-1), first, -1)
    return best, marginal
