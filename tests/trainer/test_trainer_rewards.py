"""The LaCoT reward path (one pass + suffixes on the KV cache) equals naive per-anchor full-forward scoring."""

from __future__ import annotations

import pytest
import torch
from lacot_kernels.trainer.config import Config
from lacot_kernels.trainer.data import load_examples
from lacot_kernels.trainer.modeling import Codec, build_batch, load_model
from lacot_kernels.trainer.rewards import (
    SuffixQuery,
    anchor_queries,
    exact_match,
    lacot_log_rewards,
    naive_score_suffixes,
    normalize_answer,
    score_suffixes,
)

import lacot_kernels as lk


def _setup(model_dir, data):
    cfg = Config()
    model, tok, ip = load_model(cfg.model, torch.device("cpu"), path=str(model_dir), trainable=False)
    codec = Codec(tok, ip, cfg.format)
    exs = load_examples(data["train"], cfg.data, need_rationale=True)[:4]
    prompts = [codec.prompt(e) for e in exs]
    g = torch.Generator().manual_seed(0)
    # Rationales of different lengths, including an empty one and random (unlikely) tokens.
    rats = [codec.rationale(e) for e in exs]
    rats[1] = rats[1][:5]
    rats[2] = torch.randint(10, 300, (23,), generator=g).tolist()
    rats[3] = []
    suffixes = [codec.suffix(codec.answer(e.answer)) for e in exs]
    return model, codec, prompts, rats, suffixes


@pytest.mark.parametrize("kind", ["text", "vl"])
@pytest.mark.parametrize("chunk", [2, 64])
def test_anchor_rewards_equal_naive_full_forwards(kind, chunk, request):
    model, codec, prompts, rats, suffixes = _setup(
        request.getfixturevalue(f"{kind}_model_dir"), request.getfixturevalue(f"{kind}_data")
    )
    batch = build_batch(codec, prompts, rats, torch.device("cpu"))
    anchors = lk.reward_anchors(batch.lengths, 4, min_len=2, max_len=batch.T)
    values, per_token, ours = lacot_log_rewards(model, batch, suffixes, anchors, chunk=chunk)
    queries = anchor_queries(anchors, suffixes)
    naive = naive_score_suffixes(model, codec, prompts, rats, queries)
    torch.testing.assert_close(ours.prefix, naive.prefix, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.suffix, naive.suffix, atol=1e-4, rtol=0)
    rows, cuts = anchors.nonzero(as_tuple=True)
    torch.testing.assert_close(values[rows, cuts], naive.total, atol=1e-4, rtol=0)
    assert bool((values[~anchors] == 0).all())
    # Terminal reward per scored token, as the RGFN filter reads it.
    n = batch.lengths
    expected = values[torch.arange(len(rats)), n] / (n + torch.tensor([sum(m) for _, m in suffixes]))
    torch.testing.assert_close(per_token, expected)
    # Fewer model tokens than one full forward per anchor (the FLOPs of a forward are linear in its tokens).
    assert ours.model_tokens < naive.model_tokens


def test_reward_path_saves_more_with_longer_rationales(text_model_dir, text_data):
    """Stride 2 over a 40-token rationale: the naive path runs ~(n/λ)·n/2 tokens, ours ~n + K·|⊤Y|."""
    model, codec, prompts, rats, suffixes = _setup(text_model_dir, text_data)
    g = torch.Generator().manual_seed(1)
    rats = [torch.randint(10, 300, (40,), generator=g).tolist(), torch.randint(10, 300, (33,), generator=g).tolist()]
    batch = build_batch(codec, prompts[:2], rats, torch.device("cpu"))
    anchors = lk.reward_anchors(batch.lengths, 2, max_len=batch.T)
    queries = anchor_queries(anchors, suffixes)
    ours = score_suffixes(model, batch, queries, chunk=8)
    naive = naive_score_suffixes(model, codec, prompts, rats, queries)
    torch.testing.assert_close(ours.total, naive.total, atol=1e-4, rtol=0)
    assert naive.model_tokens > 3 * ours.model_tokens


def test_bin_style_queries_many_suffixes_per_cut(vl_model_dir, vl_data):
    """Several candidate answers scored after the same rationale (BiN), against naive full forwards."""
    model, codec, prompts, rats, _ = _setup(vl_model_dir, vl_data)
    answers = [codec.suffix(codec.answer(a)) for a in ("3", "12", "0")]
    queries = [SuffixQuery(r, len(rats[r]), *s) for r in range(3) for s in answers]
    batch = build_batch(codec, prompts[:3], rats[:3], torch.device("cpu"))
    ours = score_suffixes(model, batch, queries)
    naive = naive_score_suffixes(model, codec, prompts, rats, queries)
    torch.testing.assert_close(ours.total, naive.total, atol=1e-4, rtol=0)
    assert torch.equal(ours.tokens, naive.tokens)


def test_score_suffixes_rejects_cuts_past_the_rationale(text_model_dir, text_data):
    model, codec, prompts, rats, suffixes = _setup(text_model_dir, text_data)
    batch = build_batch(codec, prompts[:2], rats[:2], torch.device("cpu"))
    with pytest.raises(ValueError, match="cut"):
        score_suffixes(model, batch, [SuffixQuery(1, len(rats[1]) + 1, *suffixes[1])])


def test_forced_header_is_not_scored(text_model_dir, text_data):
    """The answer header is glue (forced, never trained): the reward counts ⊤ and the answer, not the header."""
    model, codec, prompts, rats, suffixes = _setup(text_model_dir, text_data)
    ids, scored = suffixes[0]
    assert scored[0] == 1 and ids[0] == codec.terminator_id
    assert sum(scored) == len(ids) - len(codec.answer_header_ids)
    batch = build_batch(codec, prompts[:1], rats[:1], torch.device("cpu"))
    cut = len(rats[0])
    weighted = score_suffixes(model, batch, [SuffixQuery(0, cut, ids, scored)])
    full = score_suffixes(model, batch, [SuffixQuery(0, cut, ids)])
    assert int(weighted.tokens[0]) == cut + sum(scored) and int(full.tokens[0]) == cut + len(ids)
    assert float(weighted.suffix[0]) > float(full.suffix[0])  # fewer (negative) log-probs counted


def test_answer_matching():
    assert normalize_answer("  The  Answer.  ") == "the answer"
    assert exact_match("5.", "5") and exact_match(" 5 ", "5")
    assert not exact_match("15", "5") and not exact_match("", "")


def test_score_suffixes_refuses_attention_without_masks(text_model_dir, text_data):
    model, codec, prompts, rats, suffixes = _setup(text_model_dir, text_data)
    batch = build_batch(codec, prompts[:1], rats[:1], torch.device("cpu"))
    model.config._attn_implementation = "flash_attention_2"  # only the flag: the check must fire before any forward
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        score_suffixes(model, batch, [SuffixQuery(0, 0, *suffixes[0])])
