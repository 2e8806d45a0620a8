"""SFT: token cross-entropy on rationale + ⊤ + answer tokens (never the prompt or the forced answer header).

A row without a rationale (and a CoT row drawn by ``data.direct_answer_ratio``) trains the direct answer: an
empty rationale, i.e. ⊤ right after the prompt, then the answer."""

from __future__ import annotations

import lacot_kernels as lk

from ..data import Example, direct_answer_mix
from ..modeling import IGNORE, build_batch, completion_hidden
from . import Algorithm


class SFT(Algorithm):
    needs_rationale = False  # rows without one are direct answers

    def next_batch(self) -> list[Example]:
        batch = self.tr.next_examples()
        return direct_answer_mix(batch, self.cfg.data.direct_answer_ratio, seed=self.cfg.train.seed, step=self.tr.step)

    def train_step(self, examples: list[Example]) -> dict[str, float]:
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
        loss_sum = 0.0
        slices = tr.micro_batches(len(examples))
        for i, sl in enumerate(slices):
            batch = build_batch(codec, prompts[sl], comps[sl], tr.device)
            targets = batch.completion.clone()
            for b, m in enumerate(masks[sl]):
                for t, keep in enumerate(m):
                    if not keep:
                        targets[b, t] = IGNORE

            def head(h, w, bias, batch=batch, targets=targets):
                hs = completion_hidden(h, batch.prompt_len, batch.T)
                return lk.fused_linear_token_logprobs(hs, w, targets, bias=bias, backend=self.cfg.model.backend)

            with tr.no_sync(i < len(slices) - 1):
                logp = tr.policy(batch.model_inputs(), head)  # (b, T) fp32, 0 at ignored positions
                loss = -logp.sum() / total
                tr.backward(loss)
            loss_sum += float(loss.detach())
        grad_norm = tr.optimizer_step()
        return {"loss": loss_sum, "tokens": float(total), "grad_norm": grad_norm}
