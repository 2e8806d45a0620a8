"""SFT: token cross-entropy on rationale + ⊤ + answer tokens (never the prompt or the forced answer header)."""

from __future__ import annotations

import lacot_kernels as lk

from ..data import Example
from ..modeling import IGNORE, build_batch, completion_hidden
from . import Algorithm


class SFT(Algorithm):
    needs_rationale = True

    def train_step(self, examples: list[Example]) -> dict[str, float]:
        tr, codec = self.tr, self.tr.codec
        prompts = [codec.prompt(e) for e in examples]
        comps, masks = [], []
        for e in examples:
            ids, mask = codec.chain(codec.rationale(e), codec.answer(e.answer))
            if not self.cfg.sft.train_rationale:
                n = len(codec.rationale(e)) + 1
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
