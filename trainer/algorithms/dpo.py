"""DPO on correct-vs-incorrect chains sampled from the SFT model (LLaVA-Reasoner's recipe).

Pairs (once, in ``setup``): ``dpo.pair_prompts`` training prompts, ``dpo.num_samples`` chains each from the
starting (SFT) policy; chosen = a chain whose final answer matches the short answer, rejected = one that does
not; prompts with only right or only wrong chains give no pair. Reference log-probs of every pair are computed
then, once, with the forward-only fused op (the policy at step 0 *is* the reference), and the pairs are saved to
``<out_dir>/dpo_pairs.pt`` so a resumed run trains on exactly the same ones.

Step: one forward over ``[chosen; rejected]``, summed completion log-probs (``lacot_kernels.sequence_logprobs``
of the fused op's per-token log-probs), ``lacot_kernels.dpo_loss`` (sigmoid, β = 0.1 by default).
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
from ..rollout import sample_chains
from . import Algorithm


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
                good = [c for c in group if c.terminated and exact_match(codec.decode(c.answer), e.answer)]
                bad = [c for c in group if not exact_match(codec.decode(c.answer), e.answer)]
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
        for start in range(0, len(pairs), 32):
            chunk = pairs[start : start + 32]
            logps = self._sequence_logps(chunk, grad=False)
            for k, p in enumerate(chunk):
                p["ref_chosen"], p["ref_rejected"] = float(logps[k]), float(logps[len(chunk) + k])
        tr.model.train()
        if tr.world > 1:
            gathered: list[Any] = [None] * tr.world
            dist.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        return pairs

    def _sequence_logps(self, pairs: list[dict[str, Any]], *, grad: bool) -> torch.Tensor:
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
            hs = completion_hidden(h, batch.prompt_len, batch.T)
            logp = lk.fused_linear_token_logprobs(hs, w, targets, bias=bias, backend=self.cfg.model.backend)
            return lk.sequence_logprobs(logp, mask)

        with torch.set_grad_enabled(grad):
            return tr.policy(batch.model_inputs(), head)

    def next_batch(self) -> list[dict[str, Any]]:
        return [self.pairs[i] for i in self.pair_sampler.next_indices(self.cfg.train.batch_size)]

    def train_step(self, pairs: list[dict[str, Any]]) -> dict[str, float]:
        tr, d = self.tr, self.cfg.dpo
        logps = self._sequence_logps(pairs, grad=True)
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
        tr.backward(loss)
        grad_norm = tr.optimizer_step()
        return {
            "loss": float(loss.detach()),
            "reward_chosen": float(r_c.mean()),
            "reward_rejected": float(r_r.mean()),
            "reward_acc": float((r_c > r_r).float().mean()),
            "reward_margin": float((r_c - r_r).mean()),
            "logp_chosen": float(logps[:n].detach().mean()),
            "pairs_total": float(len(self.pairs)),
            "grad_norm": grad_norm,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": self.pair_sampler.state() if self.pair_sampler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_position = state.get("pairs")  # applied in setup(), once the pairs are loaded
