"""Rewards: outcome rewards for GRPO/DPO, and the LaCoT log-reward ``log π_Φ(z_{1:t} ⊤ Y | X)`` at many states.

The LaCoT reward of state t is the joint log-likelihood, under the frozen SFT model π_Φ, of the first t
rationale tokens, the terminator ⊤ and the answer Y (the paper's definition; the official code appends the
*reference rationale* instead of the answer, see shared/research/lacot.md §2.2/D1). Scoring it with one full
forward per anchor (the official code) costs ``Σ_anchors (|X| + t + |⊤Y|)`` tokens. Here:

1. one teacher-forced pass over ``X z`` gives ``log π_Φ(z_k | X z_<k)`` for every k: the rationale part of
   every state is a prefix sum, and the pass leaves the KV cache of ``X z``;
2. one more pass over the cache scores, for all anchors at once, only the short suffixes ``⊤ Y``: each anchor's
   copy of the suffix attends to the cached prefix up to its cut and causally to itself (a block mask), and is
   placed at the positions right after its cut.

Total ``|X| + n + K·|⊤Y|`` tokens instead of ``K·(|X| + n/2 + |⊤Y|)``; log-probs come from the fused op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

import lacot_kernels as lk

from .modeling import IGNORE, Batch, Codec, Prompt, build_batch, completion_hidden, inner, lm_head, position_ids, unwrap

# ---- outcome rewards ---------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Case-, space- and trailing-punctuation-insensitive form used for exact match and voting."""
    t = text.strip().lower()
    t = re.sub(r"\s+", " ", t)
    return t.rstrip(".").strip()


