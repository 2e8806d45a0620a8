"""BiN (Bayesian inference over N rationales) evaluation, with greedy, majority vote and Best-of-N on the same samples.

Per question, as LaCoT's evaluation (shared/research/lacot.md §6): N rationales sampled from the policy q_θ, one
greedy answer per rationale written by the **answer model** (π_Φ, the SFT model, by default; the policy with
``bin.answers=policy``); the distinct answers are the candidates. Every candidate a is scored against every
rationale n by the length-normalized joint log-likelihood ``log p(z_n ⊤ Y_a | X) / (|z_n| + |⊤Y_a|)`` under the
scorer (q_θ as the official code, or π_Φ as the paper with ``bin.scorer=reference``; one shared pass per
rationale, suffixes batched on its KV cache, log-probs from the fused op), and ``lacot_kernels.bin_rank`` picks
``argmax_a reduce_n``. For comparison on the *same* samples:

* ``greedy``: one greedy rationale and answer from the policy alone;
* ``majority``: the most frequent of the N answers (ties: the earliest);
* ``bon``: the official Best-of-N baseline (``qwen25_cot_bon.py``): the answer whose own tokens (+ its end token)
  have the highest mean log-probability under the answer model that wrote them, given its rationale;
* ``bon_joint``: Best-of-N by the joint ``log p(z_n ⊤ Y_n | X)`` per token under the scorer (rationale included);
* ``pass@N``: some sample is right (an upper bound for any ranking of these samples).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Any

import torch

import lacot_kernels as lk

from ..data import Example
from ..modeling import Codec, build_batch
from ..rewards import SuffixQuery, exact_match, normalize_answer, score_suffixes
from ..rollout import Chain, sample_chains
from .base import Algorithm, TrainResult


@torch.no_grad()
def bin_evaluate(
    model: torch.nn.Module,
    codec: Codec,
    examples: list[Example],
    *,
    n: int,
    temperature: float,
    reduce: str = "mean",
    max_rationale_tokens: int = 64,
    max_answer_tokens: int = 16,
    batch_questions: int = 32,
    scorer: torch.nn.Module | None = None,
    answer_model: torch.nn.Module | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, float]:
    """Accuracies (fractions) of greedy / majority / bon / bon_joint / bin / pass@N and the mean per-sample accuracy.

    ``scorer`` (default ``model``) scores BiN and ``bon_joint``; ``answer_model`` (default ``model``) writes the
    answers after the sampled rationales and scores the official ``bon``.
    """
    scorer = scorer if scorer is not None else model
    answer_model = answer_model if answer_model is not None else model
    device = next(model.parameters()).device
    hits = Counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="eval", unit="q", dynamic_ncols=True, file=sys.stderr, leave=False)
    for start in range(0, len(examples), batch_questions):
        chunk = examples[start : start + batch_questions]
        prompts = [codec.prompt(e) for e in chunk]
        greedy = sample_chains(
            model,
            codec,
            prompts,
            max_rationale_tokens=max_rationale_tokens,
            max_answer_tokens=max_answer_tokens,
            rationale_temperature=None,
        )
        rows = [p for p in prompts for _ in range(n)]
        chains = sample_chains(
            model,
            codec,
            rows,
            max_rationale_tokens=max_rationale_tokens,
            max_answer_tokens=max_answer_tokens,
            rationale_temperature=temperature,
            answer_temperature=None,  # one greedy answer per rationale, as LaCoT's evaluation
            answer_model=answer_model,
        )
        # Candidates: the distinct (normalized) answers of each question, represented by their first occurrence.
        cands: list[list[tuple[str, list[int]]]] = []
        for q in range(len(chunk)):
            seen: dict[str, list[int]] = {}
            for c in chains[q * n : (q + 1) * n]:
                key = normalize_answer(codec.decode(c.answer))
                seen.setdefault(key, c.answer)
            cands.append(list(seen.items()))
        A = max(len(c) for c in cands)
        queries, where = [], []
        for q, cand in enumerate(cands):
            for j in range(n):
                row = q * n + j
                for a, (_, ans_ids) in enumerate(cand):
                    queries.append(SuffixQuery(row, len(chains[row].rationale), *codec.suffix(ans_ids)))
                    where.append((q, a, j))
        batch = build_batch(codec, rows, [c.rationale for c in chains], device)
        sc = score_suffixes(scorer, batch, queries, backend=backend)
        per_token = (sc.total / sc.tokens.to(sc.total.dtype)).float()
        scores = torch.zeros(len(chunk), A, n, dtype=torch.float32, device=device)
        valid = torch.zeros(len(chunk), A, dtype=torch.bool, device=device)
        qi = torch.tensor(where, dtype=torch.long, device=device)
        scores[qi[:, 0], qi[:, 1], qi[:, 2]] = per_token
        valid[qi[:, 0], qi[:, 1]] = True
        best, _ = lk.bin_rank(scores, valid=valid, reduce=reduce)
        answer_lp = own_answer_logprobs(answer_model, codec, batch, chains, backend=backend)
        for q, e in enumerate(chunk):
            answers = [normalize_answer(codec.decode(c.answer)) for c in chains[q * n : (q + 1) * n]]
            keys = [k for k, _ in cands[q]]
            own = [scores[q, keys.index(answers[j]), j].item() for j in range(n)]
            votes = Counter(answers)
            top = max(votes.values())
            majority = next(a for a in answers if votes[a] == top)
            bon = answers[max(range(n), key=lambda j: answer_lp[q * n + j])]
            bon_joint = answers[max(range(n), key=lambda j: own[j])]
            b = int(best[q])
            hits["greedy"] += exact_match(codec.decode(greedy[q].answer), e.answer)
            hits["majority"] += exact_match(majority, e.answer)
            hits["bon"] += exact_match(bon, e.answer)
            hits["bon_joint"] += exact_match(bon_joint, e.answer)
            hits["bin"] += b >= 0 and exact_match(keys[b], e.answer)
            hits["pass"] += any(exact_match(a, e.answer) for a in answers)
            hits["sample"] += sum(exact_match(a, e.answer) for a in answers) / n
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    total = max(1, len(examples))
    return {
        "greedy": hits["greedy"] / total,
        "majority": hits["majority"] / total,
        "bon": hits["bon"] / total,
        "bon_joint": hits["bon_joint"] / total,
        "bin": hits["bin"] / total,
        "pass@n": hits["pass"] / total,
        "sample_mean": hits["sample"] / total,
    }


def own_answer_logprobs(
    answer_model: torch.nn.Module, codec: Codec, batch, chains: list[Chain], *, backend: str = "auto"
) -> list[float]:
    """Per chain, the mean log-probability of its own answer tokens and answer end under ``answer_model``, given
    the prompt, its rationale, ⊤ and the answer header (the official Best-of-N score: only the answer is scored)."""
    queries = []
    for row, c in enumerate(chains):
        ids, scored = codec.suffix(c.answer)
        scored = [0] * (1 + len(codec.answer_header_ids)) + scored[1 + len(codec.answer_header_ids) :]
        queries.append(SuffixQuery(row, len(c.rationale), ids, scored))
    sc = score_suffixes(answer_model, batch, queries, backend=backend)
    counts = torch.tensor([sum(q.weights) for q in queries], dtype=torch.float32, device=sc.suffix.device)
    return (sc.suffix.float() / counts).tolist()


def check_reference(cfg) -> None:
    """π_Φ must be a model of its own: ``bin.scorer=reference`` or ``bin.answers=reference`` without
    ``model.ref_path`` would silently use the policy (the model is loaded without an adapter to switch off)."""
    b = cfg.bin
    uses = [f"bin.{k}=reference" for k in ("scorer", "answers") if getattr(b, k) == "reference"]
    if uses and not cfg.model.ref_path:
        raise ValueError(
            f"{' and '.join(uses)} needs π_Φ, the SFT model: set model.ref_path=<SFT checkpoint> "
            f"(model.ref_path is empty, so the policy {cfg.model.path!r} would stand in for it), "
            "or set bin.scorer=policy / bin.answers=policy"
        )


class BiN(Algorithm):
    """``lacot-train bin``: evaluate ``model.path`` on ``data.eval_file`` (no training).

    π_Φ (``model.ref_path``) writes the answers by default and scores with ``bin.scorer=reference``."""

    trains = False

    def __init__(self, trainer):
        check_reference(trainer.cfg)
        super().__init__(trainer)

    def run(self):
        tr, cfg = self.tr, self.cfg
        if not tr.eval_examples:
            raise ValueError("bin evaluates data.eval_file, which is empty")
        mine = tr.eval_examples[tr.rank :: tr.world]
        need_ref = "reference" in (cfg.bin.scorer, cfg.bin.answers)
        with tr.reference() if need_ref else contextlib.nullcontext() as ref:
            res = bin_evaluate(
                tr.model,
                tr.codec,
                mine,
                n=cfg.bin.num_samples,
                temperature=cfg.bin.temperature,
                reduce=cfg.bin.reduce,
                max_rationale_tokens=cfg.train.max_new_tokens,
                max_answer_tokens=cfg.train.answer_max_tokens,
                batch_questions=max(1, cfg.train.eval_batch_size // cfg.bin.num_samples),
                scorer=ref if cfg.bin.scorer == "reference" else None,
                answer_model=ref if cfg.bin.answers == "reference" else None,
                backend=cfg.model.backend,
                progress=tr.is_main and cfg.train.progress,
            )
        res = tr.all_mean(res)
        record: dict[str, Any] = {"step": 0, **{f"bin/{k}": v for k, v in res.items()}}
        tr.out_dir.mkdir(parents=True, exist_ok=True)
        tr.logger.log(record)
        if tr.is_main:
            n = cfg.bin.num_samples
            print(
                f"greedy {res['greedy']:.1%} | majority@{n} {res['majority']:.1%} | BoN@{n} {res['bon']:.1%} | "
                f"BoN-joint@{n} {res['bon_joint']:.1%} | BiN@{n} {res['bin']:.1%} | pass@{n} {res['pass@n']:.1%}",
                file=sys.stdout,
            )
        return TrainResult(tr.out_dir, None, 0, [record], tr)
