"""The set of tokens a sampler keeps under top-k / top-p / min-p, as one logit threshold per row.

Every truncation rule samplers use keeps an *upper set* of the row's logits (a token is kept if every token with
a larger logit is kept), so the kept set is ``{v : x_v >= tau}`` for one number ``tau`` per row, and ``tau`` can
always be taken to be one of the row's own logit values. ``kept_threshold`` computes that ``tau`` (raw-logit space,
before the temperature: the division by T > 0 preserves order); the log-prob kernels then only compare each
logit with ``tau`` while they accumulate the log-sum-exp and the entropy (see ``token_logprobs(top_k=...)``).

Rules implemented (read from transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` / ``MinPLogitsWarper`` and
vLLM v1's sampler: temperature first, then the filters; ``z = x / T``):

* ``top_k``: keep ``x_v >= x_(k)``, the k-th largest logit (transformers' ``scores < topk(scores, k)[-1]`` is
  removed; vLLM masks ``logits < k-th value`` the same way): every token tied with the k-th value is kept.
  ``top_k >= V`` keeps everything.
* ``top_p``: sort the surviving tokens ascending, ``c = cumsum(softmax(z))``; remove the tokens with
  ``c <= 1 - top_p``; the largest token is always kept. ``top_p = 1`` keeps everything.
* ``min_p``: keep ``p_v >= min_p * max_v p_v``, evaluated as ``z_v - max z >= log(min_p)`` in fp32; it does not
  depend on what other filters removed (the ratio to the max is unchanged by renormalization).
* Order: only ``top_p`` depends on what was removed before it. ``order="vllm"`` (vLLM v1: min_p, then top-k,
  then top-p, so top-p is computed on the distribution renormalized over the min_p and top-k survivors);
  ``order="hf"`` (transformers: top-k, top-p, min_p, so top-p sees only the top-k survivors).
* Ties: samplers sort with an unspecified order among equal logits, so where *equal* logits straddle the top-p
  boundary they keep an arbitrary subset of them. Here the kept set is a threshold set: every token tied with
  the smallest kept logit is kept. This differs from a sampler only on exact ties at the top-p boundary (where
  the sampler's own choice is not reproducible either).
* Arithmetic: the softmax / cumulative sum of top-p and the log-ratio test of min-p are done in fp32, as
  the samplers do; a token whose cumulative mass lies within fp32 rounding of ``1 - top_p`` may be classified
  differently from an fp64 evaluation (``reference.kept_mask`` is the fp64 definition).

How the fused LM-head engine gets ``tau`` (it never holds a full row of logits):
* ``min_p`` only needs the row max ``m`` (which the engine's first pass has): the kept test is elementwise,
  ``(x_v - m) / T >= log(min_p)``, and ``tau`` is the smallest logit passing it (a min-reduction in the same
  sweep).
* ``top_k`` needs a per-row selection over V: a first pass keeping a running top-k (k <= a few hundred) per row
  over the vocabulary tiles, then ``tau`` = the k-th value.
* ``top_p`` needs the sorted row mass: a selection pass over V (e.g. a histogram / radix select of the logits
  weighted by ``exp((x - m) / T)``, with the normalizer from the first pass) to find the smallest kept value.
So the fused path is two passes over the vocabulary tiles: pass 1 computes ``tau`` (and ``m``); pass 2 is the
ordinary log-sum-exp / entropy / gradient pass with ``x >= tau`` as its per-element selector. The kernels in
``token_logprobs`` already take ``tau`` per row, so pass 2 needs no new kernel.

Gradients: ``tau`` is treated as a constant selector (the kept set is piecewise constant in the logits); the
gradient flows only through the kept logits.
"""

from __future__ import annotations

import math

import torch

from . import batch_invariance as _bi

ORDERS = ("vllm", "hf")

# Rows per step: bounds the fp32 sort / cumsum temporaries to about this many elements.
_CHUNK_ELEMS = 1 << 22


