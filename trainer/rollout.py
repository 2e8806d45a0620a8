"""Rollouts with the KV cache: rationales (stopped at ⊤), then one answer per rationale.

Generation goes through transformers' ``generate`` (KV cache; only last-position logits exist at each step).
Sampling temperatures can differ per row (LaCoT's exploration schedule) through a logits processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import lacot_kernels as lk
from lacot_kernels.ops.sampler_truncation import is_truncating

from .modeling import Codec, Prompt, build_batch, unwrap


class RowTemperature(LogitsProcessor):
    """Divide each row's scores by its own temperature (rows = prompts x samples, in batch order)."""

    def __init__(self, temperatures: torch.Tensor):
        self.t = temperatures.view(-1, 1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.t.to(scores.device, scores.dtype)


class Truncate(LogitsProcessor):
    """The sampler's top-k / top-p / min-p, by the kernels' own rule (``lacot_kernels.kept_threshold``, vLLM's
    order), so that the trainer's ``token_logprobs(top_k=...)`` scores exactly the set the sampler drew from.
    transformers' own warpers are not used: they run in another order (top-k, top-p, then min-p)."""

    def __init__(self, top_k: int | None, top_p: float | None, min_p: float | None):
        self.kw = dict(top_k=top_k, top_p=top_p, min_p=min_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # The scores are already divided by the temperature (RowTemperature runs first): T = 1 here.
        tau = lk.kept_threshold(scores.float(), **self.kw)
        return scores.masked_fill(scores.float() < tau[:, None], float("-inf"))


class RecordLogp(LogitsProcessor):
    """Records the sampler's log-prob of each sampled token: the last processor, so it sees the final scores.

    transformers samples from softmax(final scores) after the processors run; the token chosen at step t is the
    last input id at step t + 1, so each call scores the previous step's choice (``finish`` the last one)."""

    def __init__(self):
        self.prev: torch.Tensor | None = None  # (B, V) fp32 log-softmax of the previous step
        self.logp: list[torch.Tensor] = []

    def _take(self, chosen: torch.Tensor) -> None:
        if self.prev is not None:
            self.logp.append(self.prev.gather(-1, chosen.view(-1, 1)).squeeze(-1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, last: torch.Tensor) -> torch.Tensor:
        """(B, steps) fp32 sampler log-probs of the generated tokens (last = the final step's tokens)."""
        self._take(last)
        self.prev = None
        return torch.stack(self.logp, 1) if self.logp else torch.zeros(last.shape[0], 0)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    codec: Codec,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float | list[float] | None = None,
    min_new_tokens: int = 0,
    forced: list[list[int]] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    return_logp: bool = False,
) -> list[tuple]:
    """Continue each prompt (+ its forced tokens) until ``eos_id``: a list of (new tokens without eos, stopped).

    ``temperature`` None = greedy; a float or one float per row = ancestral sampling from softmax(logits / T),
    truncated by ``top_k`` / ``top_p`` / ``min_p`` when given (:class:`Truncate`). With ``return_logp`` each
    tuple has a third item: the sampler's log-probs of the new tokens, the eos included when it was emitted
    (what the rollout engine would report as its log-probs; GRPO's ``rollout_logp``).
    """
    m = unwrap(model)
    device = next(m.parameters()).device
    forced = forced or [[] for _ in prompts]
    # Forced tokens (a rationale and the answer header) become part of the prompt: the batch is left-padded.
    merged = [Prompt(p.ids + f, p.pixel_values, p.image_grid_thw) for p, f in zip(prompts, forced, strict=False)]
    batch = build_batch(codec, merged, [[] for _ in merged], device)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=codec.pad_id,
        use_cache=True,
        suppress_tokens=codec.banned_ids or None,
        top_k=None,
        top_p=None,
    )
    if temperature is None:
        kwargs.update(do_sample=False, temperature=None)
    else:
        temps = torch.as_tensor(
            [temperature] * len(prompts) if isinstance(temperature, (int, float)) else temperature, dtype=torch.float32
        )
        if temps.numel() != len(prompts) or bool((temps <= 0).any()):
            raise ValueError(f"temperature must be > 0, one per prompt ({len(prompts)}), got {temps.tolist()}")
        procs = [RowTemperature(temps)]
        if is_truncating(top_k, top_p, min_p):
            procs.append(Truncate(top_k, top_p, min_p))
        kwargs.update(do_sample=True, temperature=1.0, logits_processor=LogitsProcessorList(procs))
    recorder = None
    if return_logp:
        recorder = RecordLogp()
        procs = kwargs.get("logits_processor") or LogitsProcessorList()
        procs.append(recorder)
        kwargs["logits_processor"] = procs
    was_training = m.training
    m.eval()  # dropout off while sampling, as LaCoT's disable_dropout_in_model
    try:
        out = m.generate(**batch.model_inputs(), **kwargs)
    finally:
        m.train(was_training)
        if hasattr(getattr(m, "model", None), "rope_deltas"):
            m.model.rope_deltas = None  # Qwen2-VL caches them for generation; never let them leak into training
    new = out[:, batch.input_ids.shape[1] :].tolist()
    lps = recorder.finish(out[:, -1]).tolist() if recorder is not None else None
    results = []
    for i, row in enumerate(new):
        if eos_id in row:
            toks, stopped = row[: row.index(eos_id)], True
        else:
            toks, stopped = [t for t in row if t != codec.pad_id], False
        if lps is None:
            results.append((toks, stopped))
        else:
            results.append((toks, stopped, lps[i][: len(toks) + int(stopped)]))
    return results


@dataclass
class Chain:
    """One sampled chain: rationale tokens (without ⊤), whether ⊤ was emitted, answer tokens (without end)."""

    rationale: list[int]
    terminated: bool
    answer: list[int]
    answered: bool
    # The sampler's log-probs (with return_logp): rationale tokens (+ ⊤ when sampled), answer tokens (+ end).
    rationale_logp: list[float] | None = None
    answer_logp: list[float] | None = None


def sample_chains(
    model: torch.nn.Module,
    codec: Codec,
    prompts: list[Prompt],
    *,
    max_rationale_tokens: int,
    max_answer_tokens: int,
    rationale_temperature: float | list[float] | None,
    answer_temperature: float | list[float] | None = None,
    min_new_tokens: int = 0,
    rationales: list[list[int]] | None = None,
    answer_model: torch.nn.Module | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    return_logp: bool = False,
) -> list[Chain]:
    """Two phases, one row per prompt: sample Z until ⊤ (unless ``rationales`` are given), then Y after ⊤ header.

    A rationale that hits the token budget without ⊤ still gets an answer (after a forced ⊤), and is marked
    ``terminated=False`` so rewards can tell. ``answer_model`` writes the answers (default: ``model``); LaCoT's
    BiN has the SFT model π_Φ answer after the policy's rationales. ``top_k`` / ``top_p`` / ``min_p`` truncate
    both phases' sampling; ``return_logp`` records the sampler's log-probs in the chains (given rationales: None).
    """
    sampler = dict(top_k=top_k, top_p=top_p, min_p=min_p, return_logp=return_logp)
    if rationales is None:
        phase1 = generate(
            model,
            codec,
            prompts,
            max_new_tokens=max_rationale_tokens,
            eos_id=codec.terminator_id,
            temperature=rationale_temperature,
            min_new_tokens=min_new_tokens,
            **sampler,
        )
    else:
        phase1 = [(list(r), True, None) for r in rationales]
    forced = [[*z, codec.terminator_id, *codec.answer_header_ids] for z, *_ in phase1]
    phase2 = generate(
        answer_model if answer_model is not None else model,
        codec,
        prompts,
        max_new_tokens=max_answer_tokens,
        eos_id=codec.answer_end_id,
        temperature=answer_temperature,
        forced=forced,
        **sampler,
    )
    chains = []
    for (z, ok, *zl), (y, ok2, *yl) in zip(phase1, phase2, strict=True):
        chains.append(Chain(z, ok, y, ok2, zl[0] if zl else None, yl[0] if yl else None))
    return chains
