"""Models, token layout and the one forward path every algorithm uses.

* :func:`load_model` loads any ``AutoModelForCausalLM`` or a Qwen2-VL / Qwen2.5-VL checkpoint (optionally with
  a LoRA adapter through peft), plus its tokenizer and image processor.
* :class:`Codec` turns examples into token ids in the layout X | Z ⊤ | Y (see :class:`~.config.FormatConfig`).
* :func:`build_batch` lays rows out as ``[left-padded prompt | right-padded completion]``, so column ``P + t``
  holds completion token ``t`` of every row and hidden state ``P - 1 + t`` predicts it: per-token tensors of all
  algorithms are then plain ``(B, T)`` arrays aligned on the completion.
* :class:`Policy` runs the backbone (never the LM head) and hands the last hidden states and the head weight to
  a function - always a :mod:`lacot_kernels` fused op - so no B x T x V logits are ever held. It is the module
  that DDP wraps, so the head is used inside ``forward`` and gradients synchronise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import lacot_kernels as lk

from .config import FormatConfig, ModelConfig
from .data import Example

IGNORE = -100
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- loading ----------------------------------------------------------------------------------------------------


def _attn_implementation(requested: str, device: torch.device, trainable: bool) -> str:
    if requested != "auto":
        return requested
    # Frozen models score suffixes with block masks (rewards.score_suffixes), which flash-attn cannot take.
    if trainable and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def is_vision_config(config) -> bool:
    return hasattr(config, "vision_config")


def load_model(cfg: ModelConfig, device: torch.device, *, path: str | None = None, trainable: bool = True):
    """(model, tokenizer, image_processor or None). Vision-language when the config has a vision tower."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    path = path or cfg.path
    if not path:
        raise ValueError("model.path is empty: give a transformers checkpoint directory (or run `lacot-train demo`)")
    hf_cfg = AutoConfig.from_pretrained(path)
    attn = _attn_implementation(cfg.attn_implementation, device, trainable)
    kwargs = dict(dtype=DTYPES[cfg.dtype], attn_implementation=attn)
    if is_vision_config(hf_cfg):
        from transformers import AutoImageProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        image_processor = None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(device)
    if trainable:
        if cfg.freeze_vision and is_vision_config(hf_cfg):
            for p in inner(model).visual.parameters():
                p.requires_grad_(False)
        if cfg.lora.r > 0:
            from peft import LoraConfig as PeftLora
            from peft import get_peft_model

            targets = lora_target_names(model, cfg.lora.target_modules, vision=cfg.lora.vision)
            model = get_peft_model(
                model,
                PeftLora(
                    r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets
                ),
            )
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    else:
        model.requires_grad_(False)
    model.train(trainable)
    return model, tokenizer, image_processor


