"""Route TRL's per-token log-probs and entropies through lacot_kernels: one line, reversible.

    from lacot_kernels.integrations import trl as lacot_trl
    lacot_trl.patch()        # before or after building the trainer; GRPOTrainer / DPOTrainer / ... now use our ops
    lacot_trl.unpatch()      # puts back the very objects TRL had

What is replaced (TRL's own semantics kept: temperature, logit scale, masks, output dtypes of log-probs aside):

* TRL >= 1.16 computes per-token log-probs inside the forward that ``trl.trainer.utils.add_fused_lm_head``
  installs on the model, through ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature,
  chunk_size, softcap, logit_scale, outputs)``. That name (``trl.trainer.utils._ChunkedLogProbFunction``, also
  ``trl.kernels.ChunkedLogProbFunction``) is swapped for :class:`FusedHeadLogProbs`, which computes ``log_probs`` and
  ``entropy`` with :func:`lacot_kernels.fused_linear_token_logprobs` (``softmax(logit_scale * logits / T)`` is the
  op at temperature ``T / logit_scale``). The metric-only outputs DPO asks for (``mean_logits``, ``is_top1``,
  ``log_sum_sq_probs``; no gradient) come from one extra no-grad pass over the head in fp32 tiles. Because the
  forward looks the name up at call time, models patched by ``add_fused_lm_head`` before ``patch()`` are covered.
* Every TRL release since 0.15 (and the experimental trainers of 1.16) also calls ``selective_log_softmax``,
  ``entropy_from_logits`` and (1.16) ``selective_log_softmax_and_entropy`` on materialized logits. These are
  replaced in ``trl.trainer.utils`` *and* in every already-imported ``trl.*`` module that bound them with
  ``from .utils import ...``, by wrappers over :func:`lacot_kernels.token_logprobs`.

Cases our ops do not cover fall back to TRL's original function, with a one-time warning naming the reason:
final-logit soft-capping (Gemma 2 style; not linear in the head), a non-positive logit scale, fp64 inputs,
top-K index gathers, output fields a future TRL adds, and DeepSpeed ZeRO-3 (its partitioned head must be
re-gathered in the backward, which only TRL's own function does).

The rollout sampler's truncation: ``patch(sampler=grpo_config)`` reads TRL's ``top_k`` / ``top_p`` / ``min_p``
(and ``use_vllm``: vLLM's filter order, else transformers') and computes every patched log-prob and entropy under
it (:func:`lacot_kernels.token_logprobs` with ``top_k=...``), so TRL's policy ratio and its vLLM
importance-sampling ratio compare the distribution the tokens were drawn from (trl#6789). TRL applies its own
importance-sampling correction in its loss; :func:`grpo_loss_kwargs` translates those settings (and
``importance_sampling_level``) into :func:`lacot_kernels.grpo_loss` / ``fused_linear_grpo_loss`` arguments for a
loop that calls our losses with a TRL ``GRPOConfig``.

Differences from TRL, by design: log-probs and entropies are float32 whatever the logits dtype (TRL's
``selective_log_softmax`` returns the logits dtype), and the head's logits are accumulated in fp32 (TRL rounds each
tile to the compute dtype first), so bf16 runs differ from TRL at bf16 rounding level; fp32 runs agree to ~1e-6.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .. import _checks, _registry, fused_linear_token_logprobs
from .._dropin import token_logprobs_any_layout
from ..ops import _lm_head as _lm

__all__ = [
    "SUPPORTED_VERSIONS",
    "FusedHeadLogProbs",
    "UnsupportedTRLVersionError",
    "grpo_loss_kwargs",
    "is_patched",
    "patch",
    "sampler_settings",
    "patched",
    "unpatch",
]

#: TRL releases this patch is known to handle: the fused-head layout was verified on 1.16.0, the
#: ``selective_log_softmax`` layout on 1.9.0; the range starts at 0.15, the first release with that function.
SUPPORTED_VERSIONS = ">=0.15,<1.17"
_MIN_VERSION = (0, 15)
_MAX_VERSION = (1, 17)  # exclusive

# Names in trl.trainer.utils (and modules that imported them by name) that patch() replaces.
_FUNCTION_NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
_CHUNKED_NAMES = ("_ChunkedLogProbFunction", "ChunkedLogProbFunction")
# The per-token fields ChunkedLogProbFunction can return, in its output order after log_probs.
_TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_METRIC_TILE_ELEMS = 1 << 22  # fp32 elements of one tile of the no-grad metric pass (16 MiB)


class UnsupportedTRLVersionError(RuntimeError):
    """The installed TRL is outside :data:`SUPPORTED_VERSIONS`, or has none of the functions this patch replaces."""


@dataclass
class _State:
    backend: str
    trl_version: str
    # (module, attribute, original object): everything setattr'ed, in order, so unpatch() can put it back.
    replaced: list[tuple[ModuleType, str, object]] = field(default_factory=list)
    originals: dict[str, object] = field(default_factory=dict)
    sampler: dict[str, object] = field(default_factory=dict)  # top_k / top_p / min_p / sampler_order


_STATE: _State | None = None
_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _fallback_warning(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"lacot_kernels.integrations.trl: {reason}; this call uses TRL's original function"
            + (" (without the sampler truncation)" if _sampler() else ""),
            RuntimeWarning,
            stacklevel=3,
        )


def _backend() -> str:
    return _STATE.backend if _STATE is not None else "auto"


def _sampler() -> dict[str, object]:
    return dict(_STATE.sampler) if _STATE is not None else {}


def _get(args: object, name: str, default: object = None) -> object:
    return args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)


def sampler_settings(args: object) -> dict[str, object]:
    """The truncation keywords of our ops (``top_k``, ``top_p``, ``min_p``, ``sampler_order``) from a TRL
    ``GRPOConfig`` (or a dict with those keys), in TRL's conventions: ``top_k`` 0 or None = off, ``top_p`` 1 =
    off, ``min_p`` None or 0 = off; vLLM's filter order when ``use_vllm`` is set, else transformers'. Empty when
    nothing truncates."""
    top_k, top_p, min_p = _get(args, "top_k"), _get(args, "top_p"), _get(args, "min_p")
    out: dict[str, object] = {}
    if top_k is not None and int(top_k) > 0:
        out["top_k"] = int(top_k)
    if top_p is not None and float(top_p) < 1.0:
        out["top_p"] = float(top_p)
    if min_p is not None and float(min_p) > 0.0:
        out["min_p"] = float(min_p)
    if out:
        out["sampler_order"] = "vllm" if _get(args, "use_vllm", False) else "hf"
    return out


def grpo_loss_kwargs(args: object) -> dict[str, object]:
    """TRL ``GRPOConfig`` -> keyword arguments of :func:`lacot_kernels.grpo_loss` / ``fused_linear_grpo_loss``.

    Covers the clip range (``epsilon``, ``epsilon_high``), ``beta``, ``loss_type`` (grpo, bnpo, dr_grpo, dapo),
    ``importance_sampling_level`` (``"sequence"`` -> ``ratio_level="sequence"``, GSPO), the vLLM
    importance-sampling correction (``token_truncate`` -> tis, ``token_mask`` -> mis, or icepop when
    ``vllm_importance_sampling_clip_min`` is set; ``sequence_*`` the same with ``is_level="sequence"``: TRL's
    sequence ratio is the product of the token ratios, as ours) and the sampler truncation. The caller passes
    ``rollout_logp`` (TRL's ``sampling_per_token_logps``). Raises ValueError for settings with no equivalent.
    """
    kw: dict[str, object] = {}
    eps = _get(args, "epsilon", 0.2)
    kw["eps_low"] = float(eps)
    eps_high = _get(args, "epsilon_high")
    kw["eps_high"] = float(eps_high) if eps_high is not None else None
    kw["beta"] = float(_get(args, "beta", 0.0) or 0.0)
    loss_type = _get(args, "loss_type", "dapo")
    if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"TRL loss_type {loss_type!r} has no lacot_kernels equivalent (grpo, bnpo, dr_grpo, dapo)")
    kw["loss_type"] = loss_type
    level = _get(args, "importance_sampling_level", "token")
    if level not in ("token", "sequence"):
        raise ValueError(f"TRL importance_sampling_level {level!r} has no lacot_kernels equivalent")
    kw["ratio_level"] = level
    if _get(args, "use_vllm", False) and _get(args, "vllm_importance_sampling_correction", False):
        mode = str(_get(args, "vllm_importance_sampling_mode", "sequence_mask"))
        lo = _get(args, "vllm_importance_sampling_clip_min")
        hi = _get(args, "vllm_importance_sampling_clip_max", 3.0)
        kind = mode.split("_")[-1]
        if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
            raise ValueError(f"TRL vllm_importance_sampling_mode {mode!r} is not known")
        if kind == "truncate":
            if lo is not None or hi is None:
                raise ValueError("TRL's two-sided truncation (clip_min set, or no clip_max) has no equivalent")
            kw.update(is_correction="tis", is_cap=float(hi))
        elif lo is not None:
            kw.update(is_correction="icepop", is_band=(float(lo), float(hi) if hi is not None else math.inf))
        else:
            if hi is None:
                raise ValueError("TRL's mask mode without clip_min or clip_max masks nothing: use 'none'")
            kw.update(is_correction="mis", is_cap=float(hi))
        kw["is_level"] = mode.split("_")[0]
    kw.update(sampler_settings(args))
    return kw


def _original(name: str):
    if _STATE is None or name not in _STATE.originals:
        raise RuntimeError(f"lacot_kernels.integrations.trl: {name} called while not patched")
    return _STATE.originals[name]


# ----------------------------------------------------------------------------------------------------------------
# Replacements of the functions on materialized logits
# ----------------------------------------------------------------------------------------------------------------
def _op_accepts_logits(logits: object, index: object | None = None) -> str | None:
    """None when token_logprobs can compute this call exactly, else the reason it cannot."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _checks.FLOAT_DTYPES:
        return "logits that are not a float32/bfloat16/float16 tensor"
    if logits.dim() < 1 or logits.shape[-1] == 0:
        return "logits without a vocabulary dimension"
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dtype not in _checks.INDEX_DTYPES:
            return "an index that is not an int32/int64 tensor"
        if tuple(index.shape) != tuple(logits.shape[:-1]):
            return "an index of shape (..., K) (top-K gather)"
        if index.device != logits.device:
            return "index and logits on different devices"
    return None


def _per_row_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    # Trainers pass logits[:, :-1]; the helper scores such slices without copying them.
    return token_logprobs_any_layout(
        logits, targets, temperature=temperature, return_entropy=entropy, backend=_backend(), **_sampler()
    )


def _masked_targets(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    # Rows TRL's row_mask skips become ignored rows: exactly 0 out, 0 gradient, and no work.
    if row_mask is None:
        return index
    return torch.where(row_mask == 0, torch.full_like(index, -100), index)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` on lacot_kernels: ``log_softmax(logits / T)[index]``, float32.

    logits ``(..., V)``, index ``(...)`` int -> ``(...)`` float32; ``row_mask`` ``(...)``: rows where it is 0 give
    0. An index of shape ``(..., K)`` or fp64 logits go to TRL's original function.
    """
    reason = _op_accepts_logits(logits, index)
    if reason is None and row_mask is not None and tuple(row_mask.shape) != tuple(index.shape):
        reason = "a row_mask whose shape differs from the index"
    if reason is not None:
        _fallback_warning(f"selective_log_softmax got {reason}")
        orig = _original("selective_log_softmax")
        if temperature == 1.0 and row_mask is None:
            return orig(logits, index)  # the pre-1.16 signature has no temperature / row_mask
        return orig(logits, index, temperature=temperature, row_mask=row_mask)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _per_row_logprobs(logits, _masked_targets(index, row_mask), float(temperature), False)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` on lacot_kernels: entropy of ``softmax(logits)``, float32, shape ``(...)``.

    ``chunk_size`` is accepted for signature compatibility; the op streams each row once whatever its size.
    """
    reason = _op_accepts_logits(logits)
    if reason is not None:
        _fallback_warning(f"entropy_from_logits got {reason}")
        return _original("entropy_from_logits")(logits, chunk_size)
    # Any valid id will do as the target: only the entropy output is used, and its gradient is exact.
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return _per_row_logprobs(logits, dummy, 1.0, True)[1]


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's one-pass log-prob + entropy on lacot_kernels: two ``(...)`` float32 tensors."""
    reason = _op_accepts_logits(logits, index)
    if reason is None and row_mask is not None and tuple(row_mask.shape) != tuple(index.shape):
        reason = "a row_mask whose shape differs from the index"
    if reason is not None:
        _fallback_warning(f"selective_log_softmax_and_entropy got {reason}")
        return _original("selective_log_softmax_and_entropy")(
            logits, index, entropy_requires_grad=entropy_requires_grad, temperature=temperature, row_mask=row_mask
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logp, ent = _per_row_logprobs(logits, _masked_targets(index, row_mask), float(temperature), True)
    return logp, ent if entropy_requires_grad else ent.detach()


# ----------------------------------------------------------------------------------------------------------------
# Replacement of ChunkedLogProbFunction (the fused LM head of TRL >= 1.16)
# ----------------------------------------------------------------------------------------------------------------
def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _head_metrics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: float,
    want: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """The no-gradient per-token statistics of ``z = scale * (hidden @ weight.T + bias)`` that TRL logs.

    ``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits = mean_v z_v``, ``is_top1``: the target is the first
    argmax of z. One pass over (row chunk x vocabulary block) fp32 tiles with online max / sums, so memory stays
    at one tile.
    """
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    z_sum = torch.zeros(N, **f32)
    m = torch.full((N,), -math.inf, **f32)
    s1 = torch.zeros(N, **f32)
    s2 = torch.zeros(N, **f32)
    before = torch.full((N,), -math.inf, **f32)
    z_y = torch.full((N,), -math.inf, **f32)
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        # The LM-head engine's fp32 tiles (row chunk x vocabulary block), same products as the fused op.
        for r, v0, z in _lm.tiles(hidden, weight, bias, tile_elems=_METRIC_TILE_ELEMS):
            z *= scale
            n_cols = z.shape[1]
            if "mean_logits" in want:
                z_sum[r] += z.sum(-1)
            if "is_top1" in want:
                local = targets[r] - v0
                ahead = torch.arange(n_cols, device=dev)[None, :] < local[:, None]
                before[r] = torch.maximum(before[r], z.masked_fill(~ahead, -math.inf).amax(-1))
                inside = (local >= 0) & (local < n_cols)
                picked = z.gather(1, local.clamp(0, n_cols - 1)[:, None]).squeeze(1)
                z_y[r] = torch.where(inside, picked, z_y[r])
            m_new = torch.maximum(m[r], z.amax(-1))
            if "log_sum_sq_probs" in want:
                # log sum p^2 = log sum e^{2(z-m)} - 2 log sum e^{z-m}: both sums kept relative to the running max
                shift = torch.exp(m[r] - m_new)
                e = torch.exp(z - m_new[:, None])
                s1[r] = s1[r] * shift + e.sum(-1)
                s2[r] = s2[r] * shift * shift + (e * e).sum(-1)
            m[r] = m_new
    out: dict[str, torch.Tensor] = {}
    if "log_sum_sq_probs" in want:
        out["log_sum_sq_probs"] = torch.log(s2) - 2 * torch.log(s1)
    if "mean_logits" in want:
        out["mean_logits"] = z_sum / V
    if "is_top1" in want:
        out["is_top1"] = (z_y >= m) & (z_y > before)
    return out


class FusedHeadLogProbs:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction``: the same ``apply`` signature and outputs.

    ``apply(hidden (N, D), weight (V, D), bias (V,) | None, targets (N,) int, temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=(...))`` ->
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``(N,)`` (float32; ``is_top1`` bool) or
    None when not in ``outputs``. ``log_probs`` and ``entropy`` carry gradients to hidden, weight and bias.
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = _TRL_OPTIONAL_OUTPUTS,
    ):
        dev = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        reason = None
        if final_logit_softcapping is not None:
            reason = "final-logit soft-capping is not linear in the LM head"
        elif not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
            reason = f"logit_scale={logit_scale} cannot be folded into the temperature"
        elif compute_dtype not in _checks.FLOAT_DTYPES:
            reason = f"compute dtype {compute_dtype} is not float32/bfloat16/float16"
        elif any(name not in _TRL_OPTIONAL_OUTPUTS and name != "log_probs" for name in outputs):
            reason = f"outputs {tuple(outputs)} include fields this patch does not know"
        elif _zero3_enabled():
            reason = "DeepSpeed ZeRO-3 needs the LM head re-gathered in the backward"
        elif not (temperature > 0):
            reason = f"temperature={temperature} is not positive"
        if reason is not None:
            _fallback_warning(f"ChunkedLogProbFunction: {reason}")
            return _original("ChunkedLogProbFunction").apply(
                hidden,
                weight,
                bias,
                targets,
                temperature,
                chunk_size,
                final_logit_softcapping,
                logit_scale,
                outputs,
            )
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        want_entropy = "entropy" in outputs
        metrics = tuple(name for name in outputs if name not in ("log_probs", "entropy"))
        # softmax(logit_scale * x / T) is the op's softmax(x / T') with T' = T / logit_scale. Autocast is off inside:
        # the dtype is settled above, and the torch code inside the op must keep its fp32 tiles.
        with torch.autocast(dev, enabled=False):
            res = fused_linear_token_logprobs(
                h,
                w,
                targets,
                bias=b,
                temperature=float(temperature) / float(logit_scale),
                return_entropy=want_entropy,
                backend=_backend(),
                **_sampler(),
            )
            extra = _head_metrics(h, w, b, targets, float(logit_scale) / float(temperature), metrics) if metrics else {}
        logp, ent = res if want_entropy else (res, None)
        return logp, ent, extra.get("log_sum_sq_probs"), extra.get("mean_logits"), extra.get("is_top1")


# ----------------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------------
def _parse_version(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def _check_version(version: str) -> None:
    if not (_MIN_VERSION <= _parse_version(version) < _MAX_VERSION):
        raise UnsupportedTRLVersionError(
            f"lacot_kernels.integrations.trl supports trl{SUPPORTED_VERSIONS}, but trl {version} is installed: "
            f"install a supported release (pip install 'trl{SUPPORTED_VERSIONS}'), or pass check_version=False to "
            "patch whatever of the known functions this release has (untested)"
        )


def _trl_modules() -> list[ModuleType]:
    return [
        mod
        for name, mod in list(sys.modules.items())
        if isinstance(mod, ModuleType) and (name == "trl" or name.startswith("trl."))
    ]


def _replacements() -> dict[str, object]:
    return {
        "selective_log_softmax": selective_log_softmax,
        "entropy_from_logits": entropy_from_logits,
        "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
        "_ChunkedLogProbFunction": FusedHeadLogProbs,
        "ChunkedLogProbFunction": FusedHeadLogProbs,
    }


def is_patched() -> bool:
    """True between :func:`patch` and :func:`unpatch`."""
    return _STATE is not None


def patch(backend: str = "auto", *, check_version: bool = True, sampler: object | None = None) -> None:
    """Route TRL's per-token log-probs and entropies through lacot_kernels' ops (see the module docstring).

    Args:
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to every op call.
        check_version: raise :class:`UnsupportedTRLVersionError` unless trl is in :data:`SUPPORTED_VERSIONS`.
        sampler: a TRL ``GRPOConfig`` (or a dict) whose ``top_k`` / ``top_p`` / ``min_p`` the rollouts use
            (:func:`sampler_settings`): every patched log-prob and entropy is then taken under that truncation.
            Cases that fall back to TRL's own function (see above) are not truncated; the warning says so.
            The reference model's log-probs go through the same functions and are truncated too: with
            ``beta > 0`` a sampled token the reference would not keep gets kl = inf (TRL's default beta is 0).

    Calling it again while patched with the same backend does nothing; with another backend it raises
    ValueError (``unpatch()`` first). Raises ImportError when trl is not installed, and
    :class:`UnsupportedTRLVersionError` when the installed TRL has none of the functions this patch replaces.
    """
    global _STATE
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    if not isinstance(check_version, bool):
        raise TypeError(f"check_version must be a bool, got {type(check_version).__name__}")
    settings = sampler_settings(sampler) if sampler is not None else {}
    if settings:
        from ..ops import sampler_truncation

        sampler_truncation.check_sampler_args(
            settings.get("top_k"), settings.get("top_p"), settings.get("min_p"), settings["sampler_order"]
        )
    with _LOCK:
        if _STATE is not None:
            if _STATE.sampler != settings:
                raise ValueError(
                    f"TRL is already patched with sampler settings {_STATE.sampler}; call unpatch() before "
                    f"patching with {settings}"
                )
            if _STATE.backend != backend:
                raise ValueError(
                    f"TRL is already patched with backend={_STATE.backend!r}; call unpatch() before patching with "
                    f"backend={backend!r}"
                )
            return
        try:
            import trl
        except ImportError as exc:
            raise ImportError(
                f"lacot_kernels.integrations.trl needs trl{SUPPORTED_VERSIONS} (pip install 'trl{SUPPORTED_VERSIONS}')"
            ) from exc
        version = str(getattr(trl, "__version__", "0"))
        if check_version:
            _check_version(version)
        import trl.trainer.utils as utils

        kernel_modules: list[ModuleType] = []
        for name in ("trl.kernels", "trl.kernels.chunked_logprob"):
            try:
                __import__(name)
                kernel_modules.append(sys.modules[name])
            except ImportError:
                pass

        originals: dict[str, object] = {}
        for name in _FUNCTION_NAMES:
            if callable(utils.__dict__.get(name)):
                originals[name] = utils.__dict__[name]
        chunked = utils.__dict__.get("_ChunkedLogProbFunction")
        if chunked is not None and callable(getattr(chunked, "apply", None)):
            originals["ChunkedLogProbFunction"] = chunked
        if "selective_log_softmax" not in originals and "ChunkedLogProbFunction" not in originals:
            raise UnsupportedTRLVersionError(
                f"trl {version} has neither trl.trainer.utils.selective_log_softmax nor the fused LM head "
                f"(ChunkedLogProbFunction); lacot_kernels.integrations.trl supports trl{SUPPORTED_VERSIONS}"
            )

        state = _State(backend=backend, trl_version=version, originals=originals, sampler=settings)
        new = _replacements()
        # Every trl module that holds one of the originals under its usual name gets the replacement: the defining
        # module, and those that did `from .utils import selective_log_softmax` (their own binding).
        for mod in [utils, *kernel_modules, *_trl_modules()]:
            for name, replacement in new.items():
                key = "ChunkedLogProbFunction" if name in _CHUNKED_NAMES else name
                if key not in originals:
                    continue
                current = mod.__dict__.get(name)
                if current is not None and current is originals[key]:
                    state.replaced.append((mod, name, current))
                    setattr(mod, name, replacement)
        _STATE = state


def unpatch() -> None:
    """Put back exactly the objects :func:`patch` replaced (also in trl modules imported while patched).
    Does nothing when not patched."""
    global _STATE
    with _LOCK:
        if _STATE is None:
            return
        state = _STATE
        for mod, name, original in reversed(state.replaced):
            setattr(mod, name, original)
        # Modules imported while patched bound the replacements: give them the originals too.
        new = _replacements()
        for mod in _trl_modules():
            for name, replacement in new.items():
                key = "ChunkedLogProbFunction" if name in _CHUNKED_NAMES else name
                if key in state.originals and mod.__dict__.get(name) is replacement:
                    setattr(mod, name, state.originals[key])
        _STATE = None


@contextlib.contextmanager
def patched(backend: str = "auto", *, check_version: bool = True, sampler: object | None = None) -> Iterator[None]:
    """``with patched(): trainer.train()`` - patch for the block, unpatch after it (unless it was already
    patched when the block began, in which case it stays patched)."""
    was_patched = is_patched()
    patch(backend, check_version=check_version, sampler=sampler)
    try:
        yield
    finally:
        if not was_patched:
            unpatch()
