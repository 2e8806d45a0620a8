"""grpo_loss with rollout-mismatch weights and sequence-level ratios (GSPO): the op behind ``grpo_loss``'s
``rollout_logp=`` / ``is_correction=`` / ``ratio_level=`` arguments (``ops/grpo.py`` keeps the plain op).

Per completion token (b, t), M = mask, w = importance weight of the policy-gradient term (1 without correction,
see ``is_correction.py``), A = advantages[b], c_b the aggregation weight of ``grpo.py``:

    token level     q = r_t = exp(logp - old_logp)
    sequence level  q = s_b = exp(sum_t M (logp - old_logp) / max(1, sum_t M))        (GSPO, Zheng et al. 2025)
    pg = -min(q A, clip(q, 1 - eps_low, 1 + eps_high) A)
    l[b, t] = w[b, t] pg + beta kl[b, t],   loss = sum_{b,t} c_b M[b, t] l[b, t]

The sequence level is TRL's ``importance_sampling_level="sequence"``: GSPO's length-normalized ratio, clipped
with the same eps_low / eps_high (GSPO's paper uses 3e-4 / 4e-4; pass them), its term broadcast to every token of
the sequence and aggregated by ``loss_type`` (with ``"grpo"`` that is GSPO's (1/G) sum_i min(s_i A_i, ...)
exactly). Its gradient is GSPO's: where s_b is not clipped,

    dloss/dlogp[b, t] = c_b (sum_t' M w) (-s_b A) M[b, t] / max(1, sum_t' M) + c_b M[b, t] beta (1 - e^{ref - logp})

so every token's gradient depends on the whole row: the kernels take two passes over a row (the ratio, then the
terms), one program per row, and nothing per token is saved. The fused LM-head path needs the same two passes
(log-probs of all tokens of a row first, then the gradients), never an approximation by token chunks.

Clip statistics at the sequence level are, as in TRL, token-weighted means of the sequences' clip flags.
"""

from __future__ import annotations

import torch

from .. import _checks, _registry
from . import batch_invariance as _bi
from . import grpo as _g
from . import is_correction as _isc
from ._triton_utils import INTERPRET, jit, tl

RATIO_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@jit
def _pg_term(q, adv, lo, hi):
    """(pg, dpg/dlog q, low-clipped, high-clipped) of ratios q (fp32)."""
    adv = adv + tl.zeros_like(q)
    # NaN propagates as in torch (tl.minimum / tl.maximum return the non-NaN operand by default): an overflowing
    # ratio times a zero advantage (inf * 0) gives a NaN loss on every backend, as in grpo.py's _grpo_token.
    nan = tl.PropagateNan.ALL
    clipped = tl.minimum(tl.maximum(q, lo, propagate_nan=nan), hi, propagate_nan=nan)
    pg = -tl.minimum(q * adv, clipped * adv, propagate_nan=nan)
    low = (q < lo) & (adv < 0.0)
    high = (q > hi) & (adv > 0.0)
    dpg = tl.where(low | high, 0.0, -q * adv)
    return pg, dpg, low, high


@jit
def _seq_row_sums(logp_ptr, old_ptr, mask_ptr, isw_ptr, row_off, T, HAS_ISW: tl.constexpr, BLOCK_T: tl.constexpr):
    """First pass over a row: (sum M (logp - old), sum M, sum M w)."""
    acc_d = tl.zeros([BLOCK_T], tl.float32)
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    acc_w = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        w = tl.load(mask_ptr + row_off + t, mask=tm, other=0.0)
        on = w != 0.0
        lp = tl.load(logp_ptr + row_off + t, mask=tm & on, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row_off + t, mask=tm & on, other=0.0).to(tl.float32)
        acc_d += tl.where(on, w * (lp - old), 0.0)
        acc_n += w
        if HAS_ISW:
            acc_w += tl.where(on, w * tl.load(isw_ptr + row_off + t, mask=tm & on, other=0.0), 0.0)
        else:
            acc_w += w
    return tl.sum(acc_d, 0), tl.sum(acc_n, 0), tl.sum(acc_w, 0)


