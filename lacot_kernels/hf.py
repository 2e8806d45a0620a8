"""Per-token log-probs of a Hugging Face causal LM straight from its backbone and LM head, never holding the logits.

    logp[b, t] = log softmax(scale * lm_head(h[b, t]) / T)[targets[b, t]],   h = backbone(input_ids, ...)

`token_logprobs_from_model` runs the model's backbone (the module under ``base_model_prefix``: ``model.model``
for ``*ForCausalLM``, the vision-language ``*Model`` for Qwen2-VL / Qwen2.5-VL, so images are embedded as in the
model's own forward) and feeds its last hidden states to :func:`lacot_kernels.fused_linear_token_logprobs` with the
weight (and bias) of ``model.get_output_embeddings()``. The B x T x V logits are never formed; positions whose
target is ``-100`` cost no LM-head work.

`patch_model(model)` (reversible: `unpatch_model`, or `with patched(model):`) makes the model's own forward do the
same when it is given ``labels``: it returns the loss, per-token log-probs and entropies, and no logits.

Nothing here imports transformers or peft at import time: models are recognised by the attributes every
``PreTrainedModel`` (and every ``PeftModel``) has, so this module is as cheap to import as the rest of the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Iterator

import torch

from . import _checks, _registry
from .ops.fused_linear import fused_linear_token_logprobs

__all__ = ["lm_head_logit_scale", "patch_model", "patched", "token_logprobs_from_model", "unpatch_model"]

# Model inputs that would change what is computed behind the caller's back: labels (the targets replace them) and
# logits_to_keep (the targets' -100 entries already skip positions, at no cost).
_REJECTED_INPUTS = ("labels", "logits_to_keep", "shift_labels", "num_items_in_batch")


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft ``PeftModel`` (LoRA layers are injected in place, so running the
    unwrapped model's modules runs the adapters too); any other model is returned as is."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        cfg = getattr(model, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            # Prompt tuning / prefix tuning prepend virtual tokens inside PeftModel.forward: the backbone alone
            # would score a different sequence.
            raise NotImplementedError(
                f"token_logprobs_from_model supports adapters injected into the layers (LoRA, IA3, ...), not "
                f"prompt-learning adapters ({type(cfg).__name__}): call model(...).logits and "
                "lacot_kernels.token_logprobs instead"
            )
        return model.get_base_model()
    return model


def lm_head_logit_scale(config: object) -> float:
    """The factor a model's own forward multiplies ``lm_head(hidden)`` by, read from its (text) config.

    Cohere-style ``logit_scale``, Falcon-H1 ``lm_head_multiplier``, Muse ``output_multiplier`` multiply; Granite's
    ``logits_scaling`` divides (HyperCLOVA X multiplies by it). A config with none of them gives 1.0.
    """
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _final_softcap(config: object) -> float | None:
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    return getattr(text, "final_logit_softcapping", None)


def _backbone(hf_model: torch.nn.Module) -> torch.nn.Module:
    prefix = getattr(hf_model, "base_model_prefix", "")
    backbone = getattr(hf_model, prefix, None) if prefix else None
    if isinstance(backbone, torch.nn.Module) and backbone is not hf_model:
        return backbone
    get_decoder = getattr(hf_model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, torch.nn.Module) and decoder is not hf_model:
        return decoder
    raise ValueError(
        f"model ({type(hf_model).__name__}) exposes no backbone: expected a transformers causal LM whose "
        "`base_model_prefix` attribute (or get_decoder()) names the module that returns `last_hidden_state`"
    )


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's own ``lm_head(hidden)`` would run in: the autocast dtype under autocast (as
    ``nn.Linear`` is autocast there), otherwise the wider of the two (a head kept in fp32 next to a bf16 backbone
    stays fp32). Accumulation is fp32 either way."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def token_logprobs_from_model(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    **model_inputs: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(model(input_ids, ...).logits / temperature).gather(-1, targets)`` without forming the logits.

    Args:
        model: a transformers causal LM (``*ForCausalLM``, Qwen2-VL / Qwen2.5-VL ``*ForConditionalGeneration``),
            or a peft model wrapping one (LoRA and other in-layer adapters; not on the LM head itself).
        input_ids: ``(B, T)`` int64 / int32 token ids.
        targets: ``(B, T)`` int64 / int32. Entry ``[b, t]`` is scored as
            ``log p(targets[b, t] | input_ids[b, :t+1])``: for next-token scoring pass ``input_ids`` shifted left by
            one (``targets[:, :-1] = input_ids[:, 1:]``, ``targets[:, -1] = -100``). ``-100`` entries give exactly 0
            (and 0 gradient) and cost no LM-head work.
        attention_mask: optional ``(B, T)``, passed to the backbone.
        temperature: finite, > 0; the distribution is ``softmax(logits / temperature)``. A logit scale in the
            model's config (``logit_scale``, ``logits_scaling``, ...) is applied as the model's forward applies it.
        return_entropy: also return the entropy of that distribution at every position.
        backend: ``"auto" | "cuda" | "triton" | "torch"``, as in :func:`lacot_kernels.fused_linear_token_logprobs`.
        **model_inputs: any other backbone input (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``,
            ``position_ids``, ...). ``labels`` and ``logits_to_keep`` are rejected.

    Returns:
        ``logp`` ``(B, T)`` float32, or ``(logp, entropy)`` both ``(B, T)`` float32. Differentiable with respect to
        every model parameter that requires grad (backbone, adapters, LM head, tied or not); under
        ``torch.no_grad()`` nothing is saved. Under ``torch.autocast`` the head runs on the autocast dtype's values
        with fp32 accumulation.

    Raises:
        NotImplementedError: the model soft-caps its logits (``final_logit_softcapping``, e.g. Gemma 2): a tanh of
            every logit cannot be folded into the fused head; compute ``model(...).logits`` and use
            :func:`lacot_kernels.token_logprobs`. Also for a non-positive logit scale, prompt-learning adapters and
            adapters on the LM head.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    _checks.check_tensor("input_ids", input_ids)
    _checks.check_tensor("targets", targets)
    _checks.check_dtype("input_ids", input_ids, _checks.INDEX_DTYPES)
    _checks.check_dtype("targets", targets, _checks.INDEX_DTYPES)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    if tuple(targets.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"targets must have the shape of input_ids {tuple(input_ids.shape)} (entry [b, t] is the token scored "
            f"after input_ids[b, :t+1]), got {tuple(targets.shape)}"
        )
    if attention_mask is not None:
        _checks.check_tensor("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
    temperature = _checks.check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    for name in _REJECTED_INPUTS:
        if name in model_inputs:
            raise TypeError(
                f"token_logprobs_from_model does not take {name!r}: pass the tokens to score as `targets` "
                "(-100 where nothing is scored)"
            )

    hf_model = _unwrap_peft(model)
    config = getattr(hf_model, "config", None)
    softcap = _final_softcap(config) if config is not None else None
    if softcap is not None:
        raise NotImplementedError(
            f"{type(hf_model).__name__} soft-caps its logits (final_logit_softcapping={softcap}): "
            "softcap * tanh(logits / softcap) is not linear in the LM head, so it cannot be fused. Use "
            "lacot_kernels.token_logprobs(model(...).logits, targets, temperature=...) instead"
        )
    scale = lm_head_logit_scale(config) if config is not None else 1.0
    if not (math.isfinite(scale) and scale > 0.0):
        raise NotImplementedError(
            f"{type(hf_model).__name__} scales its logits by {scale}; only a finite positive scale folds into the "
            "temperature (softmax(scale * logits / T) = softmax(logits / (T / scale)))"
        )

    get_head = getattr(hf_model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(
            f"model ({type(hf_model).__name__}) has no output embeddings: get_output_embeddings() returned None"
        )
    if hasattr(head, "base_layer") or hasattr(head, "original_module"):
        raise NotImplementedError(
            "the LM head is wrapped by an adapter (peft target_modules / modules_to_save include it): the fused op "
            "needs the plain head weight. Leave the LM head out of the adapter, or merge the adapter first"
        )
    weight = getattr(head, "weight", None)
    bias = getattr(head, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the output embeddings ({type(head).__name__}) must have a 2-D weight (V, D)")

    backbone = _backbone(hf_model)
    if "pixel_values" in model_inputs or "pixel_values_videos" in model_inputs:
        params = inspect.signature(backbone.forward).parameters
        if "pixel_values" not in params:
            raise NotImplementedError(
                f"the backbone of {type(hf_model).__name__} ({type(backbone).__name__}) does not take pixel_values "
                "(transformers < 5 vision-language layout): upgrade transformers or pass inputs_embeds yourself"
            )
    model_inputs["use_cache"] = False
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    # A model split across devices (device_map) can end its backbone on another device than its head.
    hidden = hidden.to(weight.device)
    targets = targets.to(weight.device)
    dtype = _compute_dtype(hidden, weight)
    h = hidden.to(dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    # The op is opaque to autocast, but the torch code inside it would be autocast (its fp32 tiles rounded to
    # bf16): the dtype decision is made above, so autocast is off inside.
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_token_logprobs(
            h,
            w,
            targets,
            bias=b,
            temperature=temperature / scale,
            ignore_index=-100,
            return_entropy=return_entropy,
            backend=backend,
        )


# ----------------------------------------------------------------------------------------------------------------
# patch_model: the model's own forward returns per-token log-probs (and entropy) of the labels, no logits
# ----------------------------------------------------------------------------------------------------------------
_PATCH_ATTR = "_lacot_patch"
_NO_INSTANCE_FORWARD = object()


@functools.cache
def _output_class() -> type:
    # Defined on first use so that importing this module does not import transformers.
    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class FusedLogprobsOutput(ModelOutput):
        """What a patched model returns when given ``labels`` (or ``targets``): no logits.

        loss: 0-d float32, the mean negative log-likelihood of the scored tokens (``sum / num_items_in_batch``
            when the trainer passes it), as the model's own loss; logprobs / entropy: ``(B, T)`` float32, entry
            ``t`` scoring the token that follows position ``t`` (0 where nothing is scored, and at ``t = T-1``
            under the ``labels`` convention).
        """

        loss: torch.Tensor | None = None
        logprobs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        logits: torch.Tensor | None = None

    return FusedLogprobsOutput


def patch_model(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    return_entropy: bool = True,
    backend: str = "auto",
) -> torch.nn.Module:
    """Make ``model(...)`` return per-token log-probs (and entropy) of its labels without forming the logits.

    After the patch, a call with ``labels`` (transformers' convention: ``labels[b, t]`` is the token at position
    ``t``, -100 where not scored; the model shifts them) or ``targets`` (already shifted: ``targets[b, t]`` is
    scored after ``input_ids[b, :t+1]``, as in :func:`token_logprobs_from_model`) runs the backbone and
    :func:`lacot_kernels.fused_linear_token_logprobs` instead of the LM head, and returns an output with
    ``loss`` (mean NLL of the scored tokens: the model's own causal-LM loss), ``logprobs`` ``(B, T)`` float32,
    ``entropy`` ``(B, T)`` float32 (when ``return_entropy``) and ``logits=None``. A call with neither (e.g.
    ``generate``) runs the original forward unchanged. Only this model instance is patched (the class and other
    instances are untouched), and :func:`unpatch_model` restores it exactly; :func:`patched` does both.

    Args:
        model: a transformers causal LM or Qwen2-VL / Qwen2.5-VL, or a peft model wrapping one (as
            :func:`token_logprobs_from_model`).
        temperature: finite, > 0: scores ``softmax(logits / temperature)`` (the model's config logit scale too).
        return_entropy: also compute the entropy at every position.
        backend: ``"auto" | "cuda" | "triton" | "torch"``.

    Returns:
        ``model`` itself, patched. Patching a patched model raises ``ValueError``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} is already patched by lacot_kernels: call unpatch_model first")
    temperature = _checks.check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")

    # An instance-level forward (accelerate's hooks put one there) must be the one restored and the one called.
    saved = model.__dict__.get("forward", _NO_INSTANCE_FORWARD)
    original = model.forward

    @functools.wraps(original)
    def forward(*args, labels=None, targets=None, num_items_in_batch=None, **kwargs):
        if labels is None and targets is None:
            return original(*args, **kwargs)
        if labels is not None and targets is not None:
            raise TypeError("pass either labels (transformers' unshifted convention) or targets (shifted), not both")
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        if len(args) > 1:
            raise TypeError("a patched model takes input_ids positionally and every other input by keyword")
        if input_ids is None:
            raise TypeError("a patched model needs input_ids to score labels (inputs_embeds alone is not supported)")
        if labels is not None:
            _checks.check_tensor("labels", labels)
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
        kwargs.pop("return_dict", None)
        kwargs.pop("logits_to_keep", None)  # nothing is kept: there are no logits
        attention_mask = kwargs.pop("attention_mask", None)
        out = token_logprobs_from_model(
            model,
            input_ids,
            targets,
            attention_mask=attention_mask,
            temperature=temperature,
            return_entropy=return_entropy,
            backend=backend,
            **kwargs,
        )
        logp, entropy = out if return_entropy else (out, None)
        scored = targets.to(logp.device) != -100
        denom = scored.sum() if num_items_in_batch is None else num_items_in_batch
        if isinstance(denom, torch.Tensor):
            denom = denom.to(logp.device)
        loss = -logp.sum() / denom
        return _output_class()(loss=loss, logprobs=logp, entropy=entropy)

    object.__setattr__(model, "forward", forward)
    object.__setattr__(model, _PATCH_ATTR, saved)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`: the model's forward is its original one again. Raises ``ValueError`` when the
    model is not patched."""
    saved = getattr(model, _PATCH_ATTR, None)
    if saved is None:
        raise ValueError(f"{type(model).__name__} is not patched by lacot_kernels")
    if saved is _NO_INSTANCE_FORWARD:
        del model.__dict__["forward"]
    else:
        object.__setattr__(model, "forward", saved)
    del model.__dict__[_PATCH_ATTR]
    return model


@contextlib.contextmanager
def patched(
    model: torch.nn.Module, *, temperature: float = 1.0, return_entropy: bool = True, backend: str = "auto"
) -> Iterator[torch.nn.Module]:
    """``with patched(model) as m:`` - :func:`patch_model` for the block, :func:`unpatch_model` after it (also on
    an exception)."""
    patch_model(model, temperature=temperature, return_entropy=return_entropy, backend=backend)
    try:
        yield model
    finally:
        unpatch_model(model)
