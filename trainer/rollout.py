"""Rollouts with the KV cache: rationales (stopped at ⊤), then one answer per rationale.

Generation goes through transformers' ``generate`` (KV cache; only last-position logits exist at each step).
Sampling temperatures can differ per row (LaCoT's exploration schedule) through a logits processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .modeling import Codec, Prompt, build_batch, unwrap


class RowTemperature(LogitsProcessor):
    """Divide each row's scores by its own temperature (rows = prompts x samples, in batch order)."""

    def __init__(self, temperatures: torch.Tensor):
        self.t = temperatures.view(-1, 1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.t.to(scores.device, scores.dtype)


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
) -> list[tuple[list[int], bool]]:
    """Continue each prompt (+ its forced tokens) until ``eos_id``: a list of (new tokens without eos, stopped).

    ``temperature`` None = greedy; a float or one float per row = ancestral sampling (no top-k / top-p).
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
        kwargs.update(do_sample=True, temperature=1.0, logits_processor=LogitsProcessorList([RowTemperature(temps)]))
    was_training = m.training
    m.eval()  # dropout off while sampling, as LaCoT's disable_dropout_in_model
    try:
        out = m.generate(**batch.model_inputs(), **kwargs)
    finally:
        m.train(was_training)
        if hasattr(getattr(m, "model", None), "rope_deltas"):
            m.model.rope_deltas = None  # Qwen2-VL caches them for generation; never let them leak into training
    new = out[:, batch.input_ids.shape[1] :].tolist()
    results = []
    for row in new:
        if eos_id in row:
            results.append((row[: row.index(eos_id)], True))
        else:
            results.append(([t for t in row if t != codec.pad_id], False))
    return results


@dataclass
class Chain:
    """One sampled chain: rationale tokens (without ⊤), whether ⊤ was emitted, answer tokens (without end)."""

    rationale: list[int]
    terminated: bool
    answer: list[int]
    answered: bool


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
) -> list[Chain]:
    """Two phases, one row per prompt: sample Z until ⊤ (unless ``rationales`` are given), then Y after ⊤ header.

    A rationale that hits the token budget without ⊤ still gets an answer (after a forced ⊤), and is marked
    ``terminated=False`` so rewards can tell. ``answer_model`` writes the answers (default: ``model``); LaCoT's
    BiN has the SFT model π_Φ answer after the policy's rationales.
    """
    if rationales is None:
        phase1 = generate(
            model,
            codec,
            prompts,
            max_new_tokens=max_rationale_tokens,
            eos_id=codec.terminator_id,
            temperature=rationale_temperature,
            min_new_tokens=min_new_tokens,
        )
    else:
        phase1 = [(list(r), True) for r in rationales]
    forced = [[*z, codec.terminator_id, *codec.answer_header_ids] for z, _ in phase1]
    phase2 = generate(
        answer_model if answer_model is not None else model,
        codec,
        prompts,
        max_new_tokens=max_answer_tokens,
        eos_id=codec.answer_end_id,
        temperature=answer_temperature,
        forced=forced,
    )
    return [Chain(z, ok, y, ok2) for (z, ok), (y, ok2) in zip(phase1, phase2, strict=False)]
