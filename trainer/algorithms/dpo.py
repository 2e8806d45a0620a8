"""DPO on correct-vs-incorrect chains sampled from the SFT model (LLaVA-Reasoner's recipe).

Pairs (once, in ``setup``): ``dpo.pair_prompts`` training prompts, ``dpo.num_samples`` chains each from the
starting (SFT) policy; chosen = a chain whose final answer matches the short answer, rejected = one that does
not; prompts with only right or only wrong chains give no pair. Reference log-probs of every pair are computed
then, once, with the forward-only fused op (the policy at step 0 *is* the reference), and the pairs are saved to
``<out_dir>/dpo_pairs.pt`` so a resumed run trains on exactly the same ones.

Only chains that ended on their own are paired (:func:`split_chains`): a chain that hit
``train.max_new_tokens`` before ⊤ (or ``train.answer_max_tokens`` before the answer's end) would be scored with a
terminator the trainer forced, not one the model chose, and DPO would then push down (for a rejected chain) or
up the probability of a token the model never sampled there. Such chains are dropped, not masked: masking the
forced token would compare a chain without an end against one with it.

Step: micro-batches of ``train.micro_batch_size`` pairs (0 = all), each one forward over ``[chosen; rejected]``,
summed completion log-probs (``lacot_kernels.sequence_logprobs`` of the fused op's per-token log-probs),
``lacot_kernels.dpo_loss`` (sigmoid, β = 0.1 by default) weighted by the micro-batch's share of the pairs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import lacot_kernels as lk

from ..data import Sampler
from ..modeling import IGNORE, build_batch, completion_hidden
from ..rewards import exact_match
from ..rollout import Chain, sample_chains
from .base import Algorithm, Prepared, chunks, compute_dtype


def split_chains(chains: list[Chain], gold: str, decode) -> tuple[list[Chain], list[Chain]]:
    """(correct, incorrect) among the chains that emitted ⊤ and closed their answer themselves."""
    ended = [c for c in chains if c.terminated and c.answered]
    right = [exact_match(decode(c.answer), gold) for c in ended]
    return [c for c, r in zip(ended, right, strict=True) if r], [c for c, r in zip(ended, right, strict=True) if not r]


class DPO(Algorithm):
    progress_keys = ("loss", "reward_acc")

    def __init__(self, trainer):
        super().__init__(trainer)
        self.pairs: list[dict[str, Any]] = []
        self.pair_sampler: Sampler | None = None
        self._resumed_position: dict[str, int] | None = None

    @property
    def path(self) -> Path:
        return self.tr.out_dir / "dpo_pairs.pt"

    def setup(self) -> None:
        tr = self.tr
        if self.path.is_file():
            self.pairs = torch.load(self.path, weights_only=False)
        else:
            self.pairs = self._build_pairs()
            if tr.is_main:
                tmp = self.path.with_suffix(".tmp")
                torch.save(self.pairs, tmp)
                os.replace(tmp, self.path)
            if tr.world > 1:
                dist.barrier()
        if not self.pairs:
            raise RuntimeError(
                "DPO found no prompt with both a correct and an incorrect sampled chain: raise dpo.num_samples, "
                "dpo.temperature or dpo.pair_prompts"
            )
        self.pair_sampler = Sampler(len(self.pairs), seed=self.cfg.train.seed + 1, rank=tr.rank, world_size=tr.world)
        if self._resumed_position:
            self.pair_sampler.load_state(self._resumed_position)

    @torch.no_grad()
    def _build_pairs(self) -> list[dict[str, Any]]:
        tr, codec, d = self.tr, self.tr.codec, self.cfg.dpo
        rng = random.Random(self.cfg.train.seed)
        order = list(range(len(tr.train_examples)))
        rng.shuffle(order)
        chosen_idx = order[: d.pair_prompts][tr.rank :: tr.world]
        pairs: list[dict[str, Any]] = []
        per_call = max(1, self.cfg.train.eval_batch_size // d.num_samples)
        for start in range(0, len(chosen_idx), per_call):
            idx = chosen_idx[start : start + per_call]
            exs = [tr.train_examples[i] for i in idx]
            prompts = [codec.prompt(e) for e in exs for _ in range(d.num_samples)]
            chains = sample_chains(
                tr.model,
                codec,
                prompts,
                max_rationale_tokens=self.cfg.train.max_new_tokens,
                max_answer_tokens=self.cfg.train.answer_max_tokens,
                rationale_temperature=d.temperature,
                answer_temperature=d.temperature,
            )
            for q, (i, e) in enumerate(zip(idx, exs, strict=False)):
                group = chains[q * d.num_samples : (q + 1) * d.num_samples]
                good, bad = split_chains(group, e.answer, codec.decode)
                for _ in range(min(d.pairs_per_prompt, len(good), len(bad))):
                    cw, cl = good.pop(rng.randrange(len(good))), bad.pop(rng.randrange(len(bad)))
                    pairs.append(
                        {
                            "example": i,
                            "chosen": codec.chain(cw.rationale, cw.answer),
                            "rejected": codec.chain(cl.rationale, cl.answer),
                        }
                    )
        # Reference log-probs, once: the policy has not been updated yet, so it is the reference.
        tr.model.eval()
        per_pass = self.cfg.train.micro_batch_size or 32
        for start in range(0, len(pairs), per_pass):
            chunk = pairs[start : start + per_pass]
            logps = self._sequence_logps(chunk, grad=False)
            for k, p in enumerate(chunk):
                p["ref_chosen"], p["ref_rejected"] = float(logps[k]), float(logps[len(chunk) + k])
        tr.model.train()
        if tr.world > 1:
            gathered: list[Any] = [None] * tr.world
            dist.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        return pairs

    def _sequence_logps(self, pairs: list[dict[str, Any]], *, grad: bool, policy=None) -> torch.Tensor:
        """Summed completion log-probs of ``[chosen...; rejected...]`` -> (2 * len(pairs),) fp32."""
        tr, codec = self.tr, self.tr.codec
        exs = [tr.train_examples[p["example"]] for p in pairs]
        prompts = [codec.prompt(e) for e in exs] * 2
        comps = [p["chosen"][0] for p in pairs] + [p["rejected"][0] for p in pairs]
        masks = [p["chosen"][1] for p in pairs] + [p["rejected"][1] for p in pairs]
        batch = build_batch(codec, prompts, comps, tr.device)
        mask = torch.zeros(batch.completion.shape, dtype=torch.float32, device=tr.device)
        for b, m in enumerate(masks):
            mask[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
        targets = batch.completion.masked_fill(mask == 0, IGNORE)

        def head(h, w, bias):
            hs, w, bias = compute_dtype(completion_hidden(h, batch.prompt_len, batch.T), w, bias)
            logp = lk.fused_linear_token_logprobs(hs, w, targets, bias=bias, backend=self.cfg.model.backend)
            return lk.sequence_logprobs(logp, mask)

        with torch.set_grad_enabled(grad):
            return (policy or tr.policy)(batch.model_inputs(), head)

    def next_batch(self) -> list[dict[str, Any]]:
        return [self.pairs[i] for i in self.pair_sampler.next_indices(self.cfg.train.batch_size)]

    def prepare(self, pairs: list[dict[str, Any]]) -> Prepared:
        # A micro-batch is a slice of the pairs, tokenized in loss(): 2 sequences per pair in one forward.
        n = len(pairs)
        mbs = [(pairs[sl], (sl.stop - sl.start) / n) for sl in chunks(n, self.cfg.train.micro_batch_size)]
        return Prepared(mbs, {"pairs_total": float(len(self.pairs))})

    def loss(self, policy, micro_batch: tuple[list[dict[str, Any]], float]):
        tr, d = self.tr, self.cfg.dpo
        pairs, share = micro_batch  # share: this slice's fraction of the step's pairs (dpo_loss is a mean)
        logps = self._sequence_logps(pairs, grad=True, policy=policy)
        n = len(pairs)
        ref_c = torch.tensor([p["ref_chosen"] for p in pairs], device=tr.device)
        ref_r = torch.tensor([p["ref_rejected"] for p in pairs], device=tr.device)
        lengths = None
        if d.loss_type == "ipo":
            lengths = {
                "chosen_lengths": torch.tensor([sum(p["chosen"][1]) for p in pairs], device=tr.device),
                "rejected_lengths": torch.tensor([sum(p["rejected"][1]) for p in pairs], device=tr.device),
            }
        loss, r_c, r_r = lk.dpo_loss(
            logps[:n],
            logps[n:],
            ref_c,
            ref_r,
            beta=d.beta,
            loss_type=d.loss_type,
            label_smoothing=d.label_smoothing,
            **(lengths or {}),
        )
        stats = {
            "reward_chosen": float(r_c.mean()),
            "reward_rejected": float(r_r.mean()),
            "reward_acc": float((r_c > r_r).float().mean()),
            "reward_margin": float((r_c - r_r).mean()),
            "logp_chosen": float(logps[:n].detach().mean()),
        }
        return loss * share, {k: v * share for k, v in stats.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": self.pair_sampler.state() if self.pair_sampler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_position = state.get("pairs")  # applied in setup(), once the pairs are loaded
