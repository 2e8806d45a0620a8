"""Rollout-mismatch importance weights: correcting for the rollout engine's log-probs differing from the trainer's.

The rollout engine (vLLM, SGLang) samples from pi_rollout, which differs numerically from the trainer's pi_old
(other kernels, batch shapes, precision, sampler truncation). With rho_t = pi_old(y_t) / pi_rollout(y_t) =
exp(old_logp - rollout_logp) on each completion token, the policy-gradient term of every token is multiplied by a
weight w_t (no gradient flows through it; the KL term is not weighted, as in TRL and verl):

* ``"tis"``: truncated importance sampling, w = min(rho, C) (Yao et al. 2025, "Your Efficient RL Framework
  Secretly Brings You Off-Policy RL Training"; TRL ``vllm_importance_sampling_correction`` with
  ``vllm_importance_sampling_cap``, C = 2 by default there too). "truncated" counts tokens with rho > C.
* ``"mis"``: masked importance sampling, w = rho if rho <= C else 0 (Liu, Li et al. 2025, "When Speed Kills
  Stability: Demystifying RL Collapse from the Inference-Training Mismatch"; verl ``rollout_is`` mask mode, upper
  threshold only). "masked" counts tokens with rho > C.
* ``"icepop"``: two-sided masking, w = rho if lo <= rho <= hi else 0 (Ling team 2025, "Small Leak Can Sink a
  Great Ship: Boost RL Training on MoE with IcePop", lo = 0.5, hi = 5). "masked" counts tokens outside the band.
* ``level="sequence"`` (TIS and MIS): rho of a sequence is the product of its completion tokens' ratios,
  exp(sum_{t: M_t != 0} (old - rollout)) (a fractional mask weights the loss, not the ratio), and every token of
  the sequence gets the sequence's weight (verl ``rollout_is_level: sequence``). IcePop is defined per token only.

Masked-out tokens keep the loss's own mask: a token whose weight is 0 still counts in the loss normalizers (as
IcePop's and TIS's objectives are written: the weight multiplies the token's term). Statistics are masked means
over the completion tokens: ``is/ratio_mean`` (the mean of rho, the quantity trl#6789 reports), ``is/weight_mean``
and ``is/truncated_frac`` (tis) or ``is/masked_frac`` (mis, icepop).
"""

from __future__ import annotations

import math

import torch

MODES = ("none", "tis", "mis", "icepop")
LEVELS = ("token", "sequence")


def check_is_args(mode: object, cap: object, band: object, level: object) -> tuple[float, float, float]:
    """Validated (cap, low, high); errors name the argument."""
    if mode not in MODES:
        raise ValueError(f"is_correction must be one of {MODES}, got {mode!r}")
    if level not in LEVELS:
        raise ValueError(f"is_level must be one of {LEVELS}, got {level!r}")
    if mode == "icepop" and level != "token":
        raise ValueError(f"is_correction='icepop' is defined per token only, got is_level={level!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(float(cap)) or cap <= 0:
        raise ValueError(f"is_cap must be a finite float > 0, got {cap!r}")
    if (
        not isinstance(band, (tuple, list))
        or len(band) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in band)
        or not (0.0 <= float(band[0]) <= float(band[1]) < math.inf)
    ):
        raise ValueError(f"is_band must be a pair (low, high) with 0 <= low <= high < inf, got {band!r}")
    return float(cap), float(band[0]), float(band[1])


def rollout_is_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "tis",
    cap: float = 2.0,
    band: tuple[float, float] = (0.5, 5.0),
    level: str = "token",
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Per-token weights ``w`` of the policy-gradient term and their statistics (see the module docstring).

    Args:
        old_logp, rollout_logp: ``(B, T)`` float, the trainer's and the rollout engine's log-probs of the tokens.
        mask: ``(B, T)`` float token weights (0 = not a completion token: its w is 1 and it is not counted).
        mode: ``"none" | "tis" | "mis" | "icepop"``; cap: C of tis / mis; band: (low, high) of icepop;
        level: ``"token" | "sequence"``.

    Returns:
        ``(w, stats)``: ``w`` ``(B, T)`` float32 (None for ``"none"``), ``stats`` dict of 0-d float32 tensors.
    """
    cap, low, high = check_is_args(mode, cap, band, level)
    on = mask != 0
    m = mask.float()
    log_rho = torch.where(on, old_logp.float() - rollout_logp.float(), 0.0)
    if level == "sequence":
        # The sequence's probability ratio: the product of its completion tokens' ratios. The mask selects the
        # tokens; a fractional mask weights the loss, not the ratio (the same as TRL for 0/1 masks).
        log_rho = torch.where(on, log_rho.sum(-1, keepdim=True), 0.0)
    rho = log_rho.exp()
    denom = m.sum().clamp(min=1.0)

    def mean(x):
        return torch.where(on, m * x, 0.0).sum() / denom

    stats = {"is/ratio_mean": mean(rho)}
    if mode == "none":
        return None, stats
    if mode == "tis":
        modified = rho > cap
        w = torch.clamp(rho, max=cap)
    elif mode == "mis":
        modified = rho > cap
        w = torch.where(modified, 0.0, rho)
    else:
        modified = (rho < low) | (rho > high)
        w = torch.where(modified, 0.0, rho)
    w = torch.where(on, w, 1.0).contiguous()
    stats["is/weight_mean"] = mean(w)
    stats["is/truncated_frac" if mode == "tis" else "is/masked_frac"] = mean(modified.float())
    return w, stats
