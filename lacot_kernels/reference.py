"""Pure-torch references: the oracle of every test and the baseline of every benchmark.

Each function computes in float64 by default (`dtype=torch.float64`), from whatever input dtype it is given,
so that comparing a kernel fed bf16 values with the reference fed *the same* bf16 values measures the kernel's
own error only. They materialize everything (N x V logits included): clarity over memory.
"""

from __future__ import annotations

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
