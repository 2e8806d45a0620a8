"""LaCoT: reference-guided GFlowNet fine-tuning (RGFN) with interpolated sub-trajectory balance.

Per prompt X with answer Y and reference rationale Z_ref (shared/research/lacot.md):

1. sample m rationales from the policy q_θ (KV cache), each at its own temperature: ``temperature_max`` with
   probability ``p_max_temperature``, else U(temperature_min, temperature_max) (the official schedule, with the
   paper's bounds 1.0 / 0.5); the reference rationale is always added to the group;
2. exact log-rewards ``log π_Φ(z_{1:t} ⊤ Y | X)`` under the frozen SFT model at the anchor states of
   ``lacot_kernels.reward_anchors`` (state 0, every λ tokens from ``min_len``, and the terminal state), scored
   with one pass + batched suffixes on the KV cache (:func:`..rewards.lacot_log_rewards`), divided by the
   reward temperature (1.0 -> 0.7 over 50 steps), linearly interpolated in between by
   ``lacot_kernels.interpolate_rewards``. **Y is the answer** (the paper); the official code scores the
   reference rationale in its place (lacot.md D1);
3. RGFN filter: an explored rationale is kept when its terminal reward ``>= δ ·`` the reference's (per token by
   default, as the official code; ``filter_reward=sum`` for the paper's summed form), with δ annealed
   1.5 -> 1.0 over 50 steps; the reference always stays;
4. one teacher-forced pass of q_θ gives ``log q(z_{t+1} | s_t)`` and ``log q(⊤ | s_t)`` at every state (two fused
   op calls on the same hidden states, temperature 1), and ``lacot_kernels.subtb_loss`` sums the interpolated
   SubTB loss over the accepted rationales.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

import lacot_kernels as lk

from ..data import Example
from ..modeling import IGNORE, Batch, build_batch
from ..rewards import lacot_log_rewards
from ..rollout import generate
from .base import Algorithm, Prepared, chunks, compute_dtype, linear_schedule


@dataclass
class LaCoTMicroBatch:
    batch: Batch  # accepted rows, padded to the batch's rationale length T
    term_targets: torch.Tensor  # (b, T + 1) int64: ⊤ at every state of the row, IGNORE past its end
    log_reward: torch.Tensor  # (b, T + 1) fp32, interpolated and tempered
    lengths: torch.Tensor  # (b,) int64
    normalizer: float  # the whole batch's divisor: 1 (reduction sum) or its total pair weight (mean)


def pair_weight(n: int, decay: float) -> float:
    """``sum_{0<=i<j<=n} decay^(j-i-1)``: the weight subtb_loss's "mean" divides by, for one row of length n."""
    return float(sum((n - k + 1) * decay ** (k - 1) for k in range(1, n + 1)))


