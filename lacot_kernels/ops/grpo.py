"""GRPO policy loss with TRL's semantics, from per-token log-probs or straight from the LM head.

Per completion token (b, t), with r = exp(logp - old_logp), A = advantages[b], M = mask[b, t]:

    l[b, t] = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * kl[b, t]
    kl[b, t] = exp(ref - logp) - (ref - logp) - 1                       (k3, only with ref_logp)
    loss = sum_{b,t} c_b M[b, t] l[b, t]

Every TRL aggregation is a per-row weight c_b (n_b = sum_t M[b, t], L = max_completion_length):

    grpo     c_b = 1 / (B max(1, n_b))        per-sequence mean, then batch mean
    bnpo     c_b = 1 / max(1, sum_b n_b)      token mean of this micro-batch
    dr_grpo  c_b = 1 / (B L)                  constant normalizer (Dr. GRPO)
    dapo     c_b = 1 / normalizer             TRL: num_items_in_batch / num_processes; default max(1, sum_b n_b)

so dloss/dlogp[b, t] = c_b M[b, t] dl/dlogp[b, t] is known as soon as the token's log-prob is: it depends on
no other token. Two consequences drive this file:
  * ``grpo_loss``: one Triton kernel reduces each row to five sums (sum M l, n_b, sum M kl, low/high clip
    counts), the per-row weights and the scalar are finished in torch (B numbers), and the backward is one
    elementwise kernel that recomputes dl/dlogp from the inputs (nothing per token is saved);
  * ``fused_linear_grpo_loss``: the gradient of the logits is formed in the forward pass. For each chunk of
    rows the fp32 logits tile (1 GEMM) is turned by one Triton kernel into log-probs, the per-token loss and
    its derivative, and then in place into dlogits; dX = G W and dW += G^T X (2 GEMMs) follow at once. That is
    3 GEMMs of N x D x V instead of 4 (forward, then a backward that recomputes the logits), and the backward
    only scales the saved gradients by the incoming scalar. Tile backends: ``triton`` (that kernel), ``cuda``
    (the compiled per-row kernels of token_logprobs: C++/OpenMP CPU twin or CUDA, two passes), ``torch``.
    Without gradients the fused log-prob forward is reused (no tile at all with Triton) and nothing else runs.

dl/dlogp, from the two branches of the min: the unclipped branch r A is taken unless the token is clipped, and
clip() has zero slope where it clips, so dl/dlogp = -r A outside the clipped region (TRL's `is_region_clipped`:
r < 1 - eps_low with A < 0, or r > 1 + eps_high with A > 0) and 0 inside it; plus beta (1 - exp(ref - logp)).
Masked tokens (M == 0) contribute exactly 0 to the loss, the statistics and the gradient, whatever values
(NaN, inf) sit there.
"""

from __future__ import annotations

import math

import torch

