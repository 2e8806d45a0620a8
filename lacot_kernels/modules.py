"""``nn.Module`` surfaces of the fused LM-head ops, called the way Liger-Kernel's losses are called.

Options go to the constructor, tensors to ``forward``, in the argument order of the Liger counterpart, so swapping
``LigerFusedLinearCrossEntropyLoss`` / ``LigerFusedLinearGRPOLoss`` / ``LigerFusedLinearDPOLoss`` for these keeps
the call sites:

* :class:`FusedLinearTokenLogprobs` - ``forward(lin_weight, _input, target, bias=None)`` -> per-token log-probs
  (and entropies) of ``target``; ``-logp`` is Liger's ``reduction="none"`` cross-entropy.
* :class:`FusedLinearGRPOLoss` - ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages,
  bias=None, ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
  num_items_in_batch=None)`` -> ``(loss, stats)``.
* :class:`FusedLinearDPOLoss` - ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
  ref_bias=None)`` with chosen rows stacked above rejected rows -> ``(loss, (chosen_logps, rejected_logps,
  chosen_rewards, rejected_rewards))``.

Each module only calls the public functions :func:`lacot_kernels.fused_linear_token_logprobs`,
:func:`lacot_kernels.fused_linear_grpo_loss`, :func:`lacot_kernels.sequence_logprobs` and
:func:`lacot_kernels.dpo_loss`; the modules hold no parameters (the LM head stays the model's).
"""

from __future__ import annotations

import torch

from . import _checks, dpo_loss, fused_linear_grpo_loss, fused_linear_token_logprobs, sequence_logprobs

__all__ = ["FusedLinearDPOLoss", "FusedLinearGRPOLoss", "FusedLinearTokenLogprobs"]