class LaCoT(Algorithm):
    needs_rationale = True
    progress_keys = ("loss", "accept")

    def __init__(self, trainer):
        super().__init__(trainer)
        self.rng = random.Random(self.cfg.train.seed * 7919 + 17 + trainer.rank)

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])

    def temperatures(self, k: int) -> list[float]:
        c = self.cfg.lacot
        return [
            c.temperature_max
            if self.rng.random() < c.p_max_temperature
            else self.rng.uniform(c.temperature_min, c.temperature_max)
            for _ in range(k)
        ]

    def prepare(self, examples: list[Example]) -> Prepared:
        tr, codec, c = self.tr, self.tr.codec, self.cfg.lacot
        backend = self.cfg.model.backend
        step = tr.step
        delta = linear_schedule(c.delta_start, c.delta_end, c.delta_horizon, step)
        reward_temp = linear_schedule(c.reward_temp_start, c.reward_temp_end, c.reward_temp_horizon, step)
        m, B = c.num_samples, len(examples)
        base = [codec.prompt(e) for e in examples]

        # 1. rollouts: m explored rationales per prompt (per-row temperatures), then the reference rationale.
        explored = []
        if m:
            rows = [p for p in base for _ in range(m)]
            explored = generate(
                tr.model,
                codec,
                rows,
                max_new_tokens=c.max_len,
                eos_id=codec.terminator_id,
                temperature=self.temperatures(len(rows)),
                min_new_tokens=c.min_new_tokens,
                top_k=c.top_k or None,
                top_p=c.top_p if c.top_p < 1 else None,
                min_p=c.min_p if c.min_p > 0 else None,
            )
        group = m + 1
        prompts, rationales, finished, suffixes = [], [], [], []
        for i, e in enumerate(examples):
            suffix = codec.suffix(codec.answer(e.answer))
            for j in range(group):
                if j < m:
                    z, ok = explored[i * m + j]
                else:
                    z, ok = codec.rationale(e)[: c.max_len], True
                prompts.append(base[i])
                rationales.append(z)
                finished.append(ok)
                suffixes.append(suffix)
        batch = build_batch(codec, prompts, rationales, tr.device)
        T = batch.T
        lengths = batch.lengths

        # 2. exact rewards at the anchors (frozen π_Φ), interpolated in between, tempered.
        anchors = lk.reward_anchors(lengths, c.stride, min_len=c.min_len, max_len=T)
        with tr.reference() as ref:
            values, terminal_mean, scores = lacot_log_rewards(
                ref, batch, suffixes, anchors, backend=backend, chunk=c.anchor_chunk
            )
        log_reward = lk.interpolate_rewards(values, anchors) / reward_temp  # (R, T + 1)

        # 3. RGFN filter against the group's reference rationale (the last row of each group).
        idx = torch.arange(len(rationales), device=tr.device)
        terminal = values[idx, lengths]
        score = terminal_mean if c.filter_reward == "mean" else terminal
        score = score.view(B, group)
        accept = score >= delta * score[:, -1:]
        accept[:, -1] = True
        accept = accept.flatten()

        # 4. policy pass: log q(z_{t+1} | s_t) (B, T) and log q(⊤ | s_t) (B, T + 1), both from one backbone pass.
        term_targets = torch.full((len(rationales), T + 1), codec.terminator_id, dtype=torch.long, device=tr.device)
        term_targets[torch.arange(T + 1, device=tr.device).unsqueeze(0) > lengths.unsqueeze(1)] = IGNORE
        rows_acc = accept.nonzero().flatten().tolist()
        if c.reduction == "mean":  # the pooled mean of the whole batch: one divisor for every micro-batch
            normalizer = sum(pair_weight(int(lengths[r]), c.subtb_decay) for r in rows_acc) or 1.0
        else:
            normalizer = 1.0
        mbs = []
        for sl in chunks(len(rows_acc), self.cfg.train.micro_batch_size):
            sel = rows_acc[sl]
            sel_t = torch.tensor(sel, dtype=torch.long, device=tr.device)
            sub = build_batch(codec, [prompts[r] for r in sel], [rationales[r] for r in sel], tr.device, min_t=T)
            mbs.append(LaCoTMicroBatch(sub, term_targets[sel_t], log_reward[sel_t], lengths[sel_t], normalizer))

        explored_mask = torch.ones(B, group, dtype=torch.bool, device=tr.device)
        explored_mask[:, -1] = False
        explored_mask = explored_mask.flatten()
        ex_len = lengths[explored_mask].float()
        stats = {
            "accept": float(accept[explored_mask].float().mean()) if m else 1.0,
            "log_reward_explored": float(terminal_mean[explored_mask].mean()) if m else 0.0,
            "log_reward_reference": float(terminal_mean[~explored_mask].mean()),
            "rationale_tokens": float(ex_len.mean()) if m else 0.0,
            "finished": float(torch.tensor(finished, dtype=torch.float32)[explored_mask.cpu()].mean()) if m else 1.0,
            "anchors_per_row": float(anchors.sum()) / len(rationales),
            "reward_model_tokens": float(scores.model_tokens),
            "delta": delta,
            "reward_temp": reward_temp,
        }
        return Prepared(mbs, stats)

    def loss(self, policy, mb: LaCoTMicroBatch):
        c, backend, T = self.cfg.lacot, self.cfg.model.backend, mb.batch.T

        def head(h, w, bias):
            P = mb.batch.prompt_len
            h, w, bias = compute_dtype(h, w, bias)
            log_pf = lk.fused_linear_token_logprobs(
                h[:, P - 1 : P - 1 + T], w, mb.batch.completion, bias=bias, backend=backend
            )
            log_term = lk.fused_linear_token_logprobs(
                h[:, P - 1 : P + T], w, mb.term_targets, bias=bias, backend=backend
            )
            per_row = lk.subtb_loss(log_pf, log_term, mb.log_reward, mb.lengths, decay=c.subtb_decay, reduction="none")
            return per_row.sum() / mb.normalizer

        return policy(mb.batch.model_inputs(), head), {}
