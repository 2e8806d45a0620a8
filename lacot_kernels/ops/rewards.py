"""Rewards of multi-rationale RL / VI steps: GRPO group advantages and LaCoT's sparse-reward interpolation.

    group_advantages:    A_i = (r_i - mean_g(i)) / (std + eps)      (std of the group, of the batch, or none)
    interpolate_rewards: out_s = v_a + (s - a) / (a' - a) (v_a' - v_a)  for consecutive anchors a <= s <= a'
    reward_anchors:      the anchor mask LaCoT scores exactly (state 0, every `stride` states, the last state)

Read top to bottom: Triton kernels -> launchers -> pure-torch backends -> the registered ops (implementation,
fake, autograd) -> the typed public functions.

Group advantages follow TRL (``scale_rewards`` "group" / "batch" / "none", unbiased std, eps 1e-4): NaN rewards
are left out of every mean and std and get advantage 0 (TRL's nanmean / nanstd); a std over fewer than two
rewards is 0, so a group of size 1 and a group of equal rewards both give exactly 0 (never NaN). Means and
variances are two-pass (the centred sum of squares), so rewards of 1e4 +- 1e-2 keep their relative order. The
gradient (rewards can come from a differentiable reward model) is
    dA/dr: (g_j - mean_g(g)) / d - P c_j / (d^2 k std),   c = r - mean, d = std + eps, k = n - 1 (or n),
with P = sum_g g_i c_i over the group ("group") or the batch ("batch"), and 0 where std = 0 (a subgradient).

Interpolation: each row's anchors are listed in order (a prefix count, then a scatter of their positions), so
every position finds its bracketing anchors a = list[rank - 1], a' = list[rank] by two gathers, with no
dependence on how far apart anchors are. The gradient sends (1 - w_s) g_s to a and w_s g_s to a'; the per-gap
sums are segmented scans (exact sums, no difference of prefix sums).
"""

from __future__ import annotations

import math

import torch

from .. import _checks, _registry
from ._triton_utils import INTERPRET, jit, next_pow2, tl, triton

SCALES = ("group", "batch", "none")
_SCALE_CODE = {"group": 0, "batch": 1, "none": 2}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NATIVE_ADV = "group_advantages_fwd_native"
NATIVE_INTERP = "interpolate_rewards_fwd_native"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: group advantages. A program owns a tile of BLOCK_R groups x BLOCK_C columns and walks longer
# groups in column chunks (a second and third pass re-read them from L1/L2).
# ----------------------------------------------------------------------------------------------------------------
@jit
def _tile(ptr, rows, row_ok, c0, G, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_C)
    m = row_ok[:, None] & (cols < G)[None, :]
    x = tl.load(ptr + rows[:, None] * G + cols[None, :], mask=m, other=float("nan")).to(ACC)
    return x, cols, m


@jit
def _group_mean(r_ptr, rows, row_ok, G, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    s = tl.zeros([BLOCK_R], ACC)
    cnt = tl.zeros([BLOCK_R], ACC)
    lo = tl.zeros([BLOCK_R], ACC) + float("inf")
    hi = tl.zeros([BLOCK_R], ACC) - float("inf")
    for c0 in range(0, G, BLOCK_C):
        x, _, _ = _tile(r_ptr, rows, row_ok, c0, G, ACC, BLOCK_C)
        ok = x == x  # NaN rewards (and the masked lanes, loaded as NaN) are left out
        s += tl.sum(tl.where(ok, x, 0.0), 1)
        cnt += tl.sum(tl.where(ok, 1.0, 0.0), 1)
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), 1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, -float("inf")), 1))
    return _clamp_mean(s / tl.maximum(cnt, 1.0), cnt, lo, hi), cnt


@jit
def _clamp_mean(mean, cnt, lo, hi):
    # The rounded mean is kept inside [min, max] of the values it averages, as the exact mean is: a group of
    # equal rewards then has mean exactly their value, hence advantages exactly 0 (not rounding noise / std).
    return tl.where(cnt > 0.0, tl.minimum(tl.maximum(mean, lo), hi), mean)


@jit
def _group_m2(r_ptr, rows, row_ok, mean, G, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    m2 = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, G, BLOCK_C):
        x, _, _ = _tile(r_ptr, rows, row_ok, c0, G, ACC, BLOCK_C)
        c = tl.where(x == x, x - mean[:, None], 0.0)
        m2 += tl.sum(c * c, 1)
    return m2


@jit
def _std(m2, cnt, UNBIASED: tl.constexpr):
    k = cnt - 1.0 if UNBIASED else cnt
    return tl.where(k > 0.0, tl.sqrt(m2 / tl.maximum(k, 1.0)), 0.0), tl.maximum(k, 1.0)


