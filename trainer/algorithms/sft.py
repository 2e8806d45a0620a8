"""SFT: token cross-entropy on rationale + ⊤ + answer tokens (never the prompt or the forced answer header).

A row without a rationale (and a CoT row drawn by ``data.direct_answer_ratio``) trains the direct answer: an
empty rationale, i.e. ⊤ right after the prompt, then the answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import lacot_kernels as lk

from ..data import Example, direct_answer_mix
from ..modeling import IGNORE, Batch, build_batch, completion_hidden
from .base import Algorithm, Prepared, chunks, compute_dtype


@dataclass
class SFTMicroBatch:
    batch: Batch
    targets: torch.Tensor  # (b, T) int64, IGNORE where not trained
    total_tokens: int  # trained tokens of the whole step: every micro-batch divides by it


class SFT(Algorithm):
    needs_rationale = False  # rows without one are direct answers

    def next_batch(self) -> list[Example]:
        batch = self.tr.next_examples()
        return direct_answer_mix(batch, self.cfg.data.direct_answer_ratio, seed=self.cfg.train.seed, step=self.tr.step)

    def prepare(self, examples: list[Example]) -> Prepared:
        tr, codec = self.tr, self.tr.codec
        prompts = [codec.prompt(e) for e in examples]
        comps, masks = [], []
        for e in examples:
            rationale = codec.rationale(e) if e.rationale is not None else []
            ids, mask = codec.chain(rationale, codec.answer(e.answer))
            if not self.cfg.sft.train_rationale:
                n = len(rationale) + 1
                mask = [0] * n + mask[n:]
            comps.append(ids)
            masks.append(mask)
        total = sum(sum(m) for m in masks)  # token mean over the whole step, whatever the micro-batching
        mbs = []
        for sl in chunks(len(examples), self.cfg.train.micro_batch_size):
            batch = build_batch(codec, prompts[sl], comps[sl], tr.device)
            targets = batch.completion.clone()
            for b, m in enumerate(masks[sl]):
                for t, keep in enumerate(m):
                    if not keep:
                        targets[b, t] = IGNORE
            mbs.append(SFTMicroBatch(batch, targets, total))
        return Prepared(mbs, {"tokens": float(total)})

    def loss(self, policy, mb: SFTMicroBatch):
        def head(h, w, bias):
            hs, w, bias = compute_dtype(completion_hidden(h, mb.batch.prompt_len, mb.batch.T), w, bias)
            return lk.fused_linear_token_logprobs(hs, w, mb.targets, bias=bias, backend=self.cfg.model.backend)

        logp = policy(mb.batch.model_inputs(), head)  # (b, T) fp32, 0 at ignored positions
        return -logp.sum() / mb.total_tokens, {}
