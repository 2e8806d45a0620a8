"""Helpers shared by the drop-in surfaces (`integrations`, `compat`): calling the public ops on the tensors other
trainers hand over, without the hidden copies their layouts would cause."""

from __future__ import annotations

import torch

from .ops.token_logprobs import token_logprobs


def token_logprobs_any_layout(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    **sampler,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`lacot_kernels.token_logprobs` for logits ``(..., V)`` of any strides, never copying them.

    Trainers score ``logits[:, :-1]`` or ``logits[:, -L - 1 : -1]``: a slice of a (B, T, V) tensor that cannot be
    flattened to (B * L, V) without copying every logit (the op's wrapper would ``reshape`` it). Each ``logits[b]``
    flattens for free, so such inputs are scored one sequence at a time and the results stacked.
    Shapes and dtypes as in ``token_logprobs``: ``(...)`` float32 outputs. ``sampler``: its top_k / top_p /
    min_p / sampler_order keywords.
    """
    if logits.dim() == 3 and logits.shape[0] > 1 and logits.stride(0) != logits.shape[1] * logits.stride(1):
        outs = [
            token_logprobs(
                logits[b],
                targets[b],
                temperature=temperature,
                return_entropy=return_entropy,
                backend=backend,
                **sampler,
            )  # fmt: skip
            for b in range(logits.shape[0])
        ]
        if return_entropy:
            return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
        return torch.stack(outs)
    return token_logprobs(
        logits, targets, temperature=temperature, return_entropy=return_entropy, backend=backend, **sampler
    )
