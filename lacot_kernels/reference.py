"""Pure-torch references: the oracle of every test and the baseline of every benchmark.

Each function computes in float64 by default (`dtype=torch.float64`), from whatever input dtype it is given,
so that comparing a kernel fed bf16 values with the reference fed *the same* bf16 values measures the kernel's
own error only. They materialize everything (N x V logits included): clarity over memory.
"""

from __future__ import annotations

import math

import torch


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits / T)[target], entropy of softmax(logits / T)), 0 where target == ignore_index.

    logits (..., V) any float dtype, targets (...) integer -> two tensors (...) of `dtype`. Differentiable.
    """
    z = logits.to(dtype) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # 0 * -inf would be NaN where a probability underflows; such terms contribute 0 to the entropy.
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs(hidden @ weight.T + bias, ...) with the logits formed in `dtype`.

    hidden (..., D), weight (V, D), bias (V,) or None, targets (...) -> two tensors (...) of `dtype`.
    """
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index, dtype=dtype)


def naive_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """What most trainers do today (the "torch eager" benchmark baseline): fp32 log_softmax, then gather."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# GRPO / DPO / BiN (ops/grpo.py, ops/preference.py, ops/bin.py): literal transcriptions of TRL's and LaCoT's code
# ----------------------------------------------------------------------------------------------------------------
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    dapo_normalizer: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL ``GRPOTrainer._compute_loss`` (token-level ratio, one process, one micro-batch) in `dtype`.

    logp/old_logp/ref_logp/mask (B, T), advantages (B,) -> (loss (), stats) with TRL's metric names.
    Masked tokens are multiplied by 0 as in TRL (so they must hold finite values). Differentiable in `logp`.
    """
    eps_high = eps_low if eps_high is None else eps_high
    lp = logp.to(dtype)
    m = mask.to(dtype)
    adv = advantages.to(dtype).unsqueeze(1)
    coef_1 = torch.exp(lp - old_logp.to(dtype))
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    return _grpo_finish(
        per_token_loss, lp, m, adv, coef_1, ref_logp, beta, eps_low, eps_high, loss_type, max_completion_length,
        dapo_normalizer, dtype,
    )  # fmt: skip


