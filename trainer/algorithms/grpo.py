"""GRPO: G chains per prompt, outcome rewards, group-normalized advantages, clipped surrogate from hidden states.

Per step: sample G chains per prompt (rationale, then answer, both at ``grpo.temperature``; KV cache) ->
rewards (exact match on the answer + a format bonus) -> ``lacot_kernels.group_advantages`` -> old log-probs once
with the forward-only fused op (and reference log-probs when ``beta > 0``) -> ``updates_per_batch`` optimizer
updates of ``lacot_kernels.fused_linear_grpo_loss`` on the same samples. Trained tokens: the rationale, ⊤,
the answer and its end; the forced answer header is masked out.

With ``grpo.top_k / top_p / min_p`` the rollouts are truncated and the old and trained log-probs are taken under
the same truncation (the reference's stay untruncated); with ``grpo.is_correction`` the sampler's own log-probs
are recorded during generation and passed as ``rollout_logp`` (the rollout-mismatch weights);
``grpo.ratio_level=sequence`` is GSPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import lacot_kernels as lk

from ..data import Example
from ..modeling import IGNORE, Batch, Policy, build_batch, completion_hidden
from ..rewards import exact_match, format_ok
from ..rollout import sample_chains
from .base import Algorithm, Prepared, chunks, compute_dtype


@dataclass
class GRPOMicroBatch:
    batch: Batch  # the micro-batch's rows, padded to the whole batch's completion length
    targets: torch.Tensor  # (b, T) int64, IGNORE where not trained
    old_logp: torch.Tensor  # (b, T) fp32, the policy's log-probs when the batch was sampled
    rollout_logp: torch.Tensor | None  # (b, T) fp32, the sampler's log-probs (grpo.is_correction != none)
    ref_logp: torch.Tensor | None  # (b, T) fp32 when grpo.beta > 0
    adv: torch.Tensor  # (b,) fp32
    mask: torch.Tensor  # (b, T) fp32
    share: float  # rows of this micro-batch / rows of the batch
    n_tokens: float  # trained tokens of the whole batch (dapo's normalizer)


class GRPO(Algorithm):
    progress_keys = ("reward", "acc")

    @property
    def updates_per_batch(self) -> int:
        return self.cfg.grpo.updates_per_batch

    def prepare(self, examples: list[Example]) -> Prepared:
        tr, codec, g = self.tr, self.tr.codec, self.cfg.grpo
        G, temp = g.group_size, g.temperature
        prompts = [codec.prompt(e) for e in examples for _ in range(G)]
        record = g.is_correction != "none"
        chains = sample_chains(
            tr.model,
            codec,
            prompts,
            max_rationale_tokens=self.cfg.train.max_new_tokens,
            max_answer_tokens=self.cfg.train.answer_max_tokens,
            rationale_temperature=temp,
            answer_temperature=temp,
            return_logp=record,
            **self.sampler(),
        )
        golds = [e.answer for e in examples for _ in range(G)]
        correct = torch.tensor(
            [exact_match(codec.decode(c.answer), y) for c, y in zip(chains, golds, strict=False)], dtype=torch.float32
        )
        fmt = torch.tensor(
            [format_ok(c.terminated, c.answered, codec.decode(c.answer)) for c in chains], dtype=torch.float32
        )
        rewards = (g.correct_reward * correct + g.format_reward * fmt).to(tr.device)
        adv = lk.group_advantages(rewards, G, scale=g.scale)  # (B*G,), 0 for groups of equal rewards

        comps, masks = [], []
        for c in chains:
            ids, mask = codec.chain(c.rationale, c.answer)
            if not c.terminated:  # ⊤ was forced after the token budget, not sampled
                mask[len(c.rationale)] = 0
            if not c.answered:
                mask[-1] = 0
            comps.append(ids)
            masks.append(mask)
        batch = build_batch(codec, prompts, comps, tr.device)
        mask = torch.zeros(batch.completion.shape, dtype=torch.float32, device=tr.device)
        for b, m in enumerate(masks):
            mask[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
        targets = batch.completion.masked_fill(mask == 0, IGNORE)
        n_tokens = float(mask.sum())
        rollout_logp = None
        if record:
            # Same layout as codec.chain: Z ⊤ | header (forced, 0) | Y end; a token that was forced, not sampled
            # (⊤ after the budget, a missing end), is masked out and gets 0.
            rollout_logp = torch.zeros(batch.completion.shape, dtype=torch.float32)
            for b, c in enumerate(chains):
                z = c.rationale_logp + [0.0] * (len(c.rationale) + 1 - len(c.rationale_logp))
                y = c.answer_logp + [0.0] * (len(c.answer) + 1 - len(c.answer_logp))
                row = z + [0.0] * len(codec.answer_header_ids) + y
                rollout_logp[b, : len(row)] = torch.tensor(row)
            rollout_logp = rollout_logp.to(tr.device) * mask

        with torch.no_grad():
            old_logp = self._logprobs(tr.policy, batch, targets)
            ref_logp = None
            if g.beta > 0:
                # The KL anchor is the reference model's full distribution: a truncated reference would give
                # log-prob -inf (kl = inf) to every sampled token it would not have kept itself.
                with tr.reference() as ref:
                    ref_logp = self._logprobs(Policy(ref), batch, targets, truncate=False)
        # Under truncation a sampled token can fall just outside the trainer's kept set (its logits differ from
        # the sampler's by rounding at the boundary): its log-prob is -inf and its ratio undefined. Such tokens
        # are dropped from the loss (counted in "truncation_dropped").
        dropped = (mask != 0) & ~torch.isfinite(old_logp)
        n_dropped = int(dropped.sum())
        if n_dropped:
            mask = mask.masked_fill(dropped, 0.0)
            targets = targets.masked_fill(dropped, IGNORE)
            old_logp = old_logp.masked_fill(dropped, 0.0)
            if ref_logp is not None:
                ref_logp = ref_logp.masked_fill(dropped, 0.0)
            if rollout_logp is not None:
                rollout_logp = rollout_logp.masked_fill(dropped, 0.0)
            n_tokens = float(mask.sum())

        mbs = []
        for sl in chunks(len(prompts), self.cfg.train.micro_batch_size):
            mbs.append(
                GRPOMicroBatch(
                    batch=build_batch(codec, prompts[sl], comps[sl], tr.device, min_t=batch.T),
                    targets=targets[sl],
                    old_logp=old_logp[sl],
                    rollout_logp=None if rollout_logp is None else rollout_logp[sl],
                    ref_logp=None if ref_logp is None else ref_logp[sl],
                    adv=adv[sl],
                    mask=mask[sl],
                    share=(sl.stop - sl.start) / len(prompts),
                    n_tokens=n_tokens,
                )
            )
        groups = rewards.view(-1, G)
        return Prepared(
            mbs,
            {
                "reward": float(rewards.mean()),
                "acc": float(correct.mean()),
                "format": float(fmt.mean()),
                "frac_reward_zero_std": float((groups.max(1).values == groups.min(1).values).float().mean()),
                "completion_tokens": n_tokens / len(prompts),
                "truncation_dropped": float(n_dropped),
            },
        )

    def loss(self, policy, mb: GRPOMicroBatch):
        g = self.cfg.grpo

        def head(h, w, bias):
            hs, w, bias = compute_dtype(completion_hidden(h, mb.batch.prompt_len, mb.batch.T), w, bias)
            return lk.fused_linear_grpo_loss(
                hs,
                w,
                mb.targets,
                mb.old_logp,
                mb.adv,
                mb.mask,
                bias=bias,
                temperature=g.temperature,
                ref_logp=mb.ref_logp,
                beta=g.beta,
                eps_low=g.eps_low,
                eps_high=g.eps_high or None,
                loss_type=g.loss_type,
                # dapo: every micro-batch divides by the batch's token count, so their sum is the batch's loss
                dapo_normalizer=mb.n_tokens if g.loss_type == "dapo" else None,
                backend=self.cfg.model.backend,
                rollout_logp=mb.rollout_logp,
                is_correction=g.is_correction,
                is_cap=g.is_cap,
                is_band=(g.is_band_low, g.is_band_high),
                is_level=g.is_level,
                ratio_level=g.ratio_level,
                **self.sampler(),
            )

        loss, stats = policy(mb.batch.model_inputs(), head)
        if g.loss_type != "dapo":  # per-batch means: weight each micro-batch by its share of the rows
            loss = loss * mb.share
        return loss, {k: float(v) * mb.share for k, v in stats.items()}

    def sampler(self) -> dict:
        """The rollout truncation as keyword arguments (None = off), for the sampler and every log-prob."""
        g = self.cfg.grpo
        return dict(
            top_k=g.top_k or None, top_p=g.top_p if g.top_p < 1 else None, min_p=g.min_p if g.min_p > 0 else None
        )

    def _logprobs(self, policy, batch, targets, truncate: bool = True) -> torch.Tensor:
        temp, backend = self.cfg.grpo.temperature, self.cfg.model.backend
        sampler = self.sampler() if truncate else {}

        def head(h, w, bias):
            hs, w, bias = compute_dtype(completion_hidden(h, batch.prompt_len, batch.T), w, bias)
            return lk.fused_linear_token_logprobs(
                hs, w, targets, bias=bias, temperature=temp, backend=backend, **sampler
            )

        return policy(batch.model_inputs(), head)
