"""Tiny models and a tokenizer built in code: nothing is downloaded.

* :func:`build_tokenizer` trains a byte-level BPE (a few hundred tokens) on the demo's own phrases and adds the
  Qwen chat / vision special tokens, as a ``PreTrainedTokenizerFast`` that ``save_pretrained`` can write.
* :func:`build_qwen2vl` is a randomly initialised Qwen2-VL (the real transformers class) sized so that a 2-core
  CPU trains it in tens of seconds (shared/research/demo_feasibility.md §3: 646k parameters).
* :func:`build_causal_lm` is a tiny text-only Qwen2 causal LM for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from . import task

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else task.corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def build_image_processor():
    # The PIL processor needs no torchvision; min_pixels lets 56 x 56 images through without upscaling.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return ids


def build_qwen2vl(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 512,
    vision_depth: int = 1,
    vision_embed: int = 32,
    seed: int = 0,
) -> Qwen2VLForConditionalGeneration:
    ids = _special_ids(tokenizer)
    head_dim = hidden // heads
    # mrope sections (temporal, height, width) must add up to head_dim / 2.
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # 32 -> [4, 6, 6]
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": section},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=vision_embed,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(cfg)
    _set_generation_ids(model, ids)
    return model


def build_causal_lm(
    tokenizer: PreTrainedTokenizerFast, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Qwen2ForCausalLM:
    ids = _special_ids(tokenizer)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads > 1 else 1,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    _set_generation_ids(model, ids)
    return model


def _set_generation_ids(model, ids: dict[str, int]) -> None:
    gc = model.generation_config
    gc.pad_token_id = ids["<|endoftext|>"]
    gc.eos_token_id = ids["<|im_end|>"]
    gc.bos_token_id = None


def save_base(out: str | Path, *, vision: bool = True, seed: int = 0, **sizes) -> Path:
    """Write a randomly initialised tiny model + tokenizer (+ image processor) as a transformers checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    model = build_qwen2vl(tok, seed=seed, **sizes) if vision else build_causal_lm(tok, seed=seed, **sizes)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if vision:
        build_image_processor().save_pretrained(out)
    return out