def _grpo_finish(
    per_token_loss, lp, m, adv, coef_1, ref_logp, beta, eps_low, eps_high, loss_type, max_completion_length,
    dapo_normalizer, dtype,
):  # fmt: skip
    """TRL's k3 KL term, its loss_type aggregation and clip statistics: shared by both GRPO references."""
    stats = {}
    if ref_logp is not None:
        ref = ref_logp.to(dtype)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if beta != 0.0:  # TRL adds the KL term only then (0 * an overflowing kl would be NaN)
            per_token_loss = per_token_loss + beta * kl
        stats["kl"] = (kl * m).sum() / m.sum().clamp(min=1.0)
    B, T = lp.shape
    if loss_type == "grpo":
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * m).sum() / (B * (max_completion_length or T))
    elif loss_type == "dapo":
        norm = m.sum().clamp(min=1.0) if dapo_normalizer is None else dapo_normalizer
        loss = (per_token_loss * m).sum() / norm
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    low = ((coef_1 < 1 - eps_low) & (adv < 0)).to(dtype)
    high = ((coef_1 > 1 + eps_high) & (adv > 0)).to(dtype)
    denom = m.sum().clamp(min=1.0)
    stats["clip_ratio/low_mean"] = (low * m).sum() / denom
    stats["clip_ratio/high_mean"] = (high * m).sum() / denom
    stats["clip_ratio/region_mean"] = (torch.maximum(low, high) * m).sum() / denom
    return loss, stats


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss(log_softmax((hidden @ weight.T + bias) / T)[targets], ...) with the logits formed in `dtype`.

    hidden (B, T, D), weight (V, D), targets (B, T); masked targets may hold any id (they are replaced by 0)."""
    safe = torch.where(mask != 0, targets, torch.zeros_like(targets))
    logp, _ = fused_linear_token_logprobs(hidden, weight, safe, bias=bias, temperature=temperature, dtype=dtype)
    return grpo_loss(logp, old_logp, advantages, mask, dtype=dtype, **kwargs)


def sequence_logprobs(
    token_logp: torch.Tensor, mask: torch.Tensor, *, normalize: bool = False, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(B, T), (B, T) -> (B,): sum of the masked token log-probs, or their mean (0 for an empty row)."""
    m = mask.to(dtype)
    s = (token_logp.to(dtype) * m).sum(-1)
    return s / m.sum(-1).clamp(min=1.0) if normalize else s


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
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL ``DPOTrainer`` per-pair losses (reverse KL), batch mean; sigmoid with label_smoothing is old TRL's cDPO.

    Four (B,) tensors -> (loss (), chosen_rewards (B,), rejected_rewards (B,)). IPO divides each log-ratio by its
    completion length when the lengths are given (current TRL), else takes the inputs as already length-averaged.
    """
    cl = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rl = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    x = beta * (cl - rl)
    ls = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * ls(x) - label_smoothing * ls(-x)
    elif loss_type == "hinge":
        losses = torch.relu(1 - x)
    elif loss_type == "ipo":
        if chosen_lengths is not None:
            d = cl / chosen_lengths.to(dtype).clamp(min=1.0) - rl / rejected_lengths.to(dtype).clamp(min=1.0)
        else:
            d = cl - rl
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * ls(x) + label_smoothing * ls(-x)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses.mean(), (beta * cl).detach(), (beta * rl).detach()


def bin_rank(
    scores: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    reduce: str = "mean",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LaCoT BiN ranking, one question at a time in Python: scores (Q, A, N) -> (best (Q,) int64, marginal (Q, A)).

    "mean": mean over rationales (LaCoT's official lmms-eval code); "logmeanexp": log (1/N) sum_n exp(score).
    Invalid answers get -inf and are never chosen (ties: the lowest index); no valid answer -> best = -1."""
    Q, A, N = scores.shape
    marginal = torch.full((Q, A), float("-inf"), dtype=dtype)
    best = torch.full((Q,), -1, dtype=torch.int64)
    for q in range(Q):
        top = None
        for a in range(A):
            if valid is not None and not bool(valid[q, a]):
                continue
            row = [float(v) for v in scores[q, a].to(dtype)]
            if any(math.isnan(r) for r in row):  # (Python's max() would skip a NaN after a -inf)
                val = math.nan
            elif reduce == "mean":
                val = math.fsum(row) / N
            else:
                mx = max(row)
                val = mx if math.isinf(mx) else mx + math.log(math.fsum(math.exp(r - mx) for r in row) / N)
            marginal[q, a] = val
            if not math.isnan(val) and (top is None or val > top):
                top, best[q] = val, a
    return best, marginal