@jit
def _batch_moments(r_ptr, n_groups, G, ACC: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
    # Mean, std and k of every reward of the batch (two passes over it, tile by tile).
    s = tl.sum(tl.zeros([BLOCK_R], ACC), 0)
    cnt = s
    lo = s + float("inf")
    hi = s - float("inf")
    for g0 in range(0, n_groups, BLOCK_R):
        rows = g0 + tl.arange(0, BLOCK_R)
        gm, gc = _group_mean(r_ptr, rows, rows < n_groups, G, ACC, BLOCK_R, BLOCK_C)
        s += tl.sum(gm * gc, 0)
        cnt += tl.sum(gc, 0)
        # The batch mean is a weighted mean of the group means: it lies in [min, max] of them.
        lo = tl.minimum(lo, tl.min(tl.where(gc > 0.0, gm, float("inf")), 0))
        hi = tl.maximum(hi, tl.max(tl.where(gc > 0.0, gm, -float("inf")), 0))
    mean = _clamp_mean(s / tl.maximum(cnt, 1.0), cnt, lo, hi)
    m2 = tl.sum(tl.zeros([BLOCK_R], ACC), 0)
    for g0 in range(0, n_groups, BLOCK_R):
        rows = g0 + tl.arange(0, BLOCK_R)
        m2 += tl.sum(_group_m2(r_ptr, rows, rows < n_groups, mean + tl.zeros([BLOCK_R], ACC), G, ACC, BLOCK_R,
                               BLOCK_C), 0)  # fmt: skip
    std, k = _std(m2, cnt, UNBIASED)
    return mean, std, k


@jit
def _group_adv_fwd_kernel(
    r_ptr, out_ptr, n_groups, G, eps,
    SCALE: tl.constexpr, UNBIASED: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # SCALE 0 = group, 1 = batch (launched as ONE program: the batch std needs every reward), 2 = none.
    pid = tl.program_id(0)
    if SCALE == 1:
        _, b_std, _ = _batch_moments(r_ptr, n_groups, G, ACC, UNBIASED, BLOCK_R, BLOCK_C)
        g_first = 0
        g_step = BLOCK_R
        g_end = n_groups
    else:
        g_first = pid * BLOCK_R
        g_step = BLOCK_R
        g_end = g_first + 1
    for g0 in range(g_first, g_end, g_step):
        rows = g0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_groups
        mean, cnt = _group_mean(r_ptr, rows, row_ok, G, ACC, BLOCK_R, BLOCK_C)
        if SCALE == 0:
            std, _ = _std(_group_m2(r_ptr, rows, row_ok, mean, G, ACC, BLOCK_R, BLOCK_C), cnt, UNBIASED)
            d = std + eps
        elif SCALE == 1:
            d = b_std + eps + tl.zeros([BLOCK_R], ACC)
        else:
            d = tl.zeros([BLOCK_R], ACC) + 1.0
        inv = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)  # d = 0 (eps = 0, equal rewards): A = 0
        for c0 in range(0, G, BLOCK_C):
            x, cols, m = _tile(r_ptr, rows, row_ok, c0, G, ACC, BLOCK_C)
            a = tl.where(x == x, (x - mean[:, None]) * inv[:, None], 0.0)
            tl.store(out_ptr + rows[:, None] * G + cols[None, :], a, mask=m)


@jit
def _group_adv_bwd_kernel(
    g_ptr, r_ptr, out_ptr, n_groups, G, eps,
    SCALE: tl.constexpr, UNBIASED: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if SCALE == 1:
        b_mean, b_std, b_k = _batch_moments(r_ptr, n_groups, G, ACC, UNBIASED, BLOCK_R, BLOCK_C)
        # P = sum over the batch of g_i (r_i - mean of i's group).
        p_tot = tl.sum(tl.zeros([BLOCK_R], ACC), 0)
        for g0 in range(0, n_groups, BLOCK_R):
            rows = g0 + tl.arange(0, BLOCK_R)
            row_ok = rows < n_groups
            mean, _ = _group_mean(r_ptr, rows, row_ok, G, ACC, BLOCK_R, BLOCK_C)
            for c0 in range(0, G, BLOCK_C):
                x, cols, m = _tile(r_ptr, rows, row_ok, c0, G, ACC, BLOCK_C)
                gg = tl.load(g_ptr + rows[:, None] * G + cols[None, :], mask=m, other=0.0).to(ACC)
                p_tot += tl.sum(tl.sum(tl.where(x == x, gg * (x - mean[:, None]), 0.0), 1), 0)
        g_first = 0
        g_end = n_groups
    else:
        g_first = pid * BLOCK_R
        g_end = g_first + 1
    for g0 in range(g_first, g_end, BLOCK_R):
        rows = g0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_groups
        mean, cnt = _group_mean(r_ptr, rows, row_ok, G, ACC, BLOCK_R, BLOCK_C)
        # Group sums of g and of g * c.
        sg = tl.zeros([BLOCK_R], ACC)
        sgc = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, G, BLOCK_C):
            x, cols, m = _tile(r_ptr, rows, row_ok, c0, G, ACC, BLOCK_C)
            ok = x == x
            gg = tl.where(ok, tl.load(g_ptr + rows[:, None] * G + cols[None, :], mask=m, other=0.0).to(ACC), 0.0)
            sg += tl.sum(gg, 1)
            sgc += tl.sum(tl.where(ok, gg * (x - mean[:, None]), 0.0), 1)
        g_bar = sg / tl.maximum(cnt, 1.0)
        if SCALE == 0:
            std, k = _std(_group_m2(r_ptr, rows, row_ok, mean, G, ACC, BLOCK_R, BLOCK_C), cnt, UNBIASED)
            d = std + eps
            p = sgc
            ref = mean
        elif SCALE == 1:
            std = b_std + tl.zeros([BLOCK_R], ACC)
            k = b_k + tl.zeros([BLOCK_R], ACC)
            d = std + eps
            p = p_tot + tl.zeros([BLOCK_R], ACC)
            ref = b_mean + tl.zeros([BLOCK_R], ACC)
        else:
            std = tl.zeros([BLOCK_R], ACC)
            k = std + 1.0
            d = std + 1.0
            p = std
            ref = mean
        inv = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)
        # Coefficient of (r_j - ref) in the std term; 0 where the std is 0 (its subgradient) or d = 0.
        coef = tl.where((std > 0.0) & (d > 0.0), p * inv * inv / (k * tl.where(std > 0.0, std, 1.0)), 0.0)
        for c0 in range(0, G, BLOCK_C):
            x, cols, m = _tile(r_ptr, rows, row_ok, c0, G, ACC, BLOCK_C)
            gg = tl.load(g_ptr + rows[:, None] * G + cols[None, :], mask=m, other=0.0).to(ACC)
            gr = (gg - g_bar[:, None]) * inv[:, None] - coef[:, None] * (x - ref[:, None])
            gr = tl.where(x == x, gr, 0.0)
            tl.store(out_ptr + rows[:, None] * G + cols[None, :], gr.to(out_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: interpolation (one program per row, BLOCK positions at a time)
# ----------------------------------------------------------------------------------------------------------------
@jit
def _anchor_list(mask_ptr, list_ptr, S, BLOCK: tl.constexpr):
    # list[k] = position of the k-th anchor of the row; returns the number of anchors.
    lane = tl.arange(0, BLOCK)
    total = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    for c0 in range(0, S, BLOCK):
        s = c0 + lane
        a = tl.load(mask_ptr + s, mask=s < S, other=0).to(tl.int32)
        rank = tl.cumsum(a, 0) + total
        tl.store(list_ptr + rank - 1, s, mask=a != 0)
        total += tl.sum(a, 0)
    return total


@jit
def _brackets(mask_ptr, list_ptr, s, in_row, total, carry, ACC: tl.constexpr):
    # For each position: is it an anchor, its bracketing anchors p <= s <= q, whether both exist (and differ
    # from s), and w = (s - p) / (q - p). `carry` = number of anchors before this chunk.
    a = tl.load(mask_ptr + s, mask=in_row, other=0).to(tl.int32)
    rank = tl.cumsum(a, 0) + carry  # anchors at positions <= s
    inside = in_row & (a == 0) & (rank >= 1) & (rank < total)
    p = tl.load(list_ptr + rank - 1, mask=inside, other=0)
    q = tl.load(list_ptr + rank, mask=inside, other=1)
    w = (s - p).to(ACC) / tl.where(inside, q - p, 1).to(ACC)
    return a != 0, inside, p, q, w, rank


@jit
def _interp_fwd_kernel(v_ptr, mask_ptr, list_ptr, out_ptr, S, s_v, s_m, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    v_row = v_ptr + b * s_v
    m_row = mask_ptr + b * s_m
    l_row = list_ptr + b * S
    total = _anchor_list(m_row, l_row, S, BLOCK)
    tl.debug_barrier()  # the list was scattered by every thread of the program
    lane = tl.arange(0, BLOCK)
    carry = total * 0
    for c0 in range(0, S, BLOCK):
        s = c0 + lane
        in_row = s < S
        is_a, inside, p, q, w, rank = _brackets(m_row, l_row, s, in_row, total, carry, ACC)
        vp = tl.load(v_row + p, mask=inside, other=0.0).to(ACC)
        vq = tl.load(v_row + q, mask=inside, other=0.0).to(ACC)
        vs = tl.load(v_row + s, mask=in_row & is_a, other=0.0).to(ACC)  # non-anchor values are never read
        out = tl.where(is_a, vs, tl.where(inside, vp + w * (vq - vp), 0.0))
        tl.store(out_ptr + b * S + s, out, mask=in_row)
        carry += tl.sum(is_a.to(tl.int32), 0)


@jit
def _segsum_combine(xa, ya, fa, xb, yb, fb):
    # Segmented sum: a flag starts a new segment at b.
    keep = fb == 0
    return tl.where(keep, xa + xb, xb), tl.where(keep, ya + yb, yb), fa | fb


@jit
def _interp_bwd_kernel(g_ptr, mask_ptr, list_ptr, tmp_ptr, out_ptr, S, s_m, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    m_row = mask_ptr + b * s_m
    l_row = list_ptr + b * S
    g_row = g_ptr + b * S
    total = _anchor_list(m_row, l_row, S, BLOCK)
    tl.debug_barrier()
    lane = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], ACC)
    carry = total * 0
    cx = tl.sum(zero, 0)
    cy = cx
    # Pass A: segments run from just after an anchor up to and including the next anchor, so the segmented
    # sums read at an anchor are the sums over the gap that ends there: X = sum w g (goes to this anchor) and
    # Y = sum (1 - w) g (goes to the anchor that opens the gap, list[rank - 2]).
    for c0 in range(0, S, BLOCK):
        s = c0 + lane
        in_row = s < S
        is_a, inside, p, q, w, rank = _brackets(m_row, l_row, s, in_row, total, carry, ACC)
        g = tl.load(g_row + s, mask=in_row, other=0.0).to(ACC)
        x = tl.where(inside, w * g, 0.0)
        y = tl.where(inside, (1.0 - w) * g, 0.0)
        starts = tl.load(m_row + s - 1, mask=in_row & (s >= 1), other=0).to(tl.int32)
        sx, sy, sf = tl.associative_scan((x, y, starts), 0, _segsum_combine)
        cont = sf == 0  # still in the segment that was open at the end of the previous chunk
        sx = tl.where(cont, sx + cx, sx)
        sy = tl.where(cont, sy + cy, sy)
        tl.store(out_ptr + b * S + s, tl.where(is_a, g + sx, 0.0), mask=in_row)
        opener = tl.load(l_row + rank - 2, mask=is_a & (rank >= 2), other=0)
        tl.store(tmp_ptr + b * S + opener, sy, mask=is_a & (rank >= 2))
        last = BLOCK - 1
        cx = tl.sum(tl.where(lane == last, sx, 0.0), 0)
        cy = tl.sum(tl.where(lane == last, sy, 0.0), 0)
        carry += tl.sum(is_a.to(tl.int32), 0)
    tl.debug_barrier()
    # Pass B: every anchor that opens a gap adds the Y of that gap.
    carry = total * 0
    for c0 in range(0, S, BLOCK):
        s = c0 + lane
        in_row = s < S
        a = tl.load(m_row + s, mask=in_row, other=0).to(tl.int32)
        rank = tl.cumsum(a, 0) + carry
        opens = (a != 0) & (rank < total)
        cur = tl.load(out_ptr + b * S + s, mask=opens, other=0.0)
        add = tl.load(tmp_ptr + b * S + s, mask=opens, other=0.0)
        tl.store(out_ptr + b * S + s, cur + add, mask=opens)
        carry += tl.sum(a, 0)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _adv_blocks(n_groups: int, G: int) -> tuple[int, int, int]:
    # Interpreter: big tiles (its cost grows with loop iterations). GPU: up to 4096 rewards per tile, 4 warps.
    cap_c, tile = (4096, 1 << 16) if INTERPRET else (1024, 4096)
    block_c = min(next_pow2(G), cap_c)
    block_r = max(1, min(next_pow2(n_groups), tile // block_c))
    return block_r, block_c, 1 if INTERPRET else 4


def _group_adv_fwd_triton(rewards, group_size, scale, eps, unbiased):
    N = rewards.numel()
    out = torch.empty(N, device=rewards.device, dtype=_acc_dtype(rewards.dtype))
    if N == 0:
        return out
    n_groups = N // group_size
    block_r, block_c, warps = _adv_blocks(n_groups, group_size)
    code = _SCALE_CODE[scale]
    grid = (1,) if code == 1 else (triton.cdiv(n_groups, block_r),)
    _group_adv_fwd_kernel[grid](
        rewards, out, n_groups, group_size, eps,
        SCALE=code, UNBIASED=unbiased, ACC=_tl_acc(rewards.dtype), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
    return out


def _group_adv_bwd_triton(grad, rewards, group_size, scale, eps, unbiased):
    N = rewards.numel()
    out = torch.empty(N, device=rewards.device, dtype=rewards.dtype)
    if N == 0:
        return out
    n_groups = N // group_size
    block_r, block_c, warps = _adv_blocks(n_groups, group_size)
    code = _SCALE_CODE[scale]
    grid = (1,) if code == 1 else (triton.cdiv(n_groups, block_r),)
    _group_adv_bwd_kernel[grid](
        grad, rewards, out, n_groups, group_size, eps,
        SCALE=code, UNBIASED=unbiased, ACC=_tl_acc(rewards.dtype), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
    return out


def _interp_block(S: int) -> tuple[int, int]:
    return (min(next_pow2(max(S, 16)), 4096), 1) if INTERPRET else (min(next_pow2(max(S, 128)), 1024), 4)


def _interp_fwd_triton(values, anchor_mask):
    B, S = values.shape
    out = torch.empty(B, S, device=values.device, dtype=_acc_dtype(values.dtype))
    if B * S == 0:
        return out
    lst = torch.empty(B, S, device=values.device, dtype=torch.int32)
    block, warps = _interp_block(S)
    _interp_fwd_kernel[(B,)](
        values, anchor_mask, lst, out, S, values.stride(0), anchor_mask.stride(0),
        ACC=_tl_acc(values.dtype), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out


def _interp_bwd_triton(grad, anchor_mask):
    B, S = grad.shape
    out = torch.empty(B, S, device=grad.device, dtype=grad.dtype)
    if B * S == 0:
        return out
    lst = torch.empty(B, S, device=grad.device, dtype=torch.int32)
    tmp = torch.empty(B, S, device=grad.device, dtype=grad.dtype)
    block, warps = _interp_block(S)
    _interp_bwd_kernel[(B,)](
        grad, anchor_mask, lst, tmp, out, S, anchor_mask.stride(0),
        ACC=_tl_acc(grad.dtype), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# Pure-torch backends (same math, vectorized; the "batch" std needs no loop)
# ----------------------------------------------------------------------------------------------------------------
def _moments_torch(x: torch.Tensor, unbiased: bool, dim: int):
    ok = ~torch.isnan(x)
    cnt = ok.sum(dim, keepdim=True).to(x.dtype)
    mean = torch.where(ok, x, 0.0).sum(dim, keepdim=True) / cnt.clamp(min=1.0)
    # Kept inside [min, max] of the values, as the exact mean is: equal rewards give a mean of exactly their value.
    lo = torch.where(ok, x, float("inf")).amin(dim, keepdim=True)
    hi = torch.where(ok, x, -float("inf")).amax(dim, keepdim=True)
    mean = torch.where(cnt > 0, torch.minimum(torch.maximum(mean, lo), hi), mean)
    c = torch.where(ok, x - mean, 0.0)
    k = cnt - 1.0 if unbiased else cnt
    std = torch.where(k > 0, ((c * c).sum(dim, keepdim=True) / k.clamp(min=1.0)).sqrt(), 0.0)
    return ok, mean, c, std, k.clamp(min=1.0)


def _denominator(x, scale, eps, unbiased, c_std):
    if scale == "group":
        return c_std + eps
    if scale == "batch":
        _, _, _, b_std, _ = _moments_torch(x.reshape(-1), unbiased, 0)
        return b_std + eps
    return torch.ones_like(c_std)


def _group_adv_fwd_torch(rewards, group_size, scale, eps, unbiased):
    acc = _acc_dtype(rewards.dtype)
    if rewards.numel() == 0:
        return torch.empty(0, device=rewards.device, dtype=acc)
    x = rewards.to(acc).reshape(-1, group_size)
    ok, _, c, std, _ = _moments_torch(x, unbiased, 1)
    d = _denominator(x, scale, eps, unbiased, std)
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    return torch.where(ok, c * inv, 0.0).reshape(-1)


def _group_adv_bwd_torch(grad, rewards, group_size, scale, eps, unbiased):
    acc = _acc_dtype(rewards.dtype)
    if rewards.numel() == 0:
        return torch.empty(0, device=rewards.device, dtype=rewards.dtype)
    x = rewards.to(acc).reshape(-1, group_size)
    g = grad.to(acc).reshape(-1, group_size)
    ok, _, c, std, k = _moments_torch(x, unbiased, 1)
    g = torch.where(ok, g, 0.0)
    g_bar = g.sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    if scale == "group":
        d, p, ref_c = std + eps, (g * c).sum(1, keepdim=True), c
    elif scale == "batch":
        _, _, cb, b_std, b_k = _moments_torch(x.reshape(-1), unbiased, 0)
        std, k = b_std, b_k
        d, p, ref_c = b_std + eps, (g * c).sum(), cb.reshape(x.shape)
    else:
        std = torch.zeros_like(std)
        d, p, ref_c = torch.ones_like(std), torch.zeros_like(std), c
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    coef = torch.where((std > 0) & (d > 0), p * inv * inv / (k * torch.where(std > 0, std, 1.0)), 0.0)
    out = torch.where(ok, (g - g_bar) * inv - coef * ref_c, 0.0)
    return out.reshape(-1).to(rewards.dtype)


def _interp_brackets_torch(anchor_mask: torch.Tensor):
    """Per position: the previous-or-equal anchor p and the next-or-equal anchor q (or -1 / S when absent)."""
    B, S = anchor_mask.shape
    pos = torch.arange(S, device=anchor_mask.device).expand(B, S)
    p = torch.where(anchor_mask, pos, -1).cummax(1).values
    q = torch.where(anchor_mask, pos, S).flip(1).cummin(1).values.flip(1)
    inside = (~anchor_mask) & (p >= 0) & (q < S)
    return p, q, inside, pos


def _interp_fwd_torch(values, anchor_mask):
    acc = _acc_dtype(values.dtype)
    v = values.to(acc)
    p, q, inside, pos = _interp_brackets_torch(anchor_mask)
    vp = v.gather(1, p.clamp(min=0))
    vq = v.gather(1, q.clamp(max=max(values.shape[1] - 1, 0)))
    w = (pos - p).to(acc) / torch.where(inside, q - p, 1).to(acc)
    lerp = torch.where(inside, vp + w * (vq - vp), 0.0)
    return torch.where(anchor_mask, v, lerp)


def _interp_bwd_torch(grad, anchor_mask):
    B, S = grad.shape
    g = grad
    p, q, inside, pos = _interp_brackets_torch(anchor_mask)
    w = (pos - p).to(g.dtype) / torch.where(inside, q - p, 1).to(g.dtype)
    out = torch.where(anchor_mask, g, 0.0)
    # Deterministic scatter: each inside position adds to exactly two anchors (index_add on CPU is sequential).
    out = out.scatter_add(1, torch.where(inside, p, 0), torch.where(inside, (1.0 - w) * g, 0.0))
    out = out.scatter_add(1, torch.where(inside, q, 0), torch.where(inside, w * g, 0.0))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Backend tables
# ----------------------------------------------------------------------------------------------------------------
def _adv_fwd_native(rewards, group_size, scale, eps, unbiased):
    return torch.ops.lacot.group_advantages_fwd_native(rewards, group_size, _SCALE_CODE[scale], eps, unbiased)


def _adv_bwd_native(grad, rewards, group_size, scale, eps, unbiased):
    return torch.ops.lacot.group_advantages_bwd_native(grad, rewards, group_size, _SCALE_CODE[scale], eps, unbiased)


ADV_FWD = {"cuda": _adv_fwd_native, "triton": _group_adv_fwd_triton, "torch": _group_adv_fwd_torch}
ADV_BWD = {"cuda": _adv_bwd_native, "triton": _group_adv_bwd_triton, "torch": _group_adv_bwd_torch}
INTERP_FWD = {
    "cuda": lambda v, m: torch.ops.lacot.interpolate_rewards_fwd_native(v, m),
    "triton": _interp_fwd_triton,
    "torch": _interp_fwd_torch,
}
INTERP_BWD = {
    "cuda": lambda g, m: torch.ops.lacot.interpolate_rewards_bwd_native(g, m),
    "triton": _interp_bwd_triton,
    "torch": _interp_bwd_torch,
}


# ----------------------------------------------------------------------------------------------------------------
# Registered ops: lacot::group_advantages, lacot::interpolate_rewards (+ backward ops), fakes, autograd
# ----------------------------------------------------------------------------------------------------------------
def _poison_infinite(out, rewards, group_size, scale):
    """An infinite reward makes its group's results NaN ("batch": every result, since the batch std sees it).

    Left to IEEE arithmetic, inf - inf inside the (compensated, or plain) sums gives NaN or +-inf or 0 depending
    on the summation order of each backend; this makes the answer one and the same. Three small elementwise /
    reduction launches, no host sync."""
    if rewards.numel() == 0:
        return out
    inf = torch.isinf(rewards)
    if scale == "batch":
        bad = inf.any().expand(rewards.shape)
    else:
        bad = inf.view(-1, group_size).any(1, keepdim=True).expand(-1, group_size).reshape(rewards.shape)
    return torch.where(bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


@torch.library.register_kernel("lacot::group_advantages", ("cpu", "cuda"))
def _group_advantages_impl(rewards, group_size, scale, eps, unbiased, backend):
    name = _registry.resolve_backend(backend, rewards.device, native_op=NATIVE_ADV)
    return _poison_infinite(ADV_FWD[name](rewards, group_size, scale, eps, unbiased), rewards, group_size, scale)


@torch.library.register_fake("lacot::group_advantages")
def _group_advantages_fake(rewards, group_size, scale, eps, unbiased, backend):
    return rewards.new_empty(rewards.shape, dtype=_acc_dtype(rewards.dtype))


@torch.library.register_kernel("lacot::group_advantages_backward", ("cpu", "cuda"))
def _group_advantages_backward_impl(grad, rewards, group_size, scale, eps, unbiased, backend):
    name = _registry.resolve_backend(backend, rewards.device, native_op=NATIVE_ADV)
    return _poison_infinite(ADV_BWD[name](grad, rewards, group_size, scale, eps, unbiased), rewards, group_size, scale)


@torch.library.register_fake("lacot::group_advantages_backward")
def _group_advantages_backward_fake(grad, rewards, group_size, scale, eps, unbiased, backend):
    return torch.empty_like(rewards)


def _adv_setup_context(ctx, inputs, output):
    rewards, group_size, scale, eps, unbiased, backend = inputs
    ctx.save_for_backward(rewards)
    ctx.args = (group_size, scale, eps, unbiased, backend)


def _adv_backward(ctx, grad):
    (rewards,) = ctx.saved_tensors
    group_size, scale, eps, unbiased, backend = ctx.args
    g = torch.ops.lacot.group_advantages_backward(
        grad.to(_acc_dtype(rewards.dtype)).contiguous(), rewards, group_size, scale, eps, unbiased, backend
    )
    return g, None, None, None, None, None


torch.library.register_autograd("lacot::group_advantages", _adv_backward, setup_context=_adv_setup_context)


@torch.library.register_kernel("lacot::interpolate_rewards", ("cpu", "cuda"))
def _interpolate_rewards_impl(values, anchor_mask, backend):
    name = _registry.resolve_backend(backend, values.device, native_op=NATIVE_INTERP)
    return INTERP_FWD[name](values, anchor_mask)


@torch.library.register_fake("lacot::interpolate_rewards")
def _interpolate_rewards_fake(values, anchor_mask, backend):
    return values.new_empty(values.shape, dtype=_acc_dtype(values.dtype))


@torch.library.register_kernel("lacot::interpolate_rewards_backward", ("cpu", "cuda"))
def _interpolate_rewards_backward_impl(grad, anchor_mask, backend):
    name = _registry.resolve_backend(backend, grad.device, native_op=NATIVE_INTERP)
    return INTERP_BWD[name](grad, anchor_mask)


@torch.library.register_fake("lacot::interpolate_rewards_backward")
def _interpolate_rewards_backward_fake(grad, anchor_mask, backend):
    return torch.empty_like(grad)


def _interp_setup_context(ctx, inputs, output):
    values, anchor_mask, backend = inputs
    ctx.save_for_backward(anchor_mask)
    ctx.args = (values.dtype, backend)


def _interp_backward(ctx, grad):
    (anchor_mask,) = ctx.saved_tensors
    dtype, backend = ctx.args
    g = torch.ops.lacot.interpolate_rewards_backward(grad.to(_acc_dtype(dtype)).contiguous(), anchor_mask, backend)
    return g.to(dtype), None, None


torch.library.register_autograd("lacot::interpolate_rewards", _interp_backward, setup_context=_interp_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    unbiased: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO advantages ``(r - mean_g) / (std + eps)`` over contiguous groups of ``group_size`` rewards (TRL).

    Args:
        rewards: ``(B * G,)`` (groups contiguous) or ``(B, G)`` (one group per row, ``G == group_size``);
            float32 / bfloat16 / float16 / float64. NaN marks a missing reward: it is left out of the group's
            mean and std (and of the batch std) and its advantage is 0.
        group_size: ``G >= 1``; must divide the number of rewards.
        scale: ``"group"``: std of the group (TRL's default); ``"batch"``: std of every reward of the batch,
            the mean staying per group (TRL's ``scale_rewards="batch"``); ``"none"``: no division (Dr. GRPO).
        eps: finite, ``>= 0``, added to the std (TRL 1e-4, verl 1e-6).
        unbiased: Bessel's correction (``n - 1``), as TRL and verl. A std over fewer than two rewards is 0.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``auto`` honours ``LACOT_BACKEND``).

    Returns:
        advantages with the shape of ``rewards``, float32 (float64 for float64 rewards). A group of equal
        rewards, a group of size 1 and a zero denominator (``eps=0``) give exactly 0. An infinite reward makes
        its group's advantages NaN (every advantage with ``scale="batch"``). Differentiable with
        respect to ``rewards`` (the std's subgradient at 0 is taken as 0). One kernel launch (plus an isinf check), no host sync
        (``"batch"`` runs as a single program, since every advantage needs the batch std).
    """
    _checks.check_tensor("rewards", rewards)
    _checks.check_dtype("rewards", rewards, _FLOAT_DTYPES)
    group_size = _checks.check_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be 1-D (B * G,) or 2-D (B, G), got shape {tuple(rewards.shape)}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(
            f"rewards of shape (B, G) = {tuple(rewards.shape)} hold one group per row, so group_size must be "
            f"{rewards.shape[1]}, got {group_size} (pass a flat (B * G,) tensor for another grouping)"
        )
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of rewards: {rewards.numel()} rewards are not a whole number of "
            f"groups of {group_size}"
        )
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    eps = _checks.check_float("eps", eps, low=0)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    flat = rewards.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    adv = torch.ops.lacot.group_advantages(flat, group_size, scale, eps, unbiased, backend)
    return adv.view(rewards.shape)


def interpolate_rewards(values: torch.Tensor, anchor_mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Linear interpolation between consecutive anchors of each row (LaCoT Eq. 4).

    For consecutive anchors ``a < a'`` of a row and ``a <= s <= a'``:
    ``out_s = v_a + (s - a) / (a' - a) * (v_a' - v_a)``; anchors keep their value; positions before the first or
    after the last anchor of a row are 0 (a row with one anchor keeps only that value, a row without any is 0).

    Args:
        values: ``(..., S)`` float32 / bfloat16 / float16 / float64; only the values at anchors are read (the
            others may hold anything, NaN included).
        anchor_mask: ``(..., S)`` bool, True at the positions whose value is exact (e.g. :func:`reward_anchors`).
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``auto`` honours ``LACOT_BACKEND``).

    Returns:
        ``(..., S)`` float32 (float64 for float64 values), differentiable with respect to ``values`` (only the
        anchors receive gradient; the gradient has the dtype of ``values``).
    """
    _checks.check_tensor("values", values)
    _checks.check_tensor("anchor_mask", anchor_mask)
    _checks.check_dtype("values", values, _FLOAT_DTYPES)
    _checks.check_dtype("anchor_mask", anchor_mask, (torch.bool,))
    _checks.check_same_device(("values", values), ("anchor_mask", anchor_mask))
    if values.dim() < 1:
        raise ValueError(f"values must have at least 1 dimension (..., S), got shape {tuple(values.shape)}")
    if tuple(anchor_mask.shape) != tuple(values.shape):
        raise ValueError(
            f"anchor_mask must have the shape of values {tuple(values.shape)}, got {tuple(anchor_mask.shape)}"
        )
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    S = values.shape[-1]
    # Explicit row count: with S = 0 a reshape to (-1, 0) is ambiguous.
    rows = values.numel() // S if S else math.prod(values.shape[:-1])
    v = values.reshape(rows, S)
    m = anchor_mask.reshape(rows, S)
    v = _checks.unit_stride_rows(v)
    m = _checks.unit_stride_rows(m)
    return torch.ops.lacot.interpolate_rewards(v, m, backend).view(values.shape)


def reward_anchors(lengths: torch.Tensor, stride: int, *, min_len: int = 0, max_len: int) -> torch.Tensor:
    """The states LaCoT scores exactly: ``(B,)`` lengths -> ``(B, max_len + 1)`` bool anchor mask.

    State ``t`` of row ``b`` (``t <= n = lengths[b]``) is an anchor when ``t == 0`` (the empty rationale),
    ``t >= min_len`` and ``(t - min_len) % stride == 0``, or ``t == n`` (the terminal state: the last segment is
    closed, unlike the released code, which leaves it unfilled). States past ``n`` are never anchors. The
    released code's anchors (after token ``i = Tmin, Tmin + lambda, ...``) are ``min_len = Tmin + 1`` when
    ``Tmin % lambda == 0``.

    Args:
        lengths: ``(B,)`` int32 / int64 in ``[0, max_len]`` (checked eagerly on CPU tensors; on CUDA tensors only
            with ``LACOT_CHECK_BOUNDS=1``, since the check synchronizes, and never under torch.compile: an unchecked
            longer row just has no terminal anchor).
        stride: ``>= 1``, the spacing of the exact rewards (LaCoT's lambda: 8 in the paper).
        min_len: ``>= 0``, the first strided anchor.
        max_len: ``>= 0``, the largest length (the mask has ``max_len + 1`` columns, states 0..max_len).

    Returns:
        ``(B, max_len + 1)`` bool on the device of ``lengths``. Pure torch (no kernel): traceable by torch.compile.
    """
    _checks.check_tensor("lengths", lengths)
    _checks.check_dtype("lengths", lengths, _checks.INDEX_DTYPES)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    stride = _checks.check_int("stride", stride)
    min_len = _checks.check_int("min_len", min_len)
    max_len = _checks.check_int("max_len", max_len)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min_len < 0:
        raise ValueError(f"min_len must be >= 0, got {min_len}")
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    # A value check reads the tensor on the host: eager CPU tensors only (or on request), never while tracing.
    checked = lengths.device.type == "cpu" or _registry.check_bounds_enabled()
    if lengths.numel() and checked and not torch.compiler.is_compiling():
        bad = (lengths < 0) | (lengths > max_len)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0])
            raise ValueError(f"lengths must be in [0, max_len] = [0, {max_len}], got {int(lengths[idx])} at row {idx}")
    t = torch.arange(max_len + 1, device=lengths.device)
    n = lengths.to(torch.int64)[:, None]
    strided = (t >= min_len) & ((t - min_len).remainder(stride) == 0)
    return (t <= n) & ((t == 0) | (t == n) | strided)