def exact_match(predicted: str, gold: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(gold) and normalize_answer(gold) != ""


def format_ok(terminated: bool, answered: bool, answer_text: str) -> bool:
    """The chain closed its rationale with ⊤, then gave a non-empty, closed answer."""
    return terminated and answered and normalize_answer(answer_text) != ""


# ---- suffix scoring on a shared prefix ---------------------------------------------------------------------------


@dataclass
class SuffixQuery:
    row: int  # row of the prefix batch (a prompt + rationale)
    cut: int  # state t: the suffix follows the first t rationale tokens (0 <= t <= length of the row)
    suffix: list[int]  # tokens after the cut (the first is predicted from state t)
    scored: list[int] | None = None  # 1 = counted, 0 = forced glue (e.g. the answer header); None = all counted

    @property
    def weights(self) -> list[int]:
        return self.scored if self.scored is not None else [1] * len(self.suffix)


@dataclass
class SuffixScores:
    prefix: torch.Tensor  # (Q,) fp32: sum of log π(z_k | X z_<k) over the first `cut` rationale tokens
    suffix: torch.Tensor  # (Q,) fp32: sum of log π(suffix token | X z_{1:cut} suffix_<) over the scored tokens
    tokens: torch.Tensor  # (Q,) int64: cut + the number of scored suffix tokens
    model_tokens: int  # tokens the model ran over (both passes), for FLOP accounting

    @property
    def total(self) -> torch.Tensor:
        return self.prefix + self.suffix


def _text_positions(pos: torch.Tensor) -> torch.Tensor:
    """(B, L) scalar positions of text tokens from (B, L) or 3-D mRoPE (3, B, L) indices (equal for text)."""
    return pos[0] if pos.dim() == 3 else pos


@torch.no_grad()
def score_suffixes(
    model: torch.nn.Module,
    batch: Batch,
    queries: list[SuffixQuery],
    *,
    backend: str = "auto",
    chunk: int = 64,
) -> SuffixScores:
    """Score many suffixes after cuts of the rationales in ``batch``, sharing one pass (and its KV cache).

    ``batch``: rows ``[prompt | rationale]`` (:func:`~.modeling.build_batch`), rationale tokens in
    ``batch.completion``. ``chunk`` bounds the queries per row per suffix pass (memory: rows x chunk x |suffix|).
    """
    attn = getattr(unwrap(model).config, "_attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager"):
        raise ValueError(
            f"reward / BiN scoring packs suffixes with block attention masks, which attn_implementation={attn!r} "
            "cannot take: load the scoring model with model.attn_implementation=sdpa (the default for frozen models)"
        )
    B, P, T = batch.input_ids.shape[0], batch.prompt_len, batch.T
    L = P + T
    device = batch.input_ids.device
    core = inner(model)
    weight, bias = lm_head(model)
    inputs = batch.model_inputs()
    pos = position_ids(model, inputs)
    out = core(**inputs, position_ids=pos, use_cache=True)
    hidden, cache = out.last_hidden_state, out.past_key_values
    model_tokens = int(batch.attention_mask.sum())

    # 1. rationale log-probs -> prefix sums; cum[b, t] = sum of the first t token log-probs.
    lp = lk.fused_linear_token_logprobs(
        completion_hidden(hidden, P, T), weight, batch.completion, bias=bias, backend=backend
    )
    cum = torch.cat([lp.new_zeros(B, 1), lp.cumsum(-1)], dim=1)  # (B, T + 1)

    Q = len(queries)
    rows = torch.tensor([q.row for q in queries], dtype=torch.long, device=device)
    cuts = torch.tensor([q.cut for q in queries], dtype=torch.long, device=device)
    if Q and (int(cuts.max()) > T or int(cuts.min()) < 0 or int((cuts > batch.lengths[rows]).sum()) > 0):
        raise ValueError("every query cut must lie in [0, length of its row]")
    prefix = cum[rows, cuts]
    # 2a. the first suffix token is predicted by the prefix pass's hidden state at the cut.
    first_h = hidden[rows, P - 1 + cuts]  # (Q, D)
    first_t = torch.tensor([q.suffix[0] if q.weights[0] else IGNORE for q in queries], dtype=torch.long, device=device)
    suffix = lk.fused_linear_token_logprobs(first_h, weight, first_t, bias=bias, backend=backend).clone()

    # 2b. the rest: per row, the queries' suffixes (minus their last token) are packed side by side in one
    # extra pass over the cache. Chunks bound the width; the cache is cropped back to the prefix after each.
    tpos = _text_positions(pos)
    per_row: list[list[int]] = [[] for _ in range(B)]
    for qi, q in enumerate(queries):
        if len(q.suffix) > 1:
            per_row[q.row].append(qi)
    rounds = max([(len(r) + chunk - 1) // chunk for r in per_row] + [0])
    for r in range(rounds):
        groups = [ids[r * chunk : (r + 1) * chunk] for ids in per_row]
        S = max(sum(len(queries[qi].suffix) - 1 for qi in g) for g in groups)
        tok = torch.full((B, S), 0, dtype=torch.long)
        tgt = torch.full((B, S), IGNORE, dtype=torch.long)
        owner = torch.full((B, S), -1, dtype=torch.long)
        spos = torch.zeros((B, S), dtype=torch.long)
        mask = torch.zeros((B, 1, S, L + S), dtype=torch.bool)
        for b, g in enumerate(groups):
            k = 0
            prefix_ok = batch.attention_mask[b].bool().cpu()
            for qi in g:
                q = queries[qi]
                n = len(q.suffix) - 1
                base = int(tpos[b, P - 1 + q.cut])
                tok[b, k : k + n] = torch.tensor(q.suffix[:-1])
                tgt[b, k : k + n] = torch.tensor(
                    [t if w else IGNORE for t, w in zip(q.suffix[1:], q.weights[1:], strict=True)]
                )
                owner[b, k : k + n] = qi
                spos[b, k : k + n] = torch.arange(base + 1, base + 1 + n)
                visible = prefix_ok.clone()
                visible[P + q.cut :] = False  # only the first `cut` rationale tokens
                mask[b, 0, k : k + n, :L] = visible
                mask[b, 0, k : k + n, L + k : L + k + n] = torch.ones(n, n, dtype=torch.bool).tril()
                k += n
            for j in range(k, S):  # padding queries see themselves only (a fully masked row would give NaN)
                mask[b, 0, j, L + j] = True
            model_tokens += k
        sp = spos.to(device)
        if pos.dim() == 3:
            sp = sp.unsqueeze(0).expand(pos.shape[0], -1, -1)
        h2 = core(
            input_ids=tok.to(device),
            attention_mask=mask.to(device),
            position_ids=sp,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        # A negative count removes that many tokens in every transformers version (positive meant different things).
        cache.crop(-(cache.get_seq_length() - L))
        lp2 = lk.fused_linear_token_logprobs(h2, weight, tgt.to(device), bias=bias, backend=backend)
        own = owner.to(device)
        valid = own >= 0
        suffix.index_add_(0, own[valid], lp2[valid])
    tokens = cuts + torch.tensor([sum(q.weights) for q in queries], dtype=torch.long, device=device)
    return SuffixScores(prefix, suffix, tokens, model_tokens)


@torch.no_grad()
def naive_score_suffixes(
    model: torch.nn.Module,
    codec: Codec,
    prompts: list[Prompt],
    rationales: list[list[int]],
    queries: list[SuffixQuery],
    *,
    rows_per_forward: int = 0,
) -> SuffixScores:
    """The official formulation: one full forward (fp32 logits over the vocabulary) per query sequence
    ``X z_{1:cut} suffix``. The oracle of the tests and the baseline of the benchmark."""
    device = next(model.parameters()).device
    rows_per_forward = rows_per_forward or max(1, len(queries))
    prefix, suffix, model_tokens = [], [], 0
    for start in range(0, len(queries), rows_per_forward):
        qs = queries[start : start + rows_per_forward]
        comps = [rationales[q.row][: q.cut] + q.suffix for q in qs]
        b = build_batch(codec, [prompts[q.row] for q in qs], comps, device)
        inputs = b.model_inputs()
        logits = model(**inputs, position_ids=position_ids(model, inputs)).logits
        logp = torch.log_softmax(logits[:, b.prompt_len - 1 : b.prompt_len - 1 + b.T].float(), dim=-1)
        tok = logp.gather(-1, b.completion.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (b.completion != IGNORE)
        for i, q in enumerate(qs):
            prefix.append(tok[i, : q.cut].sum())
            w = torch.tensor(q.weights, dtype=tok.dtype)
            suffix.append((tok[i, q.cut : q.cut + len(q.suffix)] * w).sum())
        model_tokens += int(b.attention_mask.sum())
    tokens = torch.tensor([q.cut + sum(q.weights) for q in queries], dtype=torch.long)
    return SuffixScores(torch.stack(prefix), torch.stack(suffix), tokens, model_tokens)


def anchor_queries(anchor_mask: torch.Tensor, suffixes: list[tuple[list[int], list[int]]]) -> list[SuffixQuery]:
    """One query per anchor state (b, t) with row b's suffix ``⊤ Y_b`` given as (ids, scored mask)."""
    rows, cuts = anchor_mask.nonzero(as_tuple=True)
    return [SuffixQuery(int(b), int(t), *suffixes[int(b)]) for b, t in zip(rows.tolist(), cuts.tolist(), strict=True)]


@torch.no_grad()
def lacot_log_rewards(
    reward_model: torch.nn.Module,
    batch: Batch,
    answer_suffixes: list[tuple[list[int], list[int]]],
    anchor_mask: torch.Tensor,
    *,
    backend: str = "auto",
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, SuffixScores]:
    """Exact log-rewards ``log π_Φ(z_{1:t} ⊤ Y | X)`` at the anchor states.

    Returns ``values (B, T + 1)`` fp32 (0 off the anchors; feed to ``lacot_kernels.interpolate_rewards``),
    ``terminal_mean (B,)`` (the terminal reward per scored token, for RGFN filtering) and the raw scores.
    """
    queries = anchor_queries(anchor_mask, answer_suffixes)
    scores = score_suffixes(reward_model, batch, queries, backend=backend, chunk=chunk)
    B, T1 = anchor_mask.shape
    values = torch.zeros(B, T1, dtype=torch.float32, device=anchor_mask.device)
    rows = torch.tensor([q.row for q in queries], dtype=torch.long, device=anchor_mask.device)
    cuts = torch.tensor([q.cut for q in queries], dtype=torch.long, device=anchor_mask.device)
    values[rows, cuts] = scores.total.to(values.device)
    n = batch.lengths.to(anchor_mask.device)
    terminal = values[torch.arange(B, device=anchor_mask.device), n]
    scored = n + torch.tensor([sum(m) for _, m in answer_suffixes], device=anchor_mask.device)
    return values, terminal / scored, scores