# ----------------------------------------------------------------------------------------------------------------
# GRPO group advantages, LaCoT reward interpolation and sub-trajectory balance (ops/rewards.py, ops/subtb.py):
# the definitions written out directly (per-row loops, pair matrices), never the kernels' scans.
# ----------------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    unbiased: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """TRL's GRPO advantages ``(r - nanmean_g) / (nanstd + eps)`` in `dtype`, same shape as `rewards`.

    ``scale``: "group" (std of the group), "batch" (std of every reward, mean still per group), "none" (no
    division). NaN rewards are left out of every mean and std and get advantage 0; a group of equal rewards gets
    exactly 0. A std over fewer than two rewards (unbiased) is 0, and a zero denominator (eps = 0, equal rewards)
    gives advantage 0. Differentiable; where the std is 0 its (sub)gradient is taken as 0.
    """
    r = rewards.to(dtype).reshape(-1, group_size)
    valid = ~torch.isnan(r)
    zero = torch.zeros((), dtype=dtype, device=r.device)

    def centred(x, ok, dim):
        n = ok.sum(dim, keepdim=True).to(dtype)
        mean = torch.where(ok, x, zero).sum(dim, keepdim=True) / n.clamp(min=1)
        # The exact mean lies in [min, max]: keeping the rounded one there makes equal rewards centre to exactly 0.
        if x.numel():
            lo = torch.where(ok, x, torch.inf).amin(dim, keepdim=True)
            hi = torch.where(ok, x, -torch.inf).amax(dim, keepdim=True)
            mean = torch.where(n > 0, torch.minimum(torch.maximum(mean, lo), hi), mean)
        return torch.where(ok, x - mean, zero), n

    def std(c, n, dim):
        k = n - 1 if unbiased else n
        var = (c * c).sum(dim, keepdim=True) / k.clamp(min=1)
        return torch.where(var > 0, var.clamp(min=torch.finfo(dtype).tiny).sqrt(), zero)

    c, n = centred(r, valid, -1)
    if scale == "group":
        denom = std(c, n, -1) + eps
    elif scale == "batch":
        cb, nb = centred(r.reshape(-1), valid.reshape(-1), 0)
        denom = std(cb, nb, 0) + eps
    elif scale == "none":
        denom = torch.ones((), dtype=dtype, device=r.device)
    else:
        raise ValueError(f"unknown scale {scale!r}")
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    adv = torch.where(denom > 0, c / safe, zero)
    # An infinite reward poisons (NaN) its group, or with scale "batch" the whole batch.
    inf = torch.isinf(r)
    bad = inf.any().expand(r.shape) if scale == "batch" else inf.any(-1, keepdim=True).expand(r.shape)
    adv = torch.where(bad, torch.full((), torch.nan, dtype=dtype, device=r.device), adv)
    return adv.reshape(rewards.shape)


def interpolation_matrix(anchor_mask: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, S) bool -> (B, S, S) M with out = M @ values: LaCoT Eq. 4 written as a per-row Python loop.

    Row s of M: e_s at an anchor; between consecutive anchors a < s < a' the weights (1 - w, w) on (a, a') with
    w = (s - a) / (a' - a); all zeros before the first and after the last anchor of the row.
    """
    B, S = anchor_mask.shape
    M = torch.zeros(B, S, S, dtype=dtype)
    for b in range(B):
        anchors = [s for s in range(S) if bool(anchor_mask[b, s])]
        for a in anchors:
            M[b, a, a] = 1.0
        for a, a_next in zip(anchors, anchors[1:], strict=False):
            for s in range(a + 1, a_next):
                w = (s - a) / (a_next - a)
                M[b, s, a] = 1.0 - w
                M[b, s, a_next] = w
    return M.to(anchor_mask.device)