from .. import _checks, _registry
from . import _lm_head as _lm
from . import fused_linear as _fl
from ._triton_utils import INTERPRET, jit, next_pow2, tl, triton

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Order of the statistics vector the ops return, and the names the public functions give them (TRL's).
STAT_NAMES = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@jit
def _kl_loss(d, beta):
    """beta * k3 = beta (e^d - d - 1), d = ref - logp, as e^(d + log beta) - beta (d + 1): e^d alone overflows fp32
    (d > 88.7) while beta e^d may still fit (the loss was inf where its fp64 value is finite)."""
    return tl.exp(d + tl.log(beta)) - beta * (d + 1.0)


@jit
def _kl_grad(d, beta):
    """d(beta * k3)/dlogp = beta (1 - e^d), d = ref - logp, as beta - e^(d + log beta): e^d alone overflows fp32
    (d > 88.7) while beta e^d still fits; the overflowing intermediate gave inf, then inf * 0 = NaN in dlogits."""
    return beta - tl.exp(d + tl.log(beta))


@jit
def _grpo_token(lp, old, ref, adv, beta, lo, hi, HAS_REF: tl.constexpr):
    """(l, dl/dlogp, kl, low-clipped, high-clipped) of tokens; every input already fp32."""
    ratio = tl.exp(lp - old)
    # The advantage is one per row: broadcast it to the tokens' shape so that the flags combine elementwise.
    adv = adv + tl.zeros_like(ratio)
    # NaN must propagate as in torch (tl.minimum / tl.maximum return the non-NaN operand by default): a NaN
    # log-prob, old log-prob or advantage at an active token makes the loss NaN on every backend.
    clipped = tl.minimum(
        tl.maximum(ratio, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL
    )
    loss = -tl.minimum(ratio * adv, clipped * adv, propagate_nan=tl.PropagateNan.ALL)
    low = (ratio < lo) & (adv < 0.0)
    high = (ratio > hi) & (adv > 0.0)
    # A where, not a product with the flag: a clipped ratio may be inf, and inf * 0 would be NaN.
    dloss = tl.where(low | high, 0.0, -ratio * adv)
    if HAS_REF:
        d = ref - lp
        e = tl.exp(d)
        kl = e - d - 1.0
        # beta = 0 (KL only reported): adding 0 * kl would turn a kl that overflows fp32 (inf) into a NaN loss.
        loss += tl.where(beta != 0.0, _kl_loss(d, beta), 0.0)
        dloss += tl.where(beta != 0.0, _kl_grad(d, beta), 0.0)
    else:
        kl = tl.zeros_like(lp)
    return loss, dloss, kl, low, high


@jit
def _grpo_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    part_ptr,
    T,
    beta,
    lo,
    hi,
    HAS_REF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per row: the row's five sums, reduced in fp32 in a fixed order (deterministic).
    b = tl.program_id(0).to(tl.int64)
    adv = tl.load(adv_ptr + b).to(tl.float32)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_low = tl.zeros([BLOCK_T], tl.float32)
    acc_high = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        off = b * T + t
        w = tl.load(mask_ptr + off, mask=tm, other=0.0)
        on = w != 0.0
        lp = tl.load(logp_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
        if HAS_REF:
            ref = tl.load(ref_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
        else:
            ref = lp
        loss, _d, kl, low, high = _grpo_token(lp, old, ref, adv, beta, lo, hi, HAS_REF)
        acc_loss += tl.where(on, w * loss, 0.0)
        acc_n += w
        acc_kl += tl.where(on, w * kl, 0.0)
        # w * flag, not where(flag, w, 0): a non-finite weight poisons the statistics as torch's product does.
        acc_low += tl.where(on, w * low.to(tl.float32), 0.0)
        acc_high += tl.where(on, w * high.to(tl.float32), 0.0)
    tl.store(part_ptr + 5 * b, tl.sum(acc_loss, 0))
    tl.store(part_ptr + 5 * b + 1, tl.sum(acc_n, 0))
    tl.store(part_ptr + 5 * b + 2, tl.sum(acc_kl, 0))
    tl.store(part_ptr + 5 * b + 3, tl.sum(acc_low, 0))
    tl.store(part_ptr + 5 * b + 4, tl.sum(acc_high, 0))


@jit
def _grpo_loss_bwd_kernel(
    grad_loss_ptr,
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    scale_ptr,
    out_ptr,
    T,
    beta,
    lo,
    hi,
    HAS_REF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    off = b * T + t
    w = tl.load(mask_ptr + off, mask=tm, other=0.0)
    on = w != 0.0
    lp = tl.load(logp_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + off, mask=tm & on, other=0.0).to(tl.float32)
    else:
        ref = lp
    adv = tl.load(adv_ptr + b).to(tl.float32)
    _l, dloss, _k, _lo, _hi = _grpo_token(lp, old, ref, adv, beta, lo, hi, HAS_REF)
    g = tl.load(grad_loss_ptr) * tl.load(scale_ptr + b)
    grad = tl.where(on, g * w * dloss, 0.0)
    tl.store(out_ptr + off, grad.to(out_ptr.dtype.element_ty), mask=tm)


@jit
def _fused_grpo_tile_kernel(
    logits_ptr,
    stride_l,
    grad_ptr,
    stride_g,
    tok_ptr,
    targets_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    scale_ptr,
    out_ptr,
    T,
    V,
    inv_t,
    beta,
    lo,
    hi,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per row of an fp32 logits tile (a chunk of active tokens x the whole vocabulary):
    # pass 1 folds the row into (max, sum-exp) -> log-prob -> GRPO loss and dl/dlogp; pass 2 writes
    # dlogits = g (onehot - p) / T, g = c_b M dl/dlogp. `grad` may alias `logits` (fp32): each element is
    # read before it is written, by the same program.
    r = tl.program_id(0).to(tl.int64)
    tok = tl.load(tok_ptr + r)
    b = tok // T
    y = tl.load(targets_ptr + tok)
    base = logits_ptr + r * stride_l
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cm = cols < V
        x = tl.load(base + cols, mask=cm, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        # Differences are formed in raw-logit space before the 1/T scaling (as in token_logprobs).
        alpha = tl.exp(tl.where(m == float("-inf"), 0.0, (m - m_new) * inv_t))
        s = s * alpha + tl.sum(tl.where(cm, tl.exp((x - m_new) * inv_t), 0.0), 0)
        m = m_new
    logs = tl.log(s)
    # An out-of-range id (unchecked on CUDA unless LACOT_CHECK_BOUNDS=1) is never read: it gives a NaN log-prob,
    # hence NaN loss and gradients for its row, as every other kernel of the package does.
    in_range = (y >= 0) & (y < V)
    x_y = tl.load(base + y, mask=in_range, other=0.0)
    lp = tl.where(in_range, (x_y - m) * inv_t - logs, float("nan"))

    w = tl.load(mask_ptr + tok)
    old = tl.load(old_ptr + tok).to(tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + tok).to(tl.float32)
    else:
        ref = lp
    adv = tl.load(adv_ptr + b).to(tl.float32)
    loss, dloss, kl, low, high = _grpo_token(lp, old, ref, adv, beta, lo, hi, HAS_REF)
    tl.store(out_ptr + 5 * r, lp)
    tl.store(out_ptr + 5 * r + 1, loss)
    tl.store(out_ptr + 5 * r + 2, kl)
    tl.store(out_ptr + 5 * r + 3, low.to(tl.float32))
    tl.store(out_ptr + 5 * r + 4, high.to(tl.float32))

    g = tl.load(scale_ptr + b) * w * dloss
    gbase = grad_ptr + r * stride_g
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cm = cols < V
        x = tl.load(base + cols, mask=cm, other=float("-inf"))
        p = tl.exp((x - m) * inv_t - logs)
        gl = (tl.where(cols == y, g, 0.0) - g * p) * inv_t
        tl.store(gbase + cols, gl.to(grad_ptr.dtype.element_ty), mask=cm)


# ----------------------------------------------------------------------------------------------------------------
# Shared torch pieces: the per-token math (torch backend), the per-row weights, the finishing sums
# ----------------------------------------------------------------------------------------------------------------
def _bounds(eps_low: float, eps_high: float) -> tuple[float, float]:
    # Formed once in double precision and rounded once, like TRL's `1 - self.epsilon_low` against fp32 ratios.
    return 1.0 - eps_low, 1.0 + eps_high


def kl_loss_torch(d: torch.Tensor, beta: float) -> torch.Tensor:
    """beta (e^d - d - 1) without the overflowing intermediate e^d (see _kl_loss); beta > 0."""
    return torch.exp(d + math.log(beta)) - beta * (d + 1.0)


def kl_grad_torch(d: torch.Tensor, beta: float) -> torch.Tensor:
    """beta (1 - e^d) without the overflowing intermediate e^d (see _kl_grad); beta > 0."""
    return beta - torch.exp(d + math.log(beta))


def _grpo_token_torch(lp, old, ref, adv, beta, lo, hi):
    ratio = torch.exp(lp - old)
    clipped = ratio.clamp(lo, hi)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    low = (ratio < lo) & (adv < 0)
    high = (ratio > hi) & (adv > 0)
    dloss = torch.where(low | high, 0.0, -ratio * adv)
    if ref is not None:
        d = ref - lp
        e = d.exp()
        kl = e - d - 1.0
        if beta != 0.0:  # with beta = 0 a kl that overflows fp32 (inf) must not make the loss 0 * inf = NaN
            loss = loss + kl_loss_torch(d, beta)
            dloss = dloss + kl_grad_torch(d, beta)
    else:
        kl = torch.zeros_like(lp)
    return loss, dloss, kl, low, high


def _row_scale(counts: torch.Tensor, loss_type: str, L: int, normalizer: torch.Tensor | None) -> torch.Tensor:
    """c_b of the module docstring, (B,) fp32, from the per-row active-token counts (B,) fp32."""
    B = counts.shape[0]
    if loss_type == "grpo":
        return 1.0 / (B * counts.clamp(min=1.0))
    if loss_type == "dr_grpo":
        return torch.full_like(counts, 1.0 / max(B * L, 1))
    if loss_type == "dapo" and normalizer is not None:
        return (1.0 / normalizer.float()).expand(B).contiguous()
    return (1.0 / counts.sum().clamp(min=1.0)).expand(B).contiguous()


def _finish(part: torch.Tensor, loss_type: str, L: int, normalizer: torch.Tensor | None):
    """(loss, stats (4,), row_scale (B,)) from the per-row sums part (B, 5) = [sum Ml, n, sum M kl, low, high]."""
    scale = _row_scale(part[:, 1], loss_type, L, normalizer)
    loss = (scale * part[:, 0]).sum()
    tot = part[:, 1:].sum(0)
    denom = tot[0].clamp(min=1.0)
    # Low clipping needs A < 0 and high clipping A > 0: the two sets are disjoint, so region = low + high.
    stats = torch.stack([tot[1], tot[2], tot[3], tot[2] + tot[3]]) / denom
    return loss, stats, scale


# ----------------------------------------------------------------------------------------------------------------
# grpo_loss backends: per-row sums (forward) and dloss/dlogp (backward)
# ----------------------------------------------------------------------------------------------------------------
def _block_t(T: int) -> int:
    return min(next_pow2(max(T, 1)), 1 << 15 if INTERPRET else 1024)


def _grpo_parts_triton(logp, old, adv, mask, ref, beta, lo, hi):
    B, T = logp.shape
    part = torch.empty(B, 5, device=logp.device, dtype=torch.float32)
    if B > 0:
        _grpo_loss_fwd_kernel[(B,)](
            logp,
            old,
            ref if ref is not None else logp,
            adv,
            mask,
            part,
            T,
            beta,
            lo,
            hi,
            HAS_REF=ref is not None,
            BLOCK_T=_block_t(T),
            num_warps=1 if INTERPRET else 4,
        )
    return part


def _grpo_parts_torch(logp, old, adv, mask, ref, beta, lo, hi):
    on = mask != 0
    # Garbage (NaN / inf) under masked tokens must not reach the sums: replace it before any arithmetic.
    lp = torch.where(on, logp.float(), 0.0)
    o = torch.where(on, old.float(), 0.0)
    r = torch.where(on, ref.float(), 0.0) if ref is not None else None
    loss, _, kl, low, high = _grpo_token_torch(lp, o, r, adv.float()[:, None], beta, lo, hi)

    def wsum(x):
        return torch.where(on, mask * x, 0.0).sum(1)

    return torch.stack([wsum(loss), mask.sum(1), wsum(kl), wsum(low.float()), wsum(high.float())], -1)


def _grpo_bwd_triton(grad_loss, logp, old, adv, mask, ref, scale, beta, lo, hi):
    B, T = logp.shape
    out = torch.empty_like(logp)
    if B > 0 and T > 0:
        block = _block_t(T)
        _grpo_loss_bwd_kernel[(B, triton.cdiv(T, block))](
            grad_loss,
            logp,
            old,
            ref if ref is not None else logp,
            adv,
            mask,
            scale,
            out,
            T,
            beta,
            lo,
            hi,
            HAS_REF=ref is not None,
            BLOCK_T=block,
            num_warps=1 if INTERPRET else 4,
        )
    return out


def _grpo_bwd_torch(grad_loss, logp, old, adv, mask, ref, scale, beta, lo, hi):
    on = mask != 0
    lp = torch.where(on, logp.float(), 0.0)
    o = torch.where(on, old.float(), 0.0)
    r = torch.where(on, ref.float(), 0.0) if ref is not None else None
    _, dloss, *_ = _grpo_token_torch(lp, o, r, adv.float()[:, None], beta, lo, hi)
    g = grad_loss.float() * scale[:, None] * mask
    return torch.where(on, g * dloss, 0.0).to(logp.dtype)


PARTS = {"triton": _grpo_parts_triton, "torch": _grpo_parts_torch}
BWD = {"triton": _grpo_bwd_triton, "torch": _grpo_bwd_torch}


def _resolve(backend: str, device: torch.device) -> str:
    # No compiled kernel for this family: `cuda` falls back to the auto order (Triton on CUDA tensors).
    return _registry.resolve_backend(backend, device, native_op=None, has_triton=True)


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::grpo_loss (+ its backward op), fake kernels, autograd
# ----------------------------------------------------------------------------------------------------------------
@torch.library.register_kernel("lacot::grpo_loss", ("cpu", "cuda"))
def _grpo_loss_impl(
    logp, old_logp, advantages, mask, ref_logp, dapo_normalizer, beta, eps_low, eps_high, loss_type, max_len, backend
):
    lo, hi = _bounds(eps_low, eps_high)
    name = _resolve(backend, logp.device)
    part = PARTS[name](logp, old_logp, advantages, mask, ref_logp, beta, lo, hi)
    return _finish(part, loss_type, max_len, dapo_normalizer)


@torch.library.register_fake("lacot::grpo_loss")
def _grpo_loss_fake(
    logp, old_logp, advantages, mask, ref_logp, dapo_normalizer, beta, eps_low, eps_high, loss_type, max_len, backend
):
    f32 = dict(device=logp.device, dtype=torch.float32)
    return logp.new_empty((), **f32), logp.new_empty(4, **f32), logp.new_empty(logp.shape[0], **f32)


@torch.library.register_kernel("lacot::grpo_loss_backward", ("cpu", "cuda"))
def _grpo_loss_backward_impl(
    grad_loss, logp, old_logp, advantages, mask, ref_logp, row_scale, beta, eps_low, eps_high, backend
):
    lo, hi = _bounds(eps_low, eps_high)
    name = _resolve(backend, logp.device)
    return BWD[name](grad_loss, logp, old_logp, advantages, mask, ref_logp, row_scale, beta, lo, hi)


@torch.library.register_fake("lacot::grpo_loss_backward")
def _grpo_loss_backward_fake(
    grad_loss, logp, old_logp, advantages, mask, ref_logp, row_scale, beta, eps_low, eps_high, backend
):
    return torch.empty_like(logp)


def _grpo_setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, ref_logp, _norm, beta, eps_low, eps_high, _lt, _L, backend = inputs
    _, stats, row_scale = output
    ctx.mark_non_differentiable(stats, row_scale)
    ctx.save_for_backward(logp, old_logp, advantages, mask, ref_logp, row_scale)
    ctx.args = (beta, eps_low, eps_high, backend)


def _grpo_backward(ctx, grad_loss, _grad_stats, _grad_scale):
    logp, old_logp, advantages, mask, ref_logp, row_scale = ctx.saved_tensors
    beta, eps_low, eps_high, backend = ctx.args
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.lacot.grpo_loss_backward(
            grad_loss.float().contiguous(),
            logp,
            old_logp,
            advantages,
            mask,
            ref_logp,
            row_scale,
            beta,
            eps_low,
            eps_high,
            backend,
        )
    return (grad,) + (None,) * 11


torch.library.register_autograd("lacot::grpo_loss", _grpo_backward, setup_context=_grpo_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Fused with the LM head: row chunks of the active tokens, 3 GEMMs, gradients formed in the forward pass
# ----------------------------------------------------------------------------------------------------------------
def _tile_triton(logits, grad, tok, targets, old, ref, adv, mask, scale, T, inv_t, beta, lo, hi, temperature):
    r, V = logits.shape
    out = torch.empty(r, 5, device=logits.device, dtype=torch.float32)
    block = min(next_pow2(V), 1 << 15 if INTERPRET else 4096)
    _fused_grpo_tile_kernel[(r,)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        tok,
        targets,
        old,
        ref if ref is not None else old,
        adv,
        mask,
        scale,
        out,
        T,
        V,
        inv_t,
        beta,
        lo,
        hi,
        HAS_REF=ref is not None,
        BLOCK_V=block,
        num_warps=1 if INTERPRET else 8,
    )
    return out


def _tile_torch(logits, grad, tok, targets, old, ref, adv, mask, scale, T, inv_t, beta, lo, hi, temperature):
    # Same math as the Triton tile kernel, in as few passes over the (rows x V) tile as torch allows: the logits
    # tile is scratch (shifted in place), exp() is the only other tile-sized fp32 buffer, and it becomes dlogits.
    b = tok // T
    y_raw = targets[tok][:, None]
    in_range = (y_raw >= 0) & (y_raw < logits.shape[1])
    y = torch.where(in_range, y_raw, 0)  # out-of-range ids: NaN rows, never an out-of-bounds index
    m = logits.amax(-1, keepdim=True)
    x_y = logits.gather(-1, y)
    d = logits.sub_(m).mul_(inv_t)
    e = torch.exp(d)
    s = e.sum(-1, keepdim=True)
    logs = s.log()
    lp = torch.where(in_range, (x_y - m) * inv_t - logs, float("nan")).squeeze(-1)
    loss, dloss, kl, low, high = _grpo_token_torch(
        lp, old[tok].float(), ref[tok].float() if ref is not None else None, adv[b].float(), beta, lo, hi
    )
    coef = (scale[b] * mask[tok] * dloss * inv_t)[:, None]
    e.mul_(-coef / s).scatter_add_(-1, y, coef)
    grad.copy_(e)
    return torch.stack([lp, loss, kl, low.float(), high.float()], -1)


# An ignore_index no target id can equal: the native per-row kernels must treat every tile row as active (a bad
# id then gives NaN, as in the other tile kernels, instead of a silently ignored row).
_NO_IGNORE = -(1 << 62)


def _tile_native(logits, grad, tok, targets, old, ref, adv, mask, scale, T, inv_t, beta, lo, hi, temperature):
    # The compiled per-row kernels of token_logprobs (C++/OpenMP CPU twin, or CUDA) on the tile: one pass for the
    # softmax statistics and log-probs, the GRPO token math on the r log-probs, one pass writing dlogits.
    b = tok // T
    y = targets[tok]
    lp, ent, stats = torch.ops.lacot.token_logprobs_fwd_native(logits, y, temperature, _NO_IGNORE, False)
    loss, dloss, kl, low, high = _grpo_token_torch(
        lp, old[tok].float(), ref[tok].float() if ref is not None else None, adv[b].float(), beta, lo, hi
    )
    g = (scale[b] * mask[tok] * dloss).contiguous()
    grad.copy_(torch.ops.lacot.token_logprobs_bwd_native(g, None, logits, y, stats, ent, temperature, _NO_IGNORE))
    return torch.stack([lp, loss, kl, low.float(), high.float()], -1)


TILE = {"triton": _tile_triton, "torch": _tile_torch, "cuda": _tile_native}


def _fused_grpo_with_grads(
    hidden,
    weight,
    bias,
    targets,
    old,
    adv,
    mask,
    ref,
    normalizer,
    T,
    temperature,
    beta,
    lo,
    hi,
    loss_type,
    L,
    needs,
    name,
    precision="default",
):
    N = hidden.shape[0]
    B = adv.shape[0]
    dev = hidden.device
    inv_t = 1.0 / temperature
    mask2 = mask.view(B, T)
    scale = _row_scale(mask2.sum(1), loss_type, L, normalizer)
    # Row skipping: masked tokens (prompt padding, tokens after EOS) never reach a GEMM. Sizing the loop needs
    # the count on the host (one sync), which the custom op hides from torch.compile.
    rows_all = (mask != 0).nonzero().squeeze(1)
    tok_out = torch.zeros(N, 5, device=dev, dtype=torch.float32)
    # dlogits: fp32 (aliasing the logits tile) for fp32 inputs and for precision="high" (then split hi/lo or kept
    # fp32 by the engine's rule), else a tile in the GEMM dtype.
    keep32 = hidden.dtype == torch.float32 or precision == "high"
    per_elem = 4 if keep32 else 4 + hidden.element_size()
    if name != "triton":
        per_elem += 4  # the torch tile's exp() buffer / the native backward's output tile
    tile_fn = TILE[name]

    def tile(logits, tok):
        g = logits if keep32 else torch.empty(logits.shape, device=dev, dtype=hidden.dtype)
        tok_out[tok] = tile_fn(logits, g, tok, targets, old, ref, adv, mask, scale, T, inv_t, beta, lo, hi, temperature)
        return _fl._gemm_dlogits(g, hidden.dtype, precision) if keep32 else g

    gh, gw, gb = _lm.row_chunks(
        hidden, weight, bias, rows_all, bytes_per_elem=per_elem, tile_fn=tile, needs=needs, logits_fn=_fl._logits_tile
    )
    if needs[0]:
        grad_h = torch.zeros_like(hidden)
        grad_h[rows_all] = gh.to(hidden.dtype)
    else:
        grad_h = hidden.new_empty(0)
    w = mask.view(B, T)
    on = w != 0
    t = tok_out.view(B, T, 5)

    def wsum(x):
        return torch.where(on, w * x, 0.0).sum(1)

    part = torch.stack([wsum(t[..., 1]), w.sum(1), wsum(t[..., 2]), wsum(t[..., 3]), wsum(t[..., 4])], -1)
    loss, stats, _ = _finish(part, loss_type, L, normalizer)
    return (
        loss,
        stats,
        grad_h,
        gw.to(weight.dtype) if needs[1] else hidden.new_empty(0),
        gb.to(bias.dtype) if needs[2] else hidden.new_empty(0),
    )


def _fused_grpo_forward_only(
    hidden, weight, bias, targets, old, adv, mask, ref, normalizer, T, temperature, beta, lo, hi, loss_type, L, name
):
    # No gradient wanted: the fused log-prob forward (Triton: no logits tile at all; masked rows skipped on the
    # device) followed by the token loss. Masked tokens get the ignore id, so they are neither read nor checked;
    # an id no target can equal, so that an unchecked bad id at an active token (-1 included) gives NaN.
    ignore = _NO_IGNORE
    y = torch.where(mask != 0, targets, ignore)
    if name == "triton":
        logp, _, _ = _fl._fused_fwd_triton(hidden, weight, bias, y, temperature, ignore, False)
    else:
        logp, _, _ = _fl._fused_fwd_tiled(hidden, weight, bias, y, temperature, ignore, False, name)
    B = adv.shape[0]
    r = ref.view(B, T) if ref is not None else None
    use_triton = name == "triton" or (hidden.is_cuda and _registry.triton_available("cuda"))
    part = PARTS["triton" if use_triton else "torch"](
        logp.view(B, T), old.view(B, T), adv, mask.view(B, T), r, beta, lo, hi
    )
    loss, stats, _ = _finish(part, loss_type, L, normalizer)
    # Three distinct empty tensors: outputs of a custom op must not alias each other.
    return loss, stats, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)


def _resolve_fused(backend: str, device: torch.device) -> str:
    """Backend of the fused op: the same rule as fused_linear_token_logprobs, whose pieces it runs.

    ``cuda`` runs the compiled per-row kernels of token_logprobs (the CPU twin on CPU tensors) on the logits
    tiles, ``triton`` the fused kernels, ``torch`` plain torch. On CUDA tensors `auto` prefers Triton (the
    forward-only path then needs no logits tile at all); on CPU tensors it takes the CPU twin when built."""
    return _fl._resolve(backend, device)


@torch.library.register_kernel("lacot::fused_linear_grpo_loss", ("cpu", "cuda"))
@_fl._no_autocast  # fp32 logits tiles even inside a caller's autocast region
def _fused_grpo_impl(
    hidden,
    weight,
    bias,
    targets,
    old_logp,
    advantages,
    mask,
    ref_logp,
    dapo_normalizer,
    temperature,
    beta,
    eps_low,
    eps_high,
    loss_type,
    max_len,
    needs_grad,
    backend,
    precision="default",
):
    V = weight.shape[0]
    B = advantages.shape[0]
    T = hidden.shape[0] // B if B > 0 else 0
    # Only the targets of active tokens are used (and checked): padding may hold any id.
    # (-1 at an active token is out of range too: no id is reserved for "ignored" here, the mask says it.)
    _checks.check_active_targets_in_range(targets, mask != 0, V)
    lo, hi = _bounds(eps_low, eps_high)
    name = _resolve_fused(backend, hidden.device)
    needs = [bool(x) for x in needs_grad]
    needs[2] = needs[2] and bias is not None
    args = (hidden, weight, bias, targets, old_logp, advantages, mask, ref_logp, dapo_normalizer, T, temperature)
    if any(needs):
        return _fused_grpo_with_grads(*args, beta, lo, hi, loss_type, max_len, needs, name, precision)
    return _fused_grpo_forward_only(*args, beta, lo, hi, loss_type, max_len, name)


@torch.library.register_fake("lacot::fused_linear_grpo_loss")
def _fused_grpo_fake(
    hidden,
    weight,
    bias,
    targets,
    old_logp,
    advantages,
    mask,
    ref_logp,
    dapo_normalizer,
    temperature,
    beta,
    eps_low,
    eps_high,
    loss_type,
    max_len,
    needs_grad,
    backend,
    precision="default",
):
    f32 = dict(device=hidden.device, dtype=torch.float32)
    return (
        hidden.new_empty((), **f32),
        hidden.new_empty(4, **f32),
        torch.empty_like(hidden) if needs_grad[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs_grad[1] else hidden.new_empty(0),
        torch.empty_like(bias) if (needs_grad[2] and bias is not None) else hidden.new_empty(0),
    )


def _fused_setup_context(ctx, inputs, output):
    _, stats, gh, gw, gb = output
    ctx.mark_non_differentiable(stats, gh, gw, gb)
    ctx.save_for_backward(gh, gw, gb)


def _fused_backward(ctx, grad_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    # The gradients were formed in the forward pass for an upstream gradient of 1: scale them (in their dtype).
    out = [None] * len(ctx.needs_input_grad)
    for i, g in enumerate((gh, gw, gb)):
        if ctx.needs_input_grad[i] and g.numel() > 0:
            out[i] = g * grad_loss.to(g.dtype)
    return tuple(out)


torch.library.register_autograd("lacot::fused_linear_grpo_loss", _fused_backward, setup_context=_fused_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _check_float(name: str, value: object, *, low: float = 0.0) -> float:
    return _checks.check_float(name, value, low=low)


def _check_options(B, T, device, ref_logp, beta, eps_low, eps_high, loss_type, max_completion_length, dapo_normalizer):
    """Validated (beta, eps_low, eps_high, L, normalizer tensor or None)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = _check_float("beta", beta)
    eps_low = _check_float("eps_low", eps_low)
    eps_high = eps_low if eps_high is None else _check_float("eps_high", eps_high)
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's per-token log-probs), got None")
    if max_completion_length is None:
        L = max(T, 1)
    else:
        L = _checks.check_int("max_completion_length", max_completion_length)
        if L < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {L}")
        if L < T:
            raise ValueError(f"max_completion_length must be >= the completion length T = {T}, got {L}")
    norm = None
    if dapo_normalizer is not None:
        if loss_type != "dapo":
            raise ValueError(f"dapo_normalizer applies to loss_type='dapo' only, got loss_type={loss_type!r}")
        if isinstance(dapo_normalizer, torch.Tensor):
            if dapo_normalizer.numel() != 1:
                raise ValueError(f"dapo_normalizer must be a scalar, got shape {tuple(dapo_normalizer.shape)}")
            if not dapo_normalizer.is_floating_point() and dapo_normalizer.dtype not in _checks.INDEX_DTYPES:
                raise TypeError(f"dapo_normalizer must be a number or a numeric tensor, got {dapo_normalizer.dtype}")
            # A 0-d CPU tensor (e.g. TRL's num_items_in_batch) is copied to the device without a host sync.
            norm = dapo_normalizer.reshape(()).to(device=device, dtype=torch.float32)
        else:
            v = _check_float("dapo_normalizer", dapo_normalizer)
            if v <= 0.0:
                raise ValueError(f"dapo_normalizer must be > 0, got {dapo_normalizer}")
            norm = torch.tensor(v, device=device, dtype=torch.float32)
    return beta, eps_low, eps_high, L, norm


_MASK_DTYPES = (
    (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    + _checks.FLOAT_DTYPES
    + (torch.float64,)
)


def _prep_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as fp32 token weights (what the kernels read), after checking its dtype."""
    _checks.check_tensor("mask", mask)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"mask must have dtype bool, an integer or a float dtype, got {mask.dtype}")
    return mask.to(torch.float32).contiguous()


def _check_token_tensor(name: str, x: object, shape: tuple[int, ...]) -> torch.Tensor:
    _checks.check_tensor(name, x)
    _checks.check_dtype(name, x, _checks.FLOAT_DTYPES)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (the shape of the per-token log-probs), got {tuple(x.shape)}")
    return x


def _stats_dict(stats: torch.Tensor, has_ref: bool) -> dict[str, torch.Tensor]:
    out = {name: stats[i] for i, name in enumerate(STAT_NAMES)}
    if not has_ref:
        del out["kl"]
    return out


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    dapo_normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    rollout_logp: torch.Tensor | None = None,
    is_correction: str = "none",
    is_cap: float = 2.0,
    is_band: tuple[float, float] = (0.5, 5.0),
    is_level: str = "token",
    ratio_level: str = "token",
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPO policy loss: ``sum c_b M l``, ``l = -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta kl``.

    ``r = exp(logp - old_logp)``, ``kl = exp(ref - logp) - (ref - logp) - 1`` (k3), and the aggregation
    ``loss_type`` sets the per-row weight ``c_b`` exactly as TRL's ``GRPOTrainer`` (one process, one
    micro-batch): ``"grpo"`` per-sequence token mean then batch mean; ``"bnpo"`` token mean of the batch;
    ``"dr_grpo"`` sum / (B * max_completion_length); ``"dapo"`` sum / ``dapo_normalizer`` (default: the
    batch's active-token count).

    Args:
        logp: ``(B, T)`` float32 / bfloat16 / float16, the policy's per-token log-probs (differentiable).
        old_logp: ``(B, T)``, the sampling policy's log-probs (``logp.detach()`` on-policy); no gradient.
        advantages: ``(B,)`` float, one per sequence, broadcast over its tokens; no gradient.
        mask: ``(B, T)`` bool / integer / float: 1 on completion tokens, 0 elsewhere (fractional values act as
            token weights, as TRL's multiplication by the mask does). Masked tokens give exactly 0.
        ref_logp: ``(B, T)`` reference-policy log-probs; required when ``beta != 0``. When given, the mean KL
            is reported in the statistics even with ``beta = 0``.
        beta: weight of the k3 KL term, finite and >= 0.
        eps_low, eps_high: clipping range ``[1 - eps_low, 1 + eps_high]``; ``eps_high`` defaults to ``eps_low``
            (DAPO's clip-higher uses 0.28).
        loss_type: ``"grpo" | "bnpo" | "dr_grpo" | "dapo"``.
        max_completion_length: the ``L`` of ``dr_grpo`` (default ``T``); must be >= T.
        dapo_normalizer: ``dapo`` only. TRL divides the masked sum by ``num_items_in_batch / num_processes``
            (the active tokens of the whole generation batch, over all processes and accumulation steps); pass
            that number (or a 0-d tensor, no host sync) to reproduce it under gradient accumulation or DDP.
            No collective is run here. Default: this call's active-token count, TRL's value when nothing is
            accumulated or distributed.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (no compiled kernel: ``cuda`` means the auto order).
        rollout_logp: ``(B, T)`` the rollout engine's log-probs of the sampled tokens (no gradient). With
            ``is_correction`` ``"tis"`` (weight min(rho, is_cap)), ``"mis"`` (rho, 0 above is_cap) or ``"icepop"``
            (rho, 0 outside is_band), rho = exp(old_logp - rollout_logp), the policy-gradient term of each token
            is multiplied by that weight (``is_level="sequence"``: rho of the whole sequence; definitions and
            papers in ``ops/is_correction.py``). ``"none"`` only reports ``is/ratio_mean``.
        ratio_level: ``"token"`` (r per token) or ``"sequence"`` (GSPO: s = exp(masked mean of logp - old_logp)
            per sequence, clipped with eps_low / eps_high, exact gradient; see ``ops/grpo_rl.py``).
        deterministic: batch-invariant mode (None: ``LACOT_BATCH_INVARIANT``): each row's sums and each token's
            gradient (for given row weights c_b) bitwise independent of the other rows and of the padding width.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-d float32 tensor, differentiable with respect to ``logp`` (gradient in
        ``logp``'s dtype); ``stats`` a dict of 0-d float32 tensors with TRL's names: ``"kl"`` (masked mean
        k3 KL, only when ``ref_logp`` is given), ``"clip_ratio/low_mean"``, ``"clip_ratio/high_mean"``,
        ``"clip_ratio/region_mean"`` (masked means of the clipped-token flags, over this call's tokens); with
        ``rollout_logp``: ``"is/ratio_mean"``, and with a correction ``"is/weight_mean"`` and
        ``"is/truncated_frac"`` (tis) or ``"is/masked_frac"`` (mis, icepop).
        Without ``rollout_logp`` and with ``ratio_level="token"`` this is the plain op, bitwise.
    """
    _checks.check_tensor("logp", logp)
    _checks.check_dtype("logp", logp, _checks.FLOAT_DTYPES)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    B, T = logp.shape
    _check_token_tensor("old_logp", old_logp, (B, T))
    if ref_logp is not None:
        _check_token_tensor("ref_logp", ref_logp, (B, T))
    _checks.check_tensor("advantages", advantages)
    _checks.check_dtype("advantages", advantages, _checks.FLOAT_DTYPES + (torch.float64,))
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must have shape (B,) = ({B},), got {tuple(advantages.shape)}")
    m = _prep_mask(mask)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    _checks.check_same_device(
        ("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask), ("ref_logp", ref_logp)
    )
    beta, eps_low, eps_high, L, norm = _check_options(
        B, T, logp.device, ref_logp, beta, eps_low, eps_high, loss_type, max_completion_length, dapo_normalizer
    )
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    from . import batch_invariance, grpo_rl

    det = batch_invariance.enabled(deterministic)
    if rollout_logp is not None or is_correction != "none" or ratio_level != "token" or det:
        return grpo_rl.grpo_loss_rl(
            logp, old_logp, advantages, m, ref_logp, norm, beta, eps_low, eps_high, loss_type, L, backend,
            rollout_logp=rollout_logp, is_correction=is_correction, is_cap=is_cap, is_band=is_band,
            is_level=is_level, ratio_level=ratio_level, deterministic=det,
        )  # fmt: skip
    loss, stats, _ = torch.ops.lacot.grpo_loss(
        logp.contiguous(),
        old_logp.contiguous(),
        advantages.float().contiguous(),
        m,
        ref_logp.contiguous() if ref_logp is not None else None,
        norm,
        beta,
        eps_low,
        eps_high,
        loss_type,
        L,
        backend,
    )
    return loss, _stats_dict(stats, ref_logp is not None)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    dapo_normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    precision: str = "default",
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    sampler_order: str = "vllm",
    rollout_logp: torch.Tensor | None = None,
    is_correction: str = "none",
    is_cap: float = 2.0,
    is_band: tuple[float, float] = (0.5, 5.0),
    is_level: str = "token",
    ratio_level: str = "token",
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`grpo_loss` of ``logp = log_softmax((hidden @ weight.T + bias) / temperature)[targets]``,
    without the N x V logits, with the logits gradient formed in the forward pass (3 GEMMs instead of 4).

    Args:
        hidden: ``(B, T, D)`` float32 / bfloat16 / float16, the last hidden states of the completion positions
            (those that predict ``targets``).
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``.
        targets: ``(B, T)`` int32 / int64 completion token ids, in ``[0, V)`` where ``mask != 0`` (elsewhere any
            value: those tokens are skipped and never read).
        old_logp, ref_logp, advantages, mask, beta, eps_low, eps_high, loss_type, max_completion_length,
        dapo_normalizer, backend: as in :func:`grpo_loss` (``old_logp``/``ref_logp`` computed at the same
            ``temperature``, e.g. with :func:`fused_linear_token_logprobs` under ``torch.no_grad()``).
        bias: optional ``(V,)``, same dtype as ``weight``.
        temperature: finite, > 0; the policy is ``softmax(logits / temperature)`` (TRL divides the logits by
            the sampling temperature).
        precision: ``"default" | "high"``, as in :func:`fused_linear_token_logprobs` (dlogits rounded to the
            input dtype before the dX / dW GEMMs, or carried as a hi + lo pair).
        top_k, top_p, min_p, sampler_order: the rollout sampler's truncation: ``logp`` is then the log-prob
            under the distribution the sampler drew from (see :func:`fused_linear_token_logprobs`); pass
            ``old_logp`` / ``ref_logp`` computed with the same settings.
        rollout_logp, is_correction, is_cap, is_band, is_level, ratio_level, deterministic: as in
            :func:`grpo_loss` (rollout-mismatch weights, GSPO's sequence-level ratio, batch invariance).
            With any of these (or a truncation) set the op runs in two exact passes: the fused log-probs of
            every active token (:func:`fused_linear_token_logprobs`, whole-row tiles), then :func:`grpo_loss`
            on them; the backward recomputes the logits tiles (one GEMM more than the one-pass path, which
            forms the gradient in the forward). GSPO needs this: a token's gradient depends on its whole
            sequence, so no token chunk can be finished alone.

    Returns:
        ``(loss, stats)`` as :func:`grpo_loss`. ``loss`` is differentiable with respect to ``hidden``,
        ``weight`` and ``bias``: their gradients (fp32-accumulated, stored in their dtypes) are computed in the
        forward pass for those that require grad, and only scaled by the incoming gradient in backward. Under
        ``torch.no_grad()`` (or when nothing requires grad) no gradient work is done at all. Tokens with
        ``mask == 0`` cost no matmul work.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _checks.check_tensor(name, t)
    _checks.check_dtype("hidden", hidden, _checks.FLOAT_DTYPES)
    _checks.check_dtype("weight", weight, _checks.FLOAT_DTYPES)
    _checks.check_dtype("targets", targets, _checks.INDEX_DTYPES)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, D), got {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must have shape (V, D) with D = hidden.shape[-1] = {D}, got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
    if tuple(targets.shape) != (B, T):
        raise ValueError(f"targets must have shape (B, T) = {(B, T)}, got {tuple(targets.shape)}")
    _check_token_tensor("old_logp", old_logp, (B, T))
    if ref_logp is not None:
        _check_token_tensor("ref_logp", ref_logp, (B, T))
    _checks.check_tensor("advantages", advantages)
    _checks.check_dtype("advantages", advantages, _checks.FLOAT_DTYPES + (torch.float64,))
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must have shape (B,) = ({B},), got {tuple(advantages.shape)}")
    m = _prep_mask(mask)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    _checks.check_same_device(
        ("hidden", hidden),
        ("weight", weight),
        ("bias", bias),
        ("targets", targets),
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        ("ref_logp", ref_logp),
    )
    temperature = _checks.check_temperature(temperature)
    beta, eps_low, eps_high, L, norm = _check_options(
        B, T, hidden.device, ref_logp, beta, eps_low, eps_high, loss_type, max_completion_length, dapo_normalizer
    )
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    if precision not in _lm.PRECISIONS:
        raise ValueError(f"precision must be one of {_lm.PRECISIONS}, got {precision!r}")
    from . import batch_invariance, sampler_truncation

    sampler_truncation.check_sampler_args(top_k, top_p, min_p, sampler_order)
    det = batch_invariance.enabled(deterministic)
    two_pass = (
        sampler_truncation.is_truncating(top_k, top_p, min_p)
        or rollout_logp is not None
        or is_correction != "none"
        or ratio_level != "token"
        or det
    )
    if two_pass:
        # Pass 1: log-probs of the active tokens (masked ones get an id no target can equal: never read, 0).
        y = torch.where(m != 0, targets.to(torch.int64), _NO_IGNORE)
        _checks.check_active_targets_in_range(targets, m != 0, V)
        logp = _fl.fused_linear_token_logprobs(
            hidden, weight, y, bias=bias, temperature=temperature, ignore_index=_NO_IGNORE, backend=backend,
            precision=precision, top_k=top_k, top_p=top_p, min_p=min_p, sampler_order=sampler_order,
            deterministic=det,
        )  # fmt: skip
        # Pass 2: the loss on them (its backward gives dloss/dlogp, which pass 1's backward takes to dX, dW).
        return grpo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, beta=beta, eps_low=eps_low, eps_high=eps_high,
            loss_type=loss_type, max_completion_length=max_completion_length, dapo_normalizer=dapo_normalizer,
            backend=backend, rollout_logp=rollout_logp, is_correction=is_correction, is_cap=is_cap,
            is_band=is_band, is_level=is_level, ratio_level=ratio_level, deterministic=det,
        )  # fmt: skip

    grad_on = torch.is_grad_enabled()
    needs = [
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    ]
    loss, stats, _gh, _gw, _gb = torch.ops.lacot.fused_linear_grpo_loss(
        hidden.reshape(B * T, D).contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        targets.reshape(-1).to(torch.int64).contiguous(),
        old_logp.reshape(-1).contiguous(),
        advantages.float().contiguous(),
        m.reshape(-1),
        ref_logp.reshape(-1).contiguous() if ref_logp is not None else None,
        norm,
        temperature,
        beta,
        eps_low,
        eps_high,
        loss_type,
        L,
        needs,
        backend,
        precision,
    )
    return loss, _stats_dict(stats, ref_logp is not None)
