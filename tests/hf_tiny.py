"""Tiny, offline Hugging Face models and a code-built tokenizer for the integration tests and benchmarks.

Everything is built from configs with a seeded random init (no hub access). The tokenizer is a word-level vocabulary
``w0 w1 ...`` built in code, so any vocabulary size (32k and more for memory tests) decodes every id a model can
sample.
"""

from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<vision_start>", "<vision_end>", "<image_pad>", "<video_pad>")
PAD_ID, EOS_ID = 0, 1
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 3, 4, 5, 6


def word_tokenizer(vocab_size: int):
    """A fast tokenizer over ``SPECIAL_TOKENS + w0 .. w{vocab_size - 8}`` (whitespace-split words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(vocab_size - len(SPECIAL_TOKENS)):
        vocab[f"w{i}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )


def _text_kwargs(vocab_size: int, tie: bool) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )


def tiny_qwen2(vocab_size: int = 512, *, tie: bool = False, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(vocab_size, tie))).eval()


def tiny_llama(vocab_size: int = 512, *, tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_text_kwargs(vocab_size, tie))).eval()


def tiny_qwen25_vl(vocab_size: int = 512, *, seed: int = 0):
    """Qwen2.5-VL with a 2-layer vision tower; head_dim 16, so mrope_section sums to 8."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text_kwargs(vocab_size, False)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=112,
            fullatt_block_indexes=[1],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def vl_inputs(batch: int = 2, text_len: int = 6, grid=(1, 4, 6), vocab_size: int = 512, seed: int = 0) -> dict:
    """Hand-built Qwen2.5-VL inputs (no processor: it needs torchvision): one image per sample, its
    ``grid_t * grid_h * grid_w / 4`` pad tokens between vision start/end, then text tokens.

    Returns ``input_ids (B, T)``, ``attention_mask``, ``pixel_values (B * t*h*w, 3*2*14*14)``,
    ``image_grid_thw (B, 3)``, ``mm_token_type_ids (B, T)``.
    """
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_pad = t * h * w // 4
    rows = []
    for _ in range(batch):
        prefix = torch.randint(len(SPECIAL_TOKENS), vocab_size, (2,), generator=g)
        text = torch.randint(len(SPECIAL_TOKENS), vocab_size, (text_len,), generator=g)
        image = torch.tensor([VISION_START_ID] + [IMAGE_PAD_ID] * n_pad + [VISION_END_ID])
        rows.append(torch.cat([prefix, image, text]))
    input_ids = torch.stack(rows)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch * t * h * w, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([list(grid)] * batch),
        "mm_token_type_ids": (input_ids == IMAGE_PAD_ID).int(),
    }