def lora_target_names(model: nn.Module, targets: list[str], *, vision: bool = False) -> list[str]:
    """Full names of the modules LoRA adapts: those whose last name component is in ``targets``, outside the
    vision tower unless ``vision``.

    Qwen2.5-VL's vision blocks have ``gate_proj`` / ``up_proj`` / ``down_proj`` MLPs too, so a plain name list
    would put adapters on the image encoder; the official LaCoT code excludes every ``visual*`` module. The
    explicit list (not peft's suffix matching) makes the choice visible and testable.
    """
    wanted = set(targets)
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if parts[-1] not in wanted:
            continue
        if not vision and any(p.startswith("visual") or p == "vision_tower" for p in parts):
            continue
        names.append(name)
    if not names:
        where = "" if vision else " outside the vision tower"
        raise ValueError(f"model.lora.target_modules: {list(targets)} match no module of the model{where}")
    return names


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / Policy / peft wrappers (peft's LoRA layers stay in place)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, Policy):
            model = model.model
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            return model


def inner(model: nn.Module) -> nn.Module:
    """The backbone that returns last hidden states (``model.model`` for Llama/Qwen and Qwen2-VL)."""
    m = unwrap(model)
    return getattr(m, m.base_model_prefix)


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def count_params(model: nn.Module) -> tuple[int, int]:
    ps = list(unwrap(model).parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


# ---- token layout -----------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    pixel_values: torch.Tensor | None = None  # (patches, C * temporal * patch * patch)
    image_grid_thw: torch.Tensor | None = None  # (1, 3)


class Codec:
    """Tokenizer + image processor + chat format -> token ids of X, Z, ⊤ and Y."""

    def __init__(self, tokenizer, image_processor, fmt: FormatConfig, *, max_prompt_tokens: int = 0):
        self.tok, self.image_processor, self.fmt = tokenizer, image_processor, fmt
        self.max_prompt_tokens = max_prompt_tokens  # 0 = no limit (data.max_prompt_tokens in the trainer)
        self.truncated_prompts = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.terminator_id = self._single(fmt.terminator, "format.terminator")
        self.answer_end_id = self._single(fmt.answer_end, "format.answer_end")
        self.image_pad_id = tokenizer.convert_tokens_to_ids(fmt.image_pad) if image_processor is not None else None
        self.answer_header_ids = self.text(fmt.answer_header)
        self.merge = getattr(image_processor, "merge_size", 2) if image_processor is not None else 1
        # Never sampled: special tokens other than the two closers (an image pad inside a sampled rationale would
        # make the next forward expect an image that is not there).
        keep = {self.terminator_id, self.answer_end_id}
        self.banned_ids = sorted(set(tokenizer.all_special_ids) - keep)

    def _single(self, text: str, key: str) -> int:
        ids = self.text(text)
        if len(ids) != 1:
            raise ValueError(f"{key} must be a single token of the tokenizer, {text!r} is {len(ids)} tokens: {ids}")
        return ids[0]

    def text(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False).input_ids if s else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt(self, ex: Example) -> Prompt:
        image = ex.load_image() if self.image_processor is not None else None
        pixel_values = grid = None
        image_text = ""
        if image is not None:
            out = self.image_processor(images=[image], return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
            n = int(grid.prod()) // (self.merge**2)
            image_text = self.fmt.image.format(image_pad=self.fmt.image_pad * n)
        text = self.fmt.system + self.fmt.user.format(image=image_text, question=ex.question)
        ids = self.text(text + self.fmt.rationale_header)
        if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
            ids = self._truncated_prompt(ex, image_text, len(ids))
        return Prompt(ids, pixel_values, grid)

    def _truncated_prompt(self, ex: Example, image_text: str, length: int) -> list[int]:
        """Cut the question text from the left to fit ``max_prompt_tokens``.

        The end of a long question (where the actual question usually follows its context) is kept; the image
        tokens and the chat template are never cut (a partial image would not match its pixels), so a prompt that
        does not fit even with an empty question is an error naming the row.
        """
        before, _, after = self.fmt.user.partition("{question}")
        head = self.text(self.fmt.system + before.format(image=image_text))
        tail = self.text(after.format(image=image_text) + self.fmt.rationale_header)
        budget = self.max_prompt_tokens - len(head) - len(tail)
        if budget < 1:
            raise ValueError(
                f"{ex.where}: the prompt is {length} tokens and data.max_prompt_tokens={self.max_prompt_tokens}, "
                f"but the image and chat template alone take {len(head) + len(tail)}: raise data.max_prompt_tokens"
            )
        if self.truncated_prompts == 0:
            import warnings

            warnings.warn(
                f"{ex.where}: prompt of {length} tokens cut to data.max_prompt_tokens={self.max_prompt_tokens} "
                "(question text cut from the left); later cuts are counted in Codec.truncated_prompts",
                stacklevel=3,
            )
        self.truncated_prompts += 1
        return head + self.text(ex.question)[-budget:] + tail

    def rationale(self, ex: Example) -> list[int]:
        if ex.rationale is None:
            raise ValueError(f"{ex.where}: this algorithm needs a rationale")
        return self.text(ex.rationale)

    def answer(self, answer: str) -> list[int]:
        """Answer tokens, without the closing token."""
        return self.text(answer)

    def suffix(self, answer_ids: list[int]) -> tuple[list[int], list[int]]:
        """⊤ Y after a rationale, as (ids, scored): ⊤, the answer header, the answer, its end.

        The header is forced at inference (never sampled, never trained), so it is context, not part of the
        likelihood: ``scored`` is 0 on it. Counting it would add the (untrained, near-uniform) log-probs of a
        few template tokens to every reward.
        """
        ids = [self.terminator_id, *self.answer_header_ids, *answer_ids, self.answer_end_id]
        scored = [1] + [0] * len(self.answer_header_ids) + [1] * (len(answer_ids) + 1)
        return ids, scored

    def chain(self, rationale: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        """A full completion Z ⊤ header Y end, and its training mask (the forced header is not trained on)."""
        ids = [*rationale, self.terminator_id, *self.answer_header_ids, *answer, self.answer_end_id]
        mask = [1] * (len(rationale) + 1) + [0] * len(self.answer_header_ids) + [1] * (len(answer) + 1)
        return ids, mask


@dataclass
class Batch:
    """``[left-padded prompt | right-padded completion]`` rows; completion token t sits at column P + t."""

    input_ids: torch.Tensor  # (B, P + T) int64
    attention_mask: torch.Tensor  # (B, P + T) int64
    prompt_len: int  # P
    completion: torch.Tensor  # (B, T) int64, IGNORE at padding
    lengths: torch.Tensor  # (B,) int64 completion lengths
    mm: dict[str, torch.Tensor]  # pixel_values, image_grid_thw, mm_token_type_ids (empty for text)

    @property
    def T(self) -> int:
        return self.completion.shape[1]

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.mm}


def build_batch(
    codec: Codec, prompts: list[Prompt], completions: list[list[int]], device: torch.device, *, min_t: int = 0
) -> Batch:
    B = len(prompts)
    if len(completions) != B:
        raise ValueError(f"completions must have {B} rows, got {len(completions)}")
    P = max(len(p.ids) for p in prompts)
    T = max([len(c) for c in completions] + [min_t])
    ids = torch.full((B, P + T), codec.pad_id, dtype=torch.long)
    att = torch.zeros((B, P + T), dtype=torch.long)
    comp = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=False)):
        ids[b, P - len(p.ids) : P] = torch.tensor(p.ids)
        att[b, P - len(p.ids) : P + len(c)] = 1
        if c:
            ids[b, P : P + len(c)] = torch.tensor(c)
            comp[b, : len(c)] = torch.tensor(c)
    mm: dict[str, torch.Tensor] = {}
    with_image = [p for p in prompts if p.pixel_values is not None]
    if with_image:
        mm["pixel_values"] = torch.cat([p.pixel_values for p in with_image]).to(device)
        mm["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_image]).to(device)
        mm["mm_token_type_ids"] = (ids == codec.image_pad_id).int().to(device)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    return Batch(ids.to(device), att.to(device), P, comp.to(device), lengths.to(device), mm)


def position_ids(model: nn.Module, batch_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions the model would use: 3-D multimodal RoPE indices for Qwen2-VL, else ``cumsum(mask) - 1``.

    They are computed explicitly because the reward scorer extends them past a KV cache.
    """
    core = inner(model)
    ids, att = batch_inputs["input_ids"], batch_inputs["attention_mask"]
    if hasattr(core, "get_rope_index"):
        mm_types = batch_inputs.get("mm_token_type_ids")
        if mm_types is None:
            mm_types = torch.zeros_like(ids, dtype=torch.int)
        pos, _ = core.get_rope_index(
            ids, mm_token_type_ids=mm_types, image_grid_thw=batch_inputs.get("image_grid_thw"), attention_mask=att
        )
        return pos
    return (att.cumsum(-1) - 1).clamp_min(0)


class Policy(nn.Module):
    """Backbone + a head function: ``forward(inputs, fn)`` returns ``fn(hidden, weight, bias)``.

    ``inputs`` are :meth:`Batch.model_inputs` (plus optional ``position_ids`` / ``past_key_values``); ``hidden``
    is ``(B, L, D)`` of the last layer after the final norm. ``fn`` is where a lacot_kernels op turns hidden
    states into log-probs or a loss.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, Any], fn: Callable[..., Any]) -> Any:
        inputs = dict(inputs)
        if "position_ids" not in inputs:
            inputs["position_ids"] = position_ids(self.model, inputs)
        out = inner(self.model)(**inputs)
        weight, bias = lm_head(self.model)
        return fn(out.last_hidden_state, weight, bias)


def completion_hidden(hidden: torch.Tensor, P: int, T: int) -> torch.Tensor:
    """Hidden states that predict completion tokens 0..T-1: columns P-1 .. P+T-2 -> (B, T, D)."""
    return hidden[:, P - 1 : P - 1 + T]


def completion_logprobs(
    policy: nn.Module,
    batch: Batch,
    *,
    backend: str = "auto",
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """``log π(completion_t | prompt, completion_<t)`` as ``(B, T)`` fp32 (0 at padding), via the fused op."""

    def head(h, w, b):
        hs = completion_hidden(h, batch.prompt_len, batch.T)
        return lk.fused_linear_token_logprobs(
            hs, w, batch.completion, bias=b, temperature=temperature, return_entropy=return_entropy, backend=backend
        )

    return policy(batch.model_inputs(), head)