def interpolate_rewards(
    values: torch.Tensor, anchor_mask: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Linear interpolation of the anchor values of each row (LaCoT Eq. 4), 0 outside the first..last anchor.

    values (B, S) float, anchor_mask (B, S) bool -> (B, S) `dtype`. Differentiable in `values` (only anchor
    values receive gradient). Values at non-anchor positions are never read (they may be NaN).
    """
    M = interpolation_matrix(anchor_mask, dtype)
    v = torch.where(anchor_mask, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))
    # Only the nonzero weights take part (not M @ v): a NaN anchor then reaches the positions it brackets only.
    terms = M * v.unsqueeze(-2)
    return torch.where(M != 0, terms, torch.zeros((), dtype=dtype, device=values.device)).sum(-1)


def reward_anchors(lengths: torch.Tensor, stride: int, *, min_len: int = 0, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len + 1) bool: state 0, states min_len + k * stride, and state n of each row."""
    B = lengths.shape[0]
    out = torch.zeros(B, max_len + 1, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        for t in range(n + 1):
            out[b, t] = t == 0 or t == n or (t >= min_len and (t - min_len) % stride == 0)
    return out.to(lengths.device)


def subtb_loss(
    log_pf: torch.Tensor,
    log_term: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    *,
    decay: float = 1.0,
    reduction: str = "sum",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sub-trajectory balance (LaCoT Eq. 2/5) by brute force: every pair (i, j) of states written out.

    log_pf (B, T), log_term / log_reward (B, T + 1), lengths (B,). Row b, n = lengths[b]:
    logF_t = log_reward_t - log_term_t, C_j = sum_{t<j} (logF_t + log_pf_t - logF_{t+1}) and
    loss_b = sum_{0 <= i < j <= n} decay^(j-i-1) (C_j - C_i)^2 (O(n^2) per row: the oracle, not a kernel).
    "sum" -> sum_b loss_b, "mean" -> sum_b loss_b / sum_b sum_{i<j<=n} decay^(j-i-1), "none" -> (B,).
    Entries past a row's length are never read. Differentiable in the three float inputs.
    """
    B = log_pf.shape[0]
    losses, weights = [], []
    for b in range(B):
        n = int(lengths[b])
        log_f = log_reward[b, : n + 1].to(dtype) - log_term[b, : n + 1].to(dtype)
        delta = log_f[:-1] + log_pf[b, :n].to(dtype) - log_f[1:]
        c = torch.cat([torch.zeros(1, dtype=dtype, device=delta.device), torch.cumsum(delta, 0)])
        idx = torch.arange(n + 1, device=delta.device)
        gap = idx[None, :] - idx[:, None]  # [i, j] -> j - i
        w = torch.where(gap >= 1, torch.pow(torch.tensor(decay, dtype=dtype), (gap - 1).clamp(min=0)), 0.0)
        losses.append((w * (c[None, :] - c[:, None]) ** 2).sum())
        weights.append(w.sum())
    loss = torch.stack(losses) if losses else torch.zeros(0, dtype=dtype)
    weight = torch.stack(weights) if weights else torch.zeros(0, dtype=dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / weight.sum().clamp(min=1.0)
    raise ValueError(f"unknown reduction {reduction!r}")


def subtb_loss_official(
    log_pf: torch.Tensor,
    log_term: torch.Tensor,
    log_reward: torch.Tensor,
    excluded: torch.Tensor,
    *,
    decay: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """LaCoT's released ``GFlowNet_loss('modified_subtb')`` (gfn_trainer.py) re-expressed in torch: one pass of
    slicing per sub-trajectory length l = 1..T, pooled mean over the kept windows (lacot.md §4.2).

    log_pf (B, T), log_term / log_reward (B, T + 1), excluded (B, T) bool: the window whose last transition is t
    is dropped where excluded[b, t] (the official code builds it from the eos count, ``cumsum(text == eos) > 1``;
    ``t >= lengths[b]`` gives the paper's per-trajectory windows, i.e. ``subtb_loss(..., reduction="mean")``).
    """
    log_f = log_reward.to(dtype) - log_term.to(dtype)
    delta = log_f[:, :-1] + log_pf.to(dtype) - log_f[:, 1:]
    c = torch.nn.functional.pad(delta, (1, 0)).cumsum(1)
    T = delta.shape[1]
    num = torch.zeros((), dtype=dtype, device=delta.device)
    den = torch.zeros((), dtype=dtype, device=delta.device)
    for length in range(1, T + 1):
        keep = ~excluded[:, length - 1 :]
        # A masked assignment in the original: excluded windows count as exactly 0 even if they hold NaN.
        term = torch.where(keep, (c[:, length:] - c[:, :-length]) ** 2, 0.0)
        num = num + decay ** (length - 1) * term.sum()
        den = den + decay ** (length - 1) * keep.sum().to(dtype)
    return num / den


# ---- RL features (issue 14): sampler truncation, rollout correction, sequence-level ratios --------------------
def kept_mask(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    order: str = "vllm",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The sampler's kept set (..., V) bool, applied filter by filter as the samplers do, in `dtype`.

    z = logits / T. min_p: keep p_v >= min_p max p. top_k: keep z_v >= the k-th largest z (ties kept). top_p: sort
    the survivors ascending, remove those whose cumulative renormalized probability is <= 1 - top_p (the largest
    is always kept), and then keep every token tied with the smallest kept one (threshold semantics).
    order "vllm": min_p, top_k, top_p; "hf": top_k, top_p, min_p.
    """
    z = logits.to(dtype) / temperature
    keep = torch.ones_like(z, dtype=torch.bool)

    def apply_min_p(keep):
        p = torch.softmax(z, -1)
        return keep & (p >= min_p * p.amax(-1, keepdim=True))

    def apply_top_k(keep):
        k = min(top_k, z.shape[-1])
        kth = torch.topk(z, k, dim=-1).values[..., -1:]
        return keep & (z >= kth)

    def apply_top_p(keep):
        zz = torch.where(keep, z, float("-inf"))
        zs, idx = torch.sort(zz, dim=-1)
        cum = torch.softmax(zs, -1).cumsum(-1)
        removed = cum <= 1.0 - top_p
        removed[..., -1] = False
        kept_sorted = ~removed
        smallest_kept = torch.where(kept_sorted, zs, float("inf")).amin(-1, keepdim=True)
        return keep & (zz >= smallest_kept)

    steps = ["min_p", "top_k", "top_p"] if order == "vllm" else ["top_k", "top_p", "min_p"]
    for step in steps:
        if step == "min_p" and min_p is not None:
            keep = apply_min_p(keep)
        elif step == "top_k" and top_k is not None:
            keep = apply_top_k(keep)
        elif step == "top_p" and top_p is not None and top_p < 1.0:  # top_p = 1 is no filter (HF, vLLM)
            keep = apply_top_p(keep)
    return keep


def token_logprobs_truncated(
    logits: torch.Tensor,
    targets: torch.Tensor,
    keep: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of the target, entropy) of softmax(logits / T) renormalized over `keep` (..., V) bool.

    A target outside the kept set gives -inf; ignored targets give 0. Differentiable (through kept logits only).
    """
    z = torch.where(keep, logits.to(dtype) / temperature, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # 0 * -inf would be NaN for a kept -inf logit (probability 0): such terms contribute 0, as in token_logprobs.
    entropy = -(p * torch.where(keep & (p > 0), logp_all, torch.zeros_like(logp_all))).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def rollout_is_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    cap: float = 2.0,
    band: tuple[float, float] = (0.5, 5.0),
    level: str = "token",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Weights of the policy-gradient term (B, T) in `dtype`, from the papers' definitions (rho = pi_old / pi_rollout).

    tis (Yao et al. 2025): min(rho, cap). mis (Liu, Li et al. 2025): rho * 1[rho <= cap]. icepop (Ling team 2025):
    rho * 1[band[0] <= rho <= band[1]]. level "sequence": rho = prod_t rho_t over the sequence's tokens.
    """
    m = mask.to(dtype)
    rho = torch.exp((old_logp.to(dtype) - rollout_logp.to(dtype)) * (m != 0))
    if level == "sequence":
        rho = torch.prod(torch.where(m != 0, rho, torch.ones_like(rho)), dim=-1, keepdim=True).expand_as(rho)
    if mode == "tis":
        return torch.minimum(rho, torch.full_like(rho, cap))
    if mode == "mis":
        return rho * (rho <= cap)
    if mode == "icepop":
        return rho * ((rho >= band[0]) & (rho <= band[1]))
    raise ValueError(f"unknown mode {mode!r}")


def grpo_loss_rl(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    ratio_level: str = "token",
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    dapo_normalizer: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss with an importance weight on the policy-gradient term and token / sequence (GSPO) ratios.

    Sequence level (GSPO, Zheng et al. 2025, as TRL's importance_sampling_level="sequence"): the ratio of
    sequence i is s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|) = exp(mean_t (logp - old)), clipped to
    [1 - eps_low, 1 + eps_high], its term -min(s A, clip(s) A) given to each of its tokens. Per token:
    l = w * pg + beta * kl, aggregated by loss_type as in TRL. Differentiable in `logp` (autograd gives GSPO's
    gradient).
    """
    eps_high = eps_low if eps_high is None else eps_high
    lp = logp.to(dtype)
    m = mask.to(dtype)
    adv = advantages.to(dtype).unsqueeze(1)
    log_ratio = lp - old_logp.to(dtype)
    if ratio_level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(lp)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_weight is not None:
        per_token_loss = per_token_loss * is_weight.to(dtype)
    return _grpo_finish(
        per_token_loss, lp, m, adv, coef_1, ref_logp, beta, eps_low, eps_high, loss_type, max_completion_length,
        dapo_normalizer, dtype,
    )  # fmt: skip
