"""Greedy accuracy on held-out questions: the loop's periodic evaluation (BiN's full evaluation is in
:mod:`.algorithms.bin`). Kept apart from both so that neither imports the other."""

from __future__ import annotations

from .data import Example
from .rewards import exact_match
from .rollout import sample_chains


def greedy_accuracy(trainer, examples: list[Example]) -> tuple[int, int]:
    """(correct, total): one greedy rationale and answer per example, exact match on the answer."""
    cfg, codec = trainer.cfg, trainer.codec
    correct = 0
    bs = cfg.train.eval_batch_size
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        chains = sample_chains(
            trainer.model,
            codec,
            [codec.prompt(e) for e in chunk],
            max_rationale_tokens=cfg.train.max_new_tokens,
            max_answer_tokens=cfg.train.answer_max_tokens,
            rationale_temperature=None,
        )
        correct += sum(exact_match(codec.decode(c.answer), e.answer) for c, e in zip(chains, chunk, strict=False))
    return correct, len(examples)