@jit
def _grpo_rl_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    isw_ptr,
    adv_ptr,
    mask_ptr,
    part_ptr,
    slr_ptr,
    T,
    beta,
    lo,
    hi,
    HAS_REF: tl.constexpr,
    HAS_ISW: tl.constexpr,
    SEQ: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per row, fixed reduction order: the row's five sums depend on nothing but the row.
    b = tl.program_id(0).to(tl.int64)
    row_off = b * T
    adv = tl.load(adv_ptr + b).to(tl.float32)
    slr = 0.0
    if SEQ:
        sd, sn, _sw = _seq_row_sums(logp_ptr, old_ptr, mask_ptr, isw_ptr, row_off, T, HAS_ISW, BLOCK_T)
        slr = sd / tl.maximum(sn, 1.0)
        s_pg, _d, s_low, s_high = _pg_term(tl.exp(slr), adv, lo, hi)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_low = tl.zeros([BLOCK_T], tl.float32)
    acc_high = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        off = row_off + t
        w = tl.load(mask_ptr + off, mask=tm, other=0.0)
        on = w != 0.0
        lp = tl.load(logp_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
        if SEQ:
            zero = tl.zeros([BLOCK_T], tl.float32)
            loss = s_pg + zero
            low = (zero + tl.where(s_low, 1.0, 0.0)) != 0.0
            high = (zero + tl.where(s_high, 1.0, 0.0)) != 0.0
        else:
            old = tl.load(old_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
            loss, _d, low, high = _pg_term(tl.exp(lp - old), adv, lo, hi)
        if HAS_ISW:
            loss = tl.load(isw_ptr + off, mask=tm & on, other=0.0) * loss
        if HAS_REF:
            ref = tl.load(ref_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
            d = ref - lp
            kl = tl.exp(d) - d - 1.0
            # beta = 0 (KL only reported): an overflowing kl must not turn the loss into 0 * inf = NaN.
            loss += tl.where(beta != 0.0, _g._kl_loss(d, beta), 0.0)
        else:
            kl = tl.zeros_like(lp)
        acc_loss += tl.where(on, w * loss, 0.0)
        acc_n += w
        acc_kl += tl.where(on, w * kl, 0.0)
        acc_low += tl.where(on & low, w, 0.0)
        acc_high += tl.where(on & high, w, 0.0)
    tl.store(part_ptr + 5 * b, tl.sum(acc_loss, 0))
    tl.store(part_ptr + 5 * b + 1, tl.sum(acc_n, 0))
    tl.store(part_ptr + 5 * b + 2, tl.sum(acc_kl, 0))
    tl.store(part_ptr + 5 * b + 3, tl.sum(acc_low, 0))
    tl.store(part_ptr + 5 * b + 4, tl.sum(acc_high, 0))
    tl.store(slr_ptr + b, slr)


@jit
def _grpo_rl_bwd_kernel(
    grad_loss_ptr,
    logp_ptr,
    old_ptr,
    ref_ptr,
    isw_ptr,
    adv_ptr,
    mask_ptr,
    scale_ptr,
    out_ptr,
    T,
    beta,
    lo,
    hi,
    HAS_REF: tl.constexpr,
    HAS_ISW: tl.constexpr,
    SEQ: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row_off = b * T
    adv = tl.load(adv_ptr + b).to(tl.float32)
    g = tl.load(grad_loss_ptr) * tl.load(scale_ptr + b)
    if SEQ:
        # d pg / d logp[t] = (d pg / d log s) M_t / max(1, n); summed over the row's tokens with weights M w.
        sd, sn, sw = _seq_row_sums(logp_ptr, old_ptr, mask_ptr, isw_ptr, row_off, T, HAS_ISW, BLOCK_T)
        nb = tl.maximum(sn, 1.0)
        _p, s_dpg, _l, _h = _pg_term(tl.exp(sd / nb), adv, lo, hi)
        coef = sw * s_dpg / nb
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        off = row_off + t
        w = tl.load(mask_ptr + off, mask=tm, other=0.0)
        on = w != 0.0
        lp = tl.load(logp_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
        if SEQ:
            dloss = coef + tl.zeros([BLOCK_T], tl.float32)
        else:
            old = tl.load(old_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
            _p, dloss, _l, _h = _pg_term(tl.exp(lp - old), adv, lo, hi)
            if HAS_ISW:
                dloss = tl.load(isw_ptr + off, mask=tm & on, other=0.0) * dloss
        if HAS_REF:
            ref = tl.load(ref_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
            dloss += tl.where(beta != 0.0, _g._kl_grad(ref - lp, beta), 0.0)
        grad = tl.where(on, g * w * dloss, 0.0)
        tl.store(out_ptr + off, grad.to(out_ptr.dtype.element_ty), mask=tm)


# ----------------------------------------------------------------------------------------------------------------
# Launchers and the pure-torch backend
# ----------------------------------------------------------------------------------------------------------------
def _block(T: int, det: bool) -> int:
    # Deterministic mode: a block fixed by no shape, so a row's sums do not depend on the padding width T.
    return _bi.FIXED_BLOCK_T if det else _g._block_t(T)


def _parts_triton(logp, old, adv, mask, ref, isw, beta, lo, hi, seq, det):
    B, T = logp.shape
    part = torch.empty(B, 5, device=logp.device, dtype=torch.float32)
    slr = torch.empty(B, device=logp.device, dtype=torch.float32)
    if B > 0:
        _grpo_rl_fwd_kernel[(B,)](
            logp,
            old,
            ref if ref is not None else logp,
            isw if isw is not None else mask,
            adv,
            mask,
            part,
            slr,
            T,
            beta,
            lo,
            hi,
            HAS_REF=ref is not None,
            HAS_ISW=isw is not None,
            SEQ=seq,
            BLOCK_T=_block(T, det),
            num_warps=1 if INTERPRET else 4,
        )
    return part, slr


def _bwd_triton(grad_loss, logp, old, adv, mask, ref, isw, scale, beta, lo, hi, seq, det):
    B, T = logp.shape
    out = torch.empty_like(logp)
    if B > 0 and T > 0:
        _grpo_rl_bwd_kernel[(B,)](
            grad_loss,
            logp,
            old,
            ref if ref is not None else logp,
            isw if isw is not None else mask,
            adv,
            mask,
            scale,
            out,
            T,
            beta,
            lo,
            hi,
            HAS_REF=ref is not None,
            HAS_ISW=isw is not None,
            SEQ=seq,
            BLOCK_T=_block(T, det),
            num_warps=1 if INTERPRET else 4,
        )
    return out


def _pg_torch(q, adv, lo, hi):
    clipped = q.clamp(lo, hi)
    pg = -torch.minimum(q * adv, clipped * adv)
    low = (q < lo) & (adv < 0)
    high = (q > hi) & (adv > 0)
    return pg, torch.where(low | high, 0.0, -q * adv), low, high


def _prep_torch(logp, old, mask, ref, isw):
    on = mask != 0
    # Garbage (NaN / inf) under masked tokens must not reach the sums: replace it before any arithmetic.
    lp = torch.where(on, logp.float(), 0.0)
    o = torch.where(on, old.float(), 0.0)
    r = torch.where(on, ref.float(), 0.0) if ref is not None else None
    w = torch.where(on, isw, 0.0) if isw is not None else None
    return on, lp, o, r, w


def _row_sum(det):
    return _bi.tree_sum if det else (lambda t: t.sum(1))


def _seq_torch(on, lp, o, mask, w, det):
    rsum = _row_sum(det)
    n = rsum(mask)
    slr = rsum(torch.where(on, mask * (lp - o), 0.0)) / n.clamp(min=1.0)
    sw = rsum(torch.where(on, mask * w, 0.0)) if w is not None else n
    return slr, n, sw


def _parts_torch(logp, old, adv, mask, ref, isw, beta, lo, hi, seq, det):
    on, lp, o, r, w = _prep_torch(logp, old, mask, ref, isw)
    a = adv.float()[:, None]
    rsum = _row_sum(det)
    if seq:
        slr, _, _ = _seq_torch(on, lp, o, mask, w, det)
        pg, _, low, high = _pg_torch(slr.exp()[:, None].expand_as(lp), a, lo, hi)
    else:
        slr = torch.zeros(lp.shape[0], device=lp.device)
        pg, _, low, high = _pg_torch(torch.exp(lp - o), a, lo, hi)
    loss = w * pg if w is not None else pg
    if r is not None:
        d = r - lp
        kl = d.exp() - d - 1.0
        if beta != 0.0:  # (beta = 0: an overflowing kl must not make the loss 0 * inf = NaN)
            loss = loss + _g.kl_loss_torch(d, beta)
    else:
        kl = torch.zeros_like(lp)

    def wsum(x):
        return rsum(torch.where(on, mask * x, 0.0))

    part = torch.stack([wsum(loss), rsum(mask), wsum(kl), wsum(low.float()), wsum(high.float())], -1)
    return part, slr


def _bwd_torch(grad_loss, logp, old, adv, mask, ref, isw, scale, beta, lo, hi, seq, det):
    on, lp, o, r, w = _prep_torch(logp, old, mask, ref, isw)
    a = adv.float()[:, None]
    if seq:
        slr, n, sw = _seq_torch(on, lp, o, mask, w, det)
        _, dpg, _, _ = _pg_torch(slr.exp()[:, None], a, lo, hi)
        dloss = (sw[:, None] * dpg / n.clamp(min=1.0)[:, None]).expand_as(lp)
    else:
        _, dloss, _, _ = _pg_torch(torch.exp(lp - o), a, lo, hi)
        if w is not None:
            dloss = w * dloss
    if r is not None:
        if beta != 0.0:
            dloss = dloss + _g.kl_grad_torch(r - lp, beta)
    g = grad_loss.float() * scale[:, None] * mask
    return torch.where(on, g * dloss, 0.0).to(logp.dtype)


PARTS = {"triton": _parts_triton, "torch": _parts_torch}
BWD = {"triton": _bwd_triton, "torch": _bwd_torch}


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::grpo_loss_rl (+ its backward op), fake kernels, autograd
# ----------------------------------------------------------------------------------------------------------------
@torch.library.register_kernel("lacot::grpo_loss_rl", ("cpu", "cuda"))
def _grpo_loss_rl_impl(
    logp, old, adv, mask, ref, isw, norm, beta, eps_low, eps_high, loss_type, max_len, ratio_level, det, backend
):
    lo, hi = _g._bounds(eps_low, eps_high)
    name = _g._resolve(backend, logp.device)
    part, slr = PARTS[name](logp, old, adv, mask, ref, isw, beta, lo, hi, ratio_level == "sequence", det)
    loss, stats, scale = _g._finish(part, loss_type, max_len, norm)
    return loss, stats, scale, slr


@torch.library.register_fake("lacot::grpo_loss_rl")
def _grpo_loss_rl_fake(
    logp, old, adv, mask, ref, isw, norm, beta, eps_low, eps_high, loss_type, max_len, ratio_level, det, backend
):
    f32 = dict(device=logp.device, dtype=torch.float32)
    B = logp.shape[0]
    return logp.new_empty((), **f32), logp.new_empty(4, **f32), logp.new_empty(B, **f32), logp.new_empty(B, **f32)


@torch.library.register_kernel("lacot::grpo_loss_rl_backward", ("cpu", "cuda"))
def _grpo_loss_rl_backward_impl(
    grad_loss, logp, old, adv, mask, ref, isw, row_scale, slr, beta, eps_low, eps_high, ratio_level, det, backend
):
    lo, hi = _g._bounds(eps_low, eps_high)
    name = _g._resolve(backend, logp.device)
    seq = ratio_level == "sequence"
    return BWD[name](grad_loss, logp, old, adv, mask, ref, isw, row_scale, beta, lo, hi, seq, det)


@torch.library.register_fake("lacot::grpo_loss_rl_backward")
def _grpo_loss_rl_backward_fake(
    grad_loss, logp, old, adv, mask, ref, isw, row_scale, slr, beta, eps_low, eps_high, ratio_level, det, backend
):
    return torch.empty_like(logp)


def _setup_context(ctx, inputs, output):
    logp, old, adv, mask, ref, isw, _norm, beta, eps_low, eps_high, _lt, _L, ratio_level, det, backend = inputs
    _, stats, row_scale, slr = output
    ctx.mark_non_differentiable(stats, row_scale, slr)
    ctx.save_for_backward(logp, old, adv, mask, ref, isw, row_scale, slr)
    ctx.args = (beta, eps_low, eps_high, ratio_level, det, backend)


def _backward(ctx, grad_loss, _g_stats, _g_scale, _g_slr):
    logp, old, adv, mask, ref, isw, row_scale, slr = ctx.saved_tensors
    beta, eps_low, eps_high, ratio_level, det, backend = ctx.args
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.lacot.grpo_loss_rl_backward(
            grad_loss.float().contiguous(),
            logp,
            old,
            adv,
            mask,
            ref,
            isw,
            row_scale,
            slr,
            beta,
            eps_low,
            eps_high,
            ratio_level,
            det,
            backend,
        )
    return (grad,) + (None,) * 14


torch.library.register_autograd("lacot::grpo_loss_rl", _backward, setup_context=_setup_context)

assert "grpo_loss_rl" in _registry.SCHEMAS


# ----------------------------------------------------------------------------------------------------------------
# Entry point (called by grpo.grpo_loss after its argument checks)
# ----------------------------------------------------------------------------------------------------------------
def grpo_loss_rl(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    norm: torch.Tensor | None,
    beta: float,
    eps_low: float,
    eps_high: float,
    loss_type: str,
    L: int,
    backend: str,
    *,
    rollout_logp: torch.Tensor | None,
    is_correction: str,
    is_cap: float,
    is_band: tuple[float, float],
    is_level: str,
    ratio_level: str,
    deterministic: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo.grpo_loss`` with the rollout correction / sequence ratios; ``mask`` already fp32 and checked."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    _isc.check_is_args(is_correction, is_cap, is_band, is_level)
    if is_correction != "none" and rollout_logp is None:
        raise ValueError(f"is_correction={is_correction!r} needs rollout_logp (the rollout engine's log-probs)")
    isw, is_stats = None, {}
    if rollout_logp is not None:
        _g._check_token_tensor("rollout_logp", rollout_logp, tuple(logp.shape))
        _checks.check_same_device(("logp", logp), ("rollout_logp", rollout_logp))
        isw, is_stats = _isc.rollout_is_weights(
            old_logp.detach(), rollout_logp.detach(), mask, mode=is_correction, cap=is_cap, band=is_band,
            level=is_level,
        )  # fmt: skip
    loss, stats, _, _ = torch.ops.lacot.grpo_loss_rl(
        logp.contiguous(),
        old_logp.contiguous(),
        advantages.float().contiguous(),
        mask,
        ref_logp.contiguous() if ref_logp is not None else None,
        isw,
        norm,
        beta,
        eps_low,
        eps_high,
        loss_type,
        L,
        ratio_level,
        deterministic,
        backend,
    )
    out = _g._stats_dict(stats, ref_logp is not None)
    out.update(is_stats)
    return loss, out
