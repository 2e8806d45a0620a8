"""verl's log-prob and entropy functions, by name and signature, on lacot_kernels' ops.

Swap one import and keep the call sites::

    # from verl.utils.torch_functional import logprobs_from_logits, entropy_from_logits
    from lacot_kernels.compat.verl import logprobs_from_logits, entropy_from_logits

    logits.div_(temperature)                                  # verl applies the temperature before the calls
    log_probs = logprobs_from_logits(logits, responses)       # (B, L) float32
    entropy = entropy_from_logits(logits)                     # (B, L) float32

and, for verl's fused path (``use_fused_kernels``), ``linear_cross_entropy(hidden, weight, labels, temperature,
reduction, dist_process_group)`` with the signature of ``verl.utils.kernel.linear_cross_entropy`` (vocabulary-parallel
heads included). From ``verl.trainer.ppo.core_algos`` (verl 0.9 signatures and return values): ``agg_loss`` (every
``loss_agg_mode``), ``compute_policy_loss`` / ``compute_policy_loss_vanilla`` (dual-clip PPO / GRPO) and
``compute_grpo_outcome_advantage`` (``index`` grouping: non-contiguous, unequal groups).

Same math as verl; what differs on purpose: every output is float32 and accumulated in fp32 whatever the logits
dtype (verl's torch fallbacks return the logits dtype, e.g. bf16 entropies), labels equal to -100 give 0 (as
verl's flash-attn path does), and nothing here needs flash-attn or a GPU. The ``(B, L, V)`` logits are never
copied or upcast: a slice such as ``logits[:, -L - 1 : -1]`` is scored as it is.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from .. import _checks, fused_linear_token_logprobs
from .._dropin import token_logprobs_any_layout

__all__ = [
    "LOSS_AGG_MODES",
    "agg_loss",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "linear_cross_entropy",
    "logprobs_from_logits",
]


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``log_softmax(logits)[labels]`` per position, as ``verl.utils.torch_functional.logprobs_from_logits``.

    Args:
        logits: ``(..., V)`` float32 / bfloat16 / float16 (already divided by the temperature, as in verl).
        labels: ``(...)`` int32 / int64 in ``[0, V)``; ``-100`` gives 0.
        inplace_backward: accepted for signature compatibility (verl's flash-attn option); the backward here
            never keeps a second copy of the logits anyway.

    Returns:
        ``(...)`` float32, differentiable with respect to ``logits``.
    """
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    _checks.check_tensor("logits", logits)
    _checks.check_tensor("labels", labels)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels.shape must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    return token_logprobs_any_layout(logits, labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position, as ``verl.utils.torch_functional.entropy_from_logits``.

    logits ``(..., V)`` float32 / bfloat16 / float16 -> ``(...)`` float32, differentiable (the entropy bonus).
    """
    _checks.check_tensor("logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (..., V), got {tuple(logits.shape)}")
    # Any valid id serves as the target: only the entropy output is used, and its gradient is exact.
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return token_logprobs_any_layout(logits, dummy, return_entropy=True)[1]


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """As ``verl.utils.torch_functional.entropy_from_logits_with_chunking``: logits ``(N, V)`` -> ``(N,)`` float32.

    ``chunk_size`` is accepted for signature compatibility (and validated); the op streams each row once, so no
    chunking is needed to bound memory. Unlike verl's version (which writes into a fresh buffer) the result is
    differentiable.
    """
    _checks.check_int("chunk_size", chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    _checks.check_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    return entropy_from_logits(logits)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | None = 1.0,
    reduction: str | None = "none",
    dist_process_group: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head + log-prob + entropy, as ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``.

    Args:
        hidden: ``(..., D)`` float32 / bfloat16 / float16 last hidden states (N = prod(...) tokens).
        weight: ``(V, D)`` LM-head weight, same dtype; with ``dist_process_group`` this rank's vocabulary shard
            ``(V / world, D)``: rows ``[rank * V / world, (rank + 1) * V / world)`` of the full head, as in verl.
        labels: ``(...)`` int32 / int64 in ``[0, V)`` (global ids); ``-100`` gives 0 and costs no work.
        temperature: > 0 (None means 1.0); the distribution is ``softmax(hidden @ weight.T / temperature)``.
        reduction: ``"none"`` (None means "none"): per-token log-probs; ``"sum"``: their sum over the N tokens;
            ``"mean"``: that sum / N (verl divides by every token; ``-100`` tokens add 0 to the sum). The entropy
            is per token whatever the reduction, as in verl.
        dist_process_group: a ``torch.distributed`` group whose ranks each hold one vocabulary shard of the head
            and the same ``hidden`` / ``labels`` (Megatron-style vocabulary parallelism, as verl). Each rank
            scores its shard with the fused op, then the per-row normalizers, the label's logit (from its owner)
            and the entropy parts are combined across the group, so every rank returns the full-vocabulary
            log-probs and entropies. The gradient with respect to ``weight`` is this rank's shard's; the one with
            respect to ``hidden`` is this shard's contribution (sum it over the group, as the tensor-parallel
            layer before the head does). A group of one rank is the same as None.

    Returns:
        ``(logprobs, entropy)`` float32: logprobs ``(N,)`` (flattened, as verl returns them) or 0-d for
        ``"sum"`` / ``"mean"``, entropy ``(N,)``; differentiable with respect to ``hidden`` and ``weight``; the
        logits are never materialized.
    """
    if temperature is None:
        temperature = 1.0
    if reduction is None:
        reduction = "none"
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean' (verl's linear_cross_entropy), got {reduction!r}")
    _checks.check_tensor("hidden", hidden)
    _checks.check_tensor("labels", labels)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (..., D), got {tuple(hidden.shape)}")
    n_tokens = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if labels.numel() != n_tokens:
        # verl flattens both, so (B, T, D) hidden states with (B * T,) labels are fine; counts must agree.
        raise ValueError(
            f"labels must hold one id per token of hidden ({n_tokens} = prod of hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}), got labels of shape {tuple(labels.shape)}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    world = 1
    if dist_process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(dist_process_group)
    if world == 1:
        logp, ent = fused_linear_token_logprobs(h, weight, y, temperature=temperature, return_entropy=True)
    else:
        logp, ent = _vocab_parallel_logprobs(h, weight, y, float(temperature), dist_process_group, world)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.sum() / max(n_tokens, 1)
    return logp, ent


def _vocab_parallel_logprobs(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, temperature: float, group: object, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs and entropies from this rank's head shard, combined across ``group``.

    Per row, with z = h W^T / T split into shards r: the fused op on shard r with a local target t gives
    logp_r(t) and the shard's entropy H_r, so L_r = z_t - logp_r(t) is the shard's log-sum-exp. With
    L = logsumexp_r L_r and a_r = exp(L_r - L) (the shard's probability mass): logp(y) = z_y - L (z_y from the
    rank owning y) and H = sum_r a_r (H_r - log a_r).

    Every rank computes the same (replicated) outputs; their gradient here is the partial derivative through
    this rank's shard only: d logp / d L_r = -a_r (+ d z_y when y is owned), d H / d H_r = a_r,
    d H / d L_r = a_r (H_r - log a_r - H). (Differentiable collectives would instead sum the replicated gradients
    over the group, a factor ``world`` too large.)
    """
    import torch.distributed as dist

    rank = dist.get_rank(group)
    v_local = w.shape[0]
    lo = rank * v_local
    ignored = y == -100
    owned = (y >= lo) & (y < lo + v_local) & ~ignored
    local = torch.where(owned, y - lo, torch.zeros_like(y))  # any local id serves for the shard statistics
    logp_r, ent_r = fused_linear_token_logprobs(h, w, local, temperature=temperature, return_entropy=True)
    z_t = (h.float() * w.float()[local]).sum(-1) / temperature
    lse_r = z_t - logp_r

    with torch.no_grad():
        stats = torch.stack([lse_r, ent_r]).contiguous()  # (2, N)
        gathered = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats, group=group)
        lse_all = torch.stack([g[0] for g in gathered])  # (world, N)
        ent_all = torch.stack([g[1] for g in gathered])
        lse = torch.logsumexp(lse_all, dim=0)
        log_a = lse_all - lse  # <= 0
        a_all = torch.exp(log_a)
        # H = sum_r a_r (H_r - log a_r): a sum of non-negative terms, no cancellation of logit-sized numbers.
        ent_value = (a_all * (ent_all - log_a)).sum(0)
        z_y = torch.where(owned, z_t, torch.zeros_like(z_t))
        dist.all_reduce(z_y, group=group)
        logp_value = z_y - lse
        a_r = a_all[rank]
        c_lse = a_r * (ent_r - log_a[rank] - ent_value)

    # value + (surrogate - surrogate.detach()): the value of the first term, the gradient of the second.
    logp_local = torch.where(owned, z_t, torch.zeros_like(z_t)) - a_r * lse_r
    ent_local = a_r * ent_r + c_lse * lse_r
    logp = logp_value + (logp_local - logp_local.detach())
    entropy = ent_value + (ent_local - ent_local.detach())
    zero = torch.zeros_like(logp)
    return torch.where(ignored, zero, logp), torch.where(ignored, zero, entropy)


# ----------------------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos: loss aggregation, the vanilla PPO / GRPO policy loss, GRPO outcome advantages
# ----------------------------------------------------------------------------------------------------------------
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    # Entries outside the mask never contribute, even NaN / inf ones.
    return (torch.where(mask.bool(), values, torch.zeros_like(values)) * mask).sum(dim=axis)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_sum(values, mask) / (mask.sum() + 1e-8)


def _nonzero(x: torch.Tensor | float) -> torch.Tensor | float:
    """A denominator that is 0 only when its numerator is (an all-masked micro-batch): 0 / 0 -> 0, not NaN."""
    if isinstance(x, torch.Tensor):
        return torch.where(x == 0, torch.ones_like(x), x)
    return x if x != 0 else 1


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """A ``(B, L)`` loss matrix to a scalar, as ``verl.trainer.ppo.core_algos.agg_loss`` (verl 0.9).

    ``token-mean``: ``sum(M l) / batch_num_tokens * dp_size``; ``token-sum``: ``sum(M l) * dp_size``;
    ``seq-mean-token-sum``: per-sequence token sums, averaged over the ``global_batch_size`` sequences (default:
    those with a token) ``* dp_size``; ``seq-mean-token-sum-norm``: that divided by ``loss_scale_factor`` (default
    L); ``seq-mean-token-mean``: per-sequence token means, averaged the same way.

    Args:
        loss_mat: ``(B, L)`` float per-token losses.
        loss_mask: ``(B, L)`` bool / float response mask (entries outside it never contribute, NaN included).
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.
        dp_size: data-parallel size; above 1, ``batch_num_tokens`` (token modes) or ``global_batch_size``
            (sequence modes) must be given, as in verl.
        batch_num_tokens, global_batch_size, loss_scale_factor: as in verl.

    Returns:
        a 0-d tensor. Unlike verl, an all-masked micro-batch gives 0 instead of 0 / 0 = NaN.
    """
    _checks.check_tensor("loss_mat", loss_mat)
    _checks.check_tensor("loss_mask", loss_mask)
    if tuple(loss_mask.shape) != tuple(loss_mat.shape):
        raise ValueError(
            f"loss_mask must have the shape of loss_mat {tuple(loss_mat.shape)}, got {tuple(loss_mask.shape)}"
        )
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens (of the global batch) is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return _masked_sum(loss_mat, loss_mask) / _nonzero(batch_num_tokens) * dp_size
    if loss_agg_mode == "token-sum":
        return _masked_sum(loss_mat, loss_mask) * dp_size
    tokens_per_seq = loss_mask.sum(dim=-1)
    seq_losses = _masked_sum(loss_mat, loss_mask, axis=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (tokens_per_seq + 1e-8)
    seq_mask = (tokens_per_seq > 0).float()
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = seq_mask.sum()
    loss = _masked_sum(seq_losses, seq_mask) / _nonzero(global_batch_size) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _clipped_policy_losses(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_low: float,
    cliprange_high: float,
    clip_ratio_c: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token dual-clip PPO losses and verl's three statistics (clip fraction, approx KL, lower clip fraction)."""
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        _checks.check_tensor(name, t)
        if tuple(t.shape) != tuple(log_prob.shape):
            raise ValueError(f"{name} must have the shape of log_prob {tuple(log_prob.shape)}, got {tuple(t.shape)}")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1.0, got {clip_ratio_c}")
    # log r clamped to [-20, 20] as verl does, so one stale token cannot overflow exp.
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = _masked_mean(-neg_kl, response_mask)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip1 = torch.maximum(loss_unclipped, loss_clipped)
    clipfrac = _masked_mean(torch.gt(loss_clipped, loss_unclipped).float(), response_mask)
    # Dual clip: for A < 0 the loss is also bounded by -A * clip_ratio_c (a huge ratio cannot dominate).
    loss_bound = -advantages * clip_ratio_c
    clip2 = torch.minimum(loss_bound, clip1)
    clipfrac_lower = _masked_mean(torch.gt(clip1, loss_bound) * (advantages < 0).float(), response_mask)
    return torch.where(advantages < 0, clip2, clip1), clipfrac, ppo_kl, clipfrac_lower


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dual-clip PPO / GRPO policy loss, as ``verl.trainer.ppo.core_algos.compute_policy_loss`` (verl 0.9).

    ``l = -A r`` clipped to ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, and for ``A < 0`` also
    ``min(., -A c)`` (dual clip, ``c = clip_ratio_c``); ``r = exp(clamp(log_prob - old_log_prob, -20, 20))``;
    aggregated by :func:`agg_loss`.

    Args:
        old_log_prob, log_prob, advantages, response_mask: ``(B, L)``; ``log_prob`` differentiable.
        cliprange: eps for both sides; ``cliprange_low`` / ``cliprange_high`` override one side each.
        clip_ratio_c: the dual-clip bound, > 1.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.

    Returns:
        ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``, 0-d tensors (only ``pg_loss`` carries a gradient).
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    _checks.check_tensor("log_prob", log_prob)
    losses, clipfrac, ppo_kl, clipfrac_lower = _clipped_policy_losses(
        old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c
    )
    pg_loss = agg_loss(losses, response_mask, loss_agg_mode)
    return pg_loss, clipfrac, ppo_kl, clipfrac_lower


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: object | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl 0.9's registered ``"vanilla"`` policy loss (``core_algos.compute_policy_loss_vanilla``).

    ``config`` is verl's ``ActorConfig`` (or anything with ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
    optionally ``clip_ratio_c`` (default 3.0) and ``global_batch_info``, a dict of :func:`agg_loss` keyword
    arguments). ``rollout_is_weights`` ``(B, L)`` multiplies the per-token losses before aggregation.

    Returns:
        ``(pg_loss, metrics)`` with verl's metric names ``actor/pg_clipfrac``, ``actor/ppo_kl``,
        ``actor/pg_clipfrac_lower`` (Python floats).
    """
    if config is None:
        raise ValueError("config (verl's ActorConfig: clip_ratio, clip_ratio_low, clip_ratio_high) is required")
    clip = config.clip_ratio
    low = clip if getattr(config, "clip_ratio_low", None) is None else config.clip_ratio_low
    high = clip if getattr(config, "clip_ratio_high", None) is None else config.clip_ratio_high
    getter = getattr(config, "get", None)
    clip_c = getter("clip_ratio_c", 3.0) if callable(getter) else getattr(config, "clip_ratio_c", 3.0)
    _checks.check_tensor("log_prob", log_prob)
    losses, clipfrac, ppo_kl, clipfrac_lower = _clipped_policy_losses(
        old_log_prob, log_prob, advantages, response_mask, low, high, clip_c
    )
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    pg_loss = agg_loss(losses, response_mask, loss_agg_mode, **(getattr(config, "global_batch_info", None) or {}))
    metrics = {
        "actor/pg_clipfrac": clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": clipfrac_lower.detach().item(),
    }
    return pg_loss, metrics


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Hashable] | np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantages, as ``verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage`` (verl 0.9).

    Each response's score ``s_i = sum_t token_level_rewards[i, t]``; responses sharing an ``index`` value form a
    group (anywhere in the batch, any sizes); ``A_i = (s_i - mean_g) / (std_g + epsilon)`` with the unbiased std
    (``norm_adv_by_std_in_grpo=False``: ``s_i - mean_g``, Dr. GRPO). A group of one keeps its raw score
    (mean 0, std 1, as verl). Vectorized: one scatter per statistic, no Python loop over tensors.

    Args:
        token_level_rewards: ``(B, L)`` float.
        response_mask: ``(B, L)``; the advantage is broadcast over the response tokens and 0 elsewhere.
        index: ``B`` hashable group ids (verl passes the prompt uid array).
        epsilon: added to the std.
        norm_adv_by_std_in_grpo: divide by the group std.
        config: accepted for verl's signature (unused, as in verl's GRPO estimator).

    Returns:
        ``(advantages, returns)``: the same ``(B, L)`` tensor twice (verl returns it twice), in the rewards' dtype,
        without gradient.
    """
    _checks.check_tensor("token_level_rewards", token_level_rewards)
    _checks.check_tensor("response_mask", response_mask)
    if token_level_rewards.dim() != 2 or tuple(response_mask.shape) != tuple(token_level_rewards.shape):
        raise ValueError(
            "token_level_rewards and response_mask must both have shape (B, L), got "
            f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}"
        )
    bsz = token_level_rewards.shape[0]
    if len(index) != bsz:
        raise ValueError(f"index must hold one group id per response ({bsz}), got {len(index)}")
    with torch.no_grad():
        ids: dict[Hashable, int] = {}
        group = [ids.setdefault(k.item() if isinstance(k, np.generic) else k, len(ids)) for k in index]
        dev = token_level_rewards.device
        g = torch.tensor(group, dtype=torch.int64, device=dev)
        scores = token_level_rewards.sum(dim=-1).double()
        n_groups = len(ids)
        count = torch.zeros(n_groups, dtype=torch.float64, device=dev).index_add_(0, g, torch.ones_like(scores))
        mean = torch.zeros(n_groups, dtype=torch.float64, device=dev).index_add_(0, g, scores) / count
        dev_sq = (scores - mean[g]) ** 2
        var = torch.zeros(n_groups, dtype=torch.float64, device=dev).index_add_(0, g, dev_sq) / (count - 1).clamp_min(1)
        single = count[g] == 1
        mean_i = torch.where(single, torch.zeros_like(scores), mean[g])
        std_i = torch.where(single, torch.ones_like(scores), var.sqrt()[g])
        adv = scores - mean_i
        if norm_adv_by_std_in_grpo:
            adv = adv / (std_i + epsilon)
        adv = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return adv, adv