def check_sampler_args(top_k: object, top_p: object, min_p: object, order: object) -> None:
    """Raise TypeError / ValueError naming the bad argument (None disables a filter)."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be a Python int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (None disables it), got {top_k}")
    for name, value in (("top_p", top_p), ("min_p", min_p)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a Python float or None, got {type(value).__name__}")
        if not (0.0 < float(value) <= 1.0) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be in (0, 1] (None disables it), got {value}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def is_truncating(top_k: int | None, top_p: float | None, min_p: float | None) -> bool:
    """True when at least one filter is set (``top_p = 1`` still counts: it is applied, and keeps everything)."""
    return top_k is not None or top_p is not None or min_p is not None


def _top_p_threshold(x: torch.Tensor, pre: torch.Tensor, top_p: float, inv_t: float, det: bool) -> torch.Tensor:
    """Smallest logit kept by top-p over the tokens with x >= pre (fp32 rows x (n, V))."""
    xs, _ = torch.sort(torch.where(x >= pre[:, None], x, float("-inf")), dim=-1)  # ascending
    m = xs[:, -1:]
    e = torch.where(xs == float("-inf"), 0.0, ((xs - m) * inv_t).exp())
    if det:  # fixed-order sums: the kept set of a row does not depend on the other rows
        cum = _bi.tree_cumsum(e / _bi.tree_sum(e)[:, None])
    else:
        cum = (e / e.sum(-1, keepdim=True)).cumsum(-1)
    removed = cum <= (1.0 - top_p)
    removed[:, -1] = False
    # `removed` is a prefix (cum is nondecreasing): the first kept position is the number removed.
    first = removed.sum(-1, keepdim=True)
    return xs.gather(-1, first).squeeze(-1)


def kept_threshold(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    order: str = "vllm",
    deterministic: bool = False,
) -> torch.Tensor:
    """Per-row threshold ``tau``: the sampler keeps exactly ``{v : logits[n, v] >= tau[n]}``.

    Args:
        logits: ``(N, V)`` float32 / bfloat16 / float16 raw logits (before the temperature).
        temperature: finite, > 0 (top-p and min-p act on ``softmax(logits / T)``).
        top_k, top_p, min_p, order: the sampler's settings (see the module docstring); None disables a filter.
        deterministic: reduce in a fixed order (``batch_invariance``): a row's tau independent of the batch.

    Returns:
        ``tau`` ``(N,)`` float32, one of the row's logit values (``-inf`` when nothing is truncated). No gradient.
    """
    N, V = logits.shape
    inv_t = 1.0 / temperature
    tau = torch.full((N,), float("-inf"), device=logits.device, dtype=torch.float32)
    if N == 0 or not is_truncating(top_k, top_p, min_p):
        return tau
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    with torch.no_grad():
        for r0 in range(0, N, step):
            x = logits[r0 : r0 + step].float()
            t_min = torch.full((x.shape[0],), float("-inf"), device=x.device)
            t_k = t_min
            if min_p is not None:
                m = x.amax(-1, keepdim=True)
                # p_v >= min_p * p_max  <=>  (x_v - m) / T >= log(min_p): no exp over the row needed.
                keep = (x - m) * inv_t >= math.log(min_p)
                t_min = torch.where(keep, x, float("inf")).amin(-1)
            if top_k is not None and top_k < V:
                t_k = torch.topk(x, top_k, dim=-1).values[:, -1]
            t = torch.maximum(t_min, t_k)
            if top_p is not None and top_p < 1.0:
                pre = t if order == "vllm" else t_k
                t = torch.maximum(t, _top_p_threshold(x, pre, float(top_p), inv_t, deterministic))
            tau[r0 : r0 + step] = t
    return tau


def sampler_mask(logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The kept set as a bool mask ``(N, V)``: ``logits >= tau[:, None]`` (materializes N x V: for tests/debug)."""
    return logits.float() >= tau[:, None]
