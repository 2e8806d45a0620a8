"""GRPO: G chains per prompt, outcome rewards, group-normalized advantages, clipped surrogate from hidden states.

Per step: sample G chains per prompt (rationale, then answer, both at ``grpo.temperature``; KV cache) ->
rewards (exact match on the answer + a format bonus) -> ``lacot_kernels.group_advantages`` -> old log-probs once
with the forward-only fused op (and reference log-probs when ``beta > 0``) -> ``updates_per_batch`` optimizer
updates of ``lacot_kernels.fused_linear_grpo_loss`` on the same samples. Trained tokens: the rationale, ⊤,
the answer and its end; the forced answer header is masked out.
"""

from __future__ import annotations

import torch

import lacot_kernels as lk

from ..data import Example
from ..modeling import IGNORE, Policy, build_batch, completion_hidden
from ..rewards import exact_match, format_ok
from ..rollout import sample_chains
from . import Algorithm


class GRPO(Algorithm):
    progress_keys = ("reward", "acc")

    def train_step(self, examples: list[Example]) -> dict[str, float]:
        tr, codec, g = self.tr, self.tr.codec, self.cfg.grpo
        G, temp, backend = g.group_size, g.temperature, self.cfg.model.backend
        prompts = [codec.prompt(e) for e in examples for _ in range(G)]
        chains = sample_chains(
            tr.model,
            codec,
            prompts,
            max_rationale_tokens=self.cfg.train.max_new_tokens,
            max_answer_tokens=self.cfg.train.answer_max_tokens,
            rationale_temperature=temp,
            answer_temperature=temp,
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

        with torch.no_grad():
            old_logp = self._logprobs(tr.policy, batch, targets)
            ref_logp = None
            if g.beta > 0:
                with tr.reference() as ref:
                    ref_logp = self._logprobs(Policy(ref), batch, targets)

        stats_acc: dict[str, float] = {}
        grad_norms = []
        slices = tr.micro_batches(len(prompts))
        for _ in range(g.updates_per_batch):
            for i, sl in enumerate(slices):
                sub = build_batch(codec, prompts[sl], comps[sl], tr.device, min_t=batch.T)
                rows = range(sl.start, sl.stop)

                def head(h, w, bias, sub=sub, rows=rows):
                    hs = completion_hidden(h, sub.prompt_len, sub.T)
                    return lk.fused_linear_grpo_loss(
                        hs,
                        w,
                        targets[rows.start : rows.stop],
                        old_logp[rows.start : rows.stop],
                        adv[rows.start : rows.stop],
                        mask[rows.start : rows.stop],
                        bias=bias,
                        temperature=temp,
                        ref_logp=None if ref_logp is None else ref_logp[rows.start : rows.stop],
                        beta=g.beta,
                        eps_low=g.eps_low,
                        eps_high=g.eps_high or None,
                        loss_type=g.loss_type,
                        # dapo: every micro-batch divides by the step's token count, so their sum is the step's loss
                        dapo_normalizer=n_tokens if g.loss_type == "dapo" else None,
                        backend=backend,
                    )

                with tr.no_sync(i < len(slices) - 1):
                    loss, stats = tr.policy(sub.model_inputs(), head)
                    if g.loss_type != "dapo":  # per-batch means: weight each micro-batch by its share of the rows
                        loss = loss * (len(rows) / len(prompts))
                    tr.backward(loss)
                stats_acc["loss"] = stats_acc.get("loss", 0.0) + float(loss.detach()) / g.updates_per_batch
                for k, v in stats.items():
                    stats_acc[k] = stats_acc.get(k, 0.0) + float(v) / (len(slices) * g.updates_per_batch)
            grad_norms.append(tr.optimizer_step())

        groups = rewards.view(-1, G)
        return {
            **stats_acc,
            "reward": float(rewards.mean()),
            "acc": float(correct.mean()),
            "format": float(fmt.mean()),
            "frac_reward_zero_std": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "completion_tokens": n_tokens / len(prompts),
            "grad_norm": sum(grad_norms) / len(grad_norms),
        }

    def _logprobs(self, policy, batch, targets) -> torch.Tensor:
        temp, backend = self.cfg.grpo.temperature, self.cfg.model.backend

        def head(h, w, bias):
            hs = completion_hidden(h, batch.prompt_len, batch.T)
            return lk.fused_linear_token_logprobs(hs, w, targets, bias=bias, temperature=temp, backend=backend)

        return policy(batch.model_inputs(), head)
