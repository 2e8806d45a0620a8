"""verl's log-prob and entropy functions, by name and signature, on lacot_kernels' ops.

Swap one import and keep the call sites::

    # from verl.utils.torch_functional import logprobs_from_logits, entropy_from_logits
    from lacot_kernels.compat.verl import logprobs_from_logits, entropy_from_logits

    logits.div_(temperature)                                  # verl applies the temperature before the calls
    log_probs = logprobs_from_logits(logits, responses)       # (B, L) float32
    entropy = entropy_from_logits(logits)                     # (B, L) float32

and, for verl's fused path (``use_fused_kernels``), ``linear_cross_entropy(hidden, weight, labels, temperature)``
with the signature of ``verl.utils.kernel.linear_cross_entropy``.

Same math as verl; what differs on purpose: every output is float32 and accumulated in fp32 whatever the logits
dtype (verl's torch fallbacks return the logits dtype, e.g. bf16 entropies), labels equal to -100 give 0 (as
verl's flash-attn path does), and nothing here needs flash-attn or a GPU. The ``(B, L, V)`` logits are never
copied or upcast: a slice such as ``logits[:, -L - 1 : -1]`` is scored as it is.
"""

from __future__ import annotations

import torch

from .. import _checks, fused_linear_token_logprobs
from .._dropin import token_logprobs_any_layout

__all__ = ["entropy_from_logits", "entropy_from_logits_with_chunking", "linear_cross_entropy", "logprobs_from_logits"]


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
        weight: ``(V, D)`` LM-head weight, same dtype.
        labels: ``(...)`` int32 / int64 in ``[0, V)``; ``-100`` gives 0 and costs no work.
        temperature: > 0 (None means 1.0); the distribution is ``softmax(hidden @ weight.T / temperature)``.
        reduction: ``"none"`` (None means "none"), the only reduction verl supports.
        dist_process_group: must be None: vocabulary-parallel heads are not supported.

    Returns:
        ``(logprobs, entropy)``, each ``(N,)`` float32 (flattened, as verl returns them), differentiable with respect
        to ``hidden`` and ``weight``; the logits are never materialized.
    """
    if temperature is None:
        temperature = 1.0
    if reduction is None:
        reduction = "none"
    if reduction != "none":
        raise ValueError(
            f"reduction must be 'none' (the only one verl's linear_cross_entropy supports), got {reduction!r}"
        )
    if dist_process_group is not None:
        raise NotImplementedError(
            "dist_process_group: vocabulary-parallel LM heads are not supported; pass the full weight and None"
        )
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
    logp, ent = fused_linear_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature=temperature,
        return_entropy=True,
    )
    return logp, ent