class FusedLinearTokenLogprobs(torch.nn.Module):
    """``log_softmax((_input @ lin_weight.T + bias) / temperature)[target]`` per token, never forming the logits.

    Args:
        temperature: finite, > 0.
        ignore_index: target value of positions to skip (they give exactly 0 and cost no matmul work).
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per token.
        backend: ``"auto" | "cuda" | "triton" | "torch"``.

    ``forward(lin_weight, _input, target, bias=None)``: ``lin_weight`` ``(V, D)``; ``_input`` ``(..., D)`` float32 /
    bfloat16 / float16, same dtype; ``target`` ``(...)`` int32 / int64; ``bias`` optional ``(V,)``. Returns
    ``logp`` ``(...)`` float32, or ``(logp, entropy)``; differentiable with respect to ``_input``, ``lin_weight``
    and ``bias``.
    """

    def __init__(
        self, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.temperature = _checks.check_temperature(temperature)
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.backend = backend

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return fused_linear_token_logprobs(
            _input,
            lin_weight,
            target,
            bias=bias,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            return_entropy=self.return_entropy,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, return_entropy={self.return_entropy}"


class FusedLinearGRPOLoss(torch.nn.Module):
    """TRL's GRPO loss (:func:`lacot_kernels.grpo_loss`) straight from the LM head, Liger's constructor names.

    Args:
        beta: weight of the k3 KL to the reference policy (>= 0; needs reference log-probs when > 0).
        epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]`` (``epsilon_high`` defaults to
            ``epsilon_low``).
        loss_type: ``"grpo" | "bnpo" | "dr_grpo" | "dapo"``.
        max_completion_length: ``dr_grpo``'s ``L`` (default: the completion length T).
        temperature: the policy is ``softmax(logits / temperature)``.
        backend: ``"auto" | "cuda" | "triton" | "torch"``.

    ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
    ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
    num_items_in_batch=None)``:

    * ``_input`` ``(B, T, D)`` hidden states of the completion positions; ``lin_weight`` ``(V, D)``, same dtype;
    * ``selected_token_ids`` ``(B, T)`` int; ``attention_mask`` ``(B, T)`` completion mask; ``advantages`` ``(B,)``;
    * ``old_per_token_logps`` ``(B, T)``: the sampling policy's log-probs. None means on-policy: they are computed
      here under ``no_grad`` (one extra head pass; pass them to save it);
    * ``ref_per_token_logps`` ``(B, T)``, or ``ref_input`` (+ ``ref_weight``, ``ref_bias``) to compute them here
      under ``no_grad`` (``ref_weight`` defaults to ``lin_weight``);
    * ``num_items_in_batch``: ``dapo``'s normalizer (the generation batch's token count), as TRL passes it.

    Returns ``(loss, stats)``: a 0-d float32 loss differentiable with respect to ``_input``, ``lin_weight`` and
    ``bias``, and TRL-named 0-d statistics (see :func:`lacot_kernels.grpo_loss`).
    """

    def __init__(
        self,
        beta: float = 0.0,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.beta = beta
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.temperature = _checks.check_temperature(temperature)
        self.backend = backend

    def _logps(self, hidden, weight, bias, targets, mask) -> torch.Tensor:
        # Positions outside the mask are not scored (ignore_index), whatever id they hold.
        masked = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
        with torch.no_grad():
            return fused_linear_token_logprobs(
                hidden, weight, masked, bias=bias, temperature=self.temperature, backend=self.backend
            )

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _checks.check_tensor("attention_mask", attention_mask)
        _checks.check_tensor("selected_token_ids", selected_token_ids)
        if ref_per_token_logps is None and ref_input is not None:
            ref_w = lin_weight if ref_weight is None else ref_weight
            ref_per_token_logps = self._logps(ref_input, ref_w, ref_bias, selected_token_ids, attention_mask)
        if old_per_token_logps is None:
            old_per_token_logps = self._logps(_input, lin_weight, bias, selected_token_ids, attention_mask)
        return fused_linear_grpo_loss(
            _input,
            lin_weight,
            selected_token_ids,
            old_per_token_logps,
            advantages,
            attention_mask,
            bias=bias,
            temperature=self.temperature,
            ref_logp=ref_per_token_logps,
            beta=self.beta,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            loss_type=self.loss_type,
            max_completion_length=self.max_completion_length,
            dapo_normalizer=num_items_in_batch if self.loss_type == "dapo" else None,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}, "
            f"loss_type={self.loss_type!r}, temperature={self.temperature}"
        )


class FusedLinearDPOLoss(torch.nn.Module):
    """DPO (:func:`lacot_kernels.dpo_loss`) straight from the LM head: chosen rows stacked above rejected rows.

    Args:
        beta: finite, > 0.
        loss_type: ``"sigmoid" | "hinge" | "ipo" | "robust"``.
        label_smoothing: as in :func:`lacot_kernels.dpo_loss`.
        ignore_index: target value of positions that are not part of the completion.
        average_log_prob: score each sequence by its mean token log-prob instead of the sum.
        use_ref_model: False scores against a uniform reference (reference log-probs 0).
        temperature: the policy is ``softmax(logits / temperature)``.
        backend: ``"auto" | "cuda" | "triton" | "torch"``.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``:
    ``_input`` ``(2B, T, D)`` with the B chosen sequences first, ``target`` ``(2B, T)`` (already shifted: entry
    ``t`` is the token predicted from ``_input[:, t]``), ``ignore_index`` outside completions. With
    ``use_ref_model`` the reference log-probs come from ``ref_input`` (default ``_input``) and ``ref_weight``
    (default ``lin_weight``) under ``no_grad``.

    Returns ``(loss, (chosen_logps, rejected_logps, chosen_rewards, rejected_rewards))``: ``loss`` 0-d float32,
    differentiable with respect to ``_input``, ``lin_weight`` and ``bias``; the others ``(B,)`` float32 (the
    sequence log-probs keep their graph, the rewards are detached). Unlike Liger no logits means are returned:
    the logits are never formed.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        average_log_prob: bool = False,
        use_ref_model: bool = True,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.average_log_prob = average_log_prob
        self.use_ref_model = use_ref_model
        self.temperature = _checks.check_temperature(temperature)
        self.backend = backend

    def _sequence_logps(self, hidden, weight, bias, target) -> tuple[torch.Tensor, torch.Tensor]:
        logp = fused_linear_token_logprobs(
            hidden,
            weight,
            target,
            bias=bias,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )
        mask = target != self.ignore_index
        return sequence_logprobs(logp, mask, normalize=self.average_log_prob), mask.sum(-1)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        _checks.check_tensor("_input", _input)
        _checks.check_tensor("target", target)
        if target.dim() != 2 or target.shape[0] % 2 != 0:
            raise ValueError(f"target must have shape (2B, T) with the B chosen rows first, got {tuple(target.shape)}")
        half = target.shape[0] // 2
        seq, lengths = self._sequence_logps(_input, lin_weight, bias, target)
        if self.use_ref_model:
            with torch.no_grad():
                ref_seq, _ = self._sequence_logps(
                    _input.detach() if ref_input is None else ref_input,
                    lin_weight.detach() if ref_weight is None else ref_weight,
                    (bias.detach() if bias is not None else None) if ref_weight is None else ref_bias,
                    target,
                )
        else:
            ref_seq = torch.zeros_like(seq)
        ipo_lengths = self.loss_type == "ipo" and not self.average_log_prob
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            seq[:half],
            seq[half:],
            ref_seq[:half],
            ref_seq[half:],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=lengths[:half] if ipo_lengths else None,
            rejected_lengths=lengths[half:] if ipo_lengths else None,
        )
        return loss, (seq[:half], seq[half:], chosen_rewards, rejected_rewards)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, average_log_prob={self.average_log_prob}"
