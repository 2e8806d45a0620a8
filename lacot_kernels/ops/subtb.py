"""Sub-trajectory balance loss of LaCoT (Eq. 2 / Eq. 5, the "modified SubTB" of Hu et al.) in O(B * T).

Row b has n = lengths[b] tokens and states s_0..s_n. With logF_t = log_reward_t - log_term_t,
delta_t = logF_t + log_pf_t - logF_{t+1}, C_0 = 0 and C_j = sum_{t<j} delta_t:

    loss_b = sum_{0 <= i < j <= n} w^(j-i-1) (C_j - C_i)^2,      w = decay

Read top to bottom: the segment algebra -> Triton kernels -> launchers -> pure-torch backend -> the registered op
(implementation, fake, autograd) -> the typed public function.

How O(T) works (the same algebra in every backend, and in csrc/rewards_math.h for the CUDA kernel and its CPU
twin). A contiguous run of states [a..b] is summarized *relative to its own ends*, never through C itself
(|C| reaches 1e3 while the differences that matter are O(1), so C-based expansions such as
(n+1) sum C^2 - (sum C)^2 cancel catastrophically in fp32):

    pw = w^(b-a+1)                  d  = C_b - C_{a-1}                (the sum of the run's deltas)
    r_p = sum_{i in run} w^(b-i) (C_b - C_i)^p          (p = 0, 1, 2: "right-facing" moments)
    l_p = sum_{j in run} w^(j-a) (C_j - C_{a-1})^p      (p = 0, 1, 2: "left-facing" moments)
    I  = sum_{i<j in run} w^(j-i-1) (C_j - C_i)^2       (the loss of the run)
    W  = sum_{i<j in run} w^(j-i-1)                     (the weight of its pairs, for reduction="mean")

State k contributes the run {k} with d = delta_{k-1} (0 for k = 0): (w, d, 1, 0, 0, 1, d, d^2, 0, 0). Two
adjacent runs L, R combine associatively (not commutatively): the pairs that straddle the boundary m have
C_j - C_i = (C_j - C_{m-1}) + (C_{m-1} - C_i) and weight w^(j-m) w^(m-1-i), hence
I = I_L + I_R + r0_L l2_R + 2 r1_L l1_R + r2_L l0_R. The forward is a reduction of these summaries (evaluated
as a tree in every backend, which is a pairwise summation), so every quantity is formed from local
differences.

Backward, with G_k = dL/dC_k = 2 (S1_k - T1_k), S1_k = sum_{i<k} w^(k-1-i) (C_k - C_i),
T1_k = sum_{j>k} w^(j-k-1) (C_j - C_k):

    dL/d delta_t  = 2 (r0_P(t) l1_S(t+1) + r1_P(t) l0_S(t+1))   (every window that contains transition t)
    dL/d logF_t   = -G_t,  S1_t = r1_P(t-1) + delta_{t-1} r0_P(t-1),  T1_t = l1_S(t+1)

where P(t) is the prefix run [0..t] and S(t+1) the suffix run [t+1..n]: one forward scan of (pw, d, r0, r1) and
one backward scan of (pw, d, l0, l1). So dL/dlog_pf_t = dL/ddelta_t, dL/dlog_reward_t = -G_t and
dL/dlog_term_t = G_t. Positions past a row's length are never read and get exactly 0 gradient.
"""

from __future__ import annotations

import torch

from .. import _checks, _registry
from ._triton_utils import INTERPRET, jit, next_pow2, tl

NATIVE_FWD = "subtb_fwd_native"
REDUCTIONS = ("sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Segment algebra (plain Python arithmetic: the torch backend calls these on tensors, the Triton kernels on
# blocks through their jit-compiled copies below; one source of truth for the formulas)
# ----------------------------------------------------------------------------------------------------------------
def _full_combine(pa, da, r0a, r1a, r2a, l0a, l1a, l2a, ia, wa, pb, db, r0b, r1b, r2b, l0b, l1b, l2b, ib, wb):
    # The run a is left of the run b. Right-facing moments move their reference from a's end to b's end (shift by
    # d_b, decay by pw_b); left-facing ones move b's reference back to a's start (shift by d_a, decay by pw_a).
    r0 = r0b + pb * r0a
    r1 = r1b + pb * (r1a + db * r0a)
    r2 = r2b + pb * (r2a + db * (2.0 * r1a + db * r0a))
    l0 = l0a + pa * l0b
    l1 = l1a + pa * (l1b + da * l0b)
    l2 = l2a + pa * (l2b + da * (2.0 * l1b + da * l0b))
    i = ia + ib + (r0a * l2b + 2.0 * r1a * l1b + r2a * l0b)
    w = wa + wb + r0a * l0b
    return pa * pb, da + db, r0, r1, r2, l0, l1, l2, i, w


def _prefix_combine(pa, da, r0a, r1a, pb, db, r0b, r1b):
    # The (pw, d, r0, r1) part of _full_combine: what a forward (prefix) scan carries.
    return pa * pb, da + db, r0b + pb * r0a, r1b + pb * (r1a + db * r0a)


def _suffix_combine_flipped(pa, da, l0a, l1a, pb, db, l0b, l1b):
    # The (pw, d, l0, l1) part of _full_combine with its operands swapped (b is the LEFT run): a forward scan
    # over elements visited right to left with this operator yields suffix summaries in natural order. (Triton's
    # reverse=True scans are not order-safe for non-commutative operators, so no backend relies on them.)
    return pb * pa, db + da, l0b + pb * l0a, l1b + pb * (l1a + db * l0a)


_full_combine_tl = jit(_full_combine)
_prefix_combine_tl = jit(_prefix_combine)
_suffix_combine_flipped_tl = jit(_suffix_combine_flipped)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (one program per row; the row is walked in chunks of BLOCK states with a carried summary)
# ----------------------------------------------------------------------------------------------------------------
@jit
def _delta(lpf_row, lt_row, lr_row, t, ok, ACC: tl.constexpr):
    # delta_t = (lr_t - lr_{t+1}) + (lt_{t+1} - lt_t) + lpf_t: neighbouring rewards (|.| ~ 1e3) are subtracted
    # first, which is exact when they are within a factor of 2 of each other; 0 where not ok (never read).
    lr0 = tl.load(lr_row + t, mask=ok, other=0.0).to(ACC)
    lr1 = tl.load(lr_row + t + 1, mask=ok, other=0.0).to(ACC)
    lt0 = tl.load(lt_row + t, mask=ok, other=0.0).to(ACC)
    lt1 = tl.load(lt_row + t + 1, mask=ok, other=0.0).to(ACC)
    pf = tl.load(lpf_row + t, mask=ok, other=0.0).to(ACC)
    return tl.where(ok, (lr0 - lr1) + (lt1 - lt0) + pf, 0.0)


@jit
def _lane(x, lane, k):
    # The value of lane k of a block as a scalar (the other lanes contribute exact zeros, NaN there or not).
    return tl.sum(tl.where(lane == k, x, 0.0), 0)


@jit
def _subtb_fwd_kernel(
    lpf_ptr,
    lt_ptr,
    lr_ptr,
    len_ptr,
    loss_ptr,
    weight_ptr,
    T,
    s_pf,
    s_t,
    s_r,
    decay_hi,
    decay_lo,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    decay = (tl.sum(tl.zeros([BLOCK], ACC), 0) + decay_hi) + decay_lo
    n = tl.load(len_ptr + b)
    ok = (n >= 0) & (n <= T)
    n_states = tl.where(ok, n + 1, 0)
    lpf_row = lpf_ptr + b * s_pf
    lt_row = lt_ptr + b * s_t
    lr_row = lr_ptr + b * s_r
    lane = tl.arange(0, BLOCK)
    zero_blk = tl.zeros([BLOCK], ACC)
    one_blk = zero_blk + 1.0
    z = tl.sum(zero_blk, 0)
    c_p, c_d, c_r0, c_r1, c_r2, c_l0, c_l1, c_l2, c_i, c_w = z + 1.0, z, z, z, z, z, z, z, z, z
    for c0 in range(0, n_states, BLOCK):
        t = c0 + lane
        live = t < n_states
        d = _delta(lpf_row, lt_row, lr_row, t - 1, live & (t >= 1), ACC)
        one = tl.where(live, one_blk, zero_blk)
        pw = tl.where(live, decay + zero_blk, one_blk)
        s = tl.associative_scan(
            (pw, d, one, zero_blk, zero_blk, one, d, d * d, zero_blk, zero_blk), 0, _full_combine_tl
        )
        last = BLOCK - 1
        c_p, c_d, c_r0, c_r1, c_r2, c_l0, c_l1, c_l2, c_i, c_w = _full_combine_tl(
            c_p, c_d, c_r0, c_r1, c_r2, c_l0, c_l1, c_l2, c_i, c_w,
            _lane(s[0], lane, last), _lane(s[1], lane, last), _lane(s[2], lane, last), _lane(s[3], lane, last),
            _lane(s[4], lane, last), _lane(s[5], lane, last), _lane(s[6], lane, last), _lane(s[7], lane, last),
            _lane(s[8], lane, last), _lane(s[9], lane, last),
        )  # fmt: skip
    tl.store(loss_ptr + b, tl.where(ok, c_i, float("nan")))
    tl.store(weight_ptr + b, tl.where(ok, c_w, float("nan")))


@jit
def _subtb_bwd_kernel(
    g_ptr,
    lpf_ptr,
    lt_ptr,
    lr_ptr,
    len_ptr,
    scratch_ptr,
    gpf_ptr,
    gt_ptr,
    gr_ptr,
    T,
    s_pf,
    s_t,
    s_r,
    decay_hi,
    decay_lo,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    decay = (tl.sum(tl.zeros([BLOCK], ACC), 0) + decay_hi) + decay_lo
    n = tl.load(len_ptr + b)
    ok = (n >= 0) & (n <= T)
    nn = tl.where(ok, n, -1)  # an invalid row has no states: nothing is read, NaN is written
    g = tl.load(g_ptr + b).to(ACC)
    lpf_row = lpf_ptr + b * s_pf
    lt_row = lt_ptr + b * s_t
    lr_row = lr_ptr + b * s_r
    sc0 = scratch_ptr + b * 2 * (T + 1)
    sc1 = sc0 + (T + 1)
    lane = tl.arange(0, BLOCK)
    zero_blk = tl.zeros([BLOCK], ACC)
    one_blk = zero_blk + 1.0
    z = tl.sum(zero_blk, 0)
    last = BLOCK - 1

    # Pass 1, right to left: the suffix summary S(t+1) of states t+1..n, stored as (l0, l1) per state t. Lane k
    # holds state t = hi - 1 - k, and its element is state t+1's (delta_t).
    s_p, s_d, s_l0, s_l1 = z + 1.0, z, z, z
    for k in range(0, (nn + BLOCK) // BLOCK):
        hi = nn + 1 - k * BLOCK
        t = hi - 1 - lane
        has = (t >= 0) & (t < nn)
        d = _delta(lpf_row, lt_row, lr_row, t, has, ACC)
        u = tl.where(has, one_blk, zero_blk)
        x_p, x_d, x_l0, x_l1 = tl.associative_scan(
            (tl.where(has, decay + zero_blk, one_blk), d, u, d), 0, _suffix_combine_flipped_tl
        )
        # x covers states t+1..hi (natural order); the carry covers the states after hi.
        e_p, e_d, e_l0, e_l1 = _suffix_combine_flipped_tl(s_p, s_d, s_l0, s_l1, x_p, x_d, x_l0, x_l1)
        keep = t >= 0
        tl.store(sc0 + t, e_l0, mask=keep)
        tl.store(sc1 + t, e_l1, mask=keep)
        s_p, s_d, s_l0, s_l1 = _suffix_combine_flipped_tl(
            s_p, s_d, s_l0, s_l1, _lane(x_p, lane, last), _lane(x_d, lane, last), _lane(x_l0, lane, last),
            _lane(x_l1, lane, last),
        )  # fmt: skip
    # Pass 2 reads what other threads of the program wrote in pass 1.
    tl.debug_barrier()

    # Pass 2, left to right over every position (the padding gets its zeros here): the exclusive prefix summary
    # P(t-1) from a scan of the elements shifted by one lane, then P(t) = P(t-1) + state t.
    c_p, c_d, c_r0, c_r1 = z + 1.0, z, z, z
    for c0 in range(0, T + 1, BLOCK):
        t = c0 + lane
        in_row = t <= nn
        d_t = _delta(lpf_row, lt_row, lr_row, t - 1, in_row & (t >= 1), ACC)  # state t's element: delta_{t-1}
        sh = in_row & (lane >= 1)  # lane k gets state t-1's element (lane 0: nothing, the carry has it)
        d_sh = _delta(lpf_row, lt_row, lr_row, t - 2, sh & (t >= 2), ACC)
        x_p, x_d, x_r0, x_r1 = tl.associative_scan(
            (tl.where(sh, decay + zero_blk, one_blk), d_sh, tl.where(sh, one_blk, zero_blk), zero_blk),
            0,
            _prefix_combine_tl,
        )
        e_p, e_d, e_r0, e_r1 = _prefix_combine_tl(c_p, c_d, c_r0, c_r1, x_p, x_d, x_r0, x_r1)  # P(t-1)
        i_p, i_d, i_r0, i_r1 = _prefix_combine_tl(
            e_p, e_d, e_r0, e_r1, tl.where(in_row, decay + zero_blk, one_blk), d_t,
            tl.where(in_row, one_blk, zero_blk), zero_blk,
        )  # fmt: skip  # P(t)
        c_p, c_d, c_r0, c_r1 = (
            _lane(i_p, lane, last),
            _lane(i_d, lane, last),
            _lane(i_r0, lane, last),
            _lane(i_r1, lane, last),
        )
        l0s = tl.load(sc0 + t, mask=in_row, other=0.0)
        l1s = tl.load(sc1 + t, mask=in_row, other=0.0)
        g_c = 2.0 * ((e_r1 + d_t * e_r0) - l1s)  # dL/dC_t = 2 (S1_t - T1_t)
        g_d = 2.0 * (i_r0 * l1s + i_r1 * l0s)  # dL/ddelta_t
        g_c = tl.where(in_row, g * g_c, 0.0)
        g_d = tl.where(in_row & (t < nn), g * g_d, 0.0)
        g_c = tl.where(ok, g_c, float("nan"))
        g_d = tl.where(ok, g_d, float("nan"))
        tl.store(gr_ptr + b * (T + 1) + t, (-g_c).to(gr_ptr.dtype.element_ty), mask=t <= T)
        tl.store(gt_ptr + b * (T + 1) + t, g_c.to(gt_ptr.dtype.element_ty), mask=t <= T)
        tl.store(gpf_ptr + b * T + t, g_d.to(gpf_ptr.dtype.element_ty), mask=t < T)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _split(x: float) -> tuple[float, float]:
    # Triton passes Python floats as fp32: a float64 decay travels as an exact fp32 head + fp32 tail.
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _block(T: int) -> tuple[int, int]:
    # The interpreter runs a generic scan element by element whether a lane is live or not: blocks no larger
    # than the rows. On a GPU, 1024 states per chunk (8 per thread at 4 warps) keep the scans in registers.
    block = min(next_pow2(T + 1), 1024)
    if INTERPRET:
        return max(block, 16), 1
    return max(block, 128), 4 if block >= 512 else 2


def _subtb_fwd_triton(log_pf, log_term, log_reward, lengths, decay):
    B, T = log_pf.shape
    acc = _acc_dtype(log_pf.dtype)
    loss = torch.empty(B, device=log_pf.device, dtype=acc)
    weight = torch.empty(B, device=log_pf.device, dtype=acc)
    if B > 0:
        block, warps = _block(T)
        _subtb_fwd_kernel[(B,)](
            log_pf, log_term, log_reward, lengths, loss, weight, T,
            log_pf.stride(0), log_term.stride(0), log_reward.stride(0), *_split(decay),
            ACC=_tl_acc(log_pf.dtype), BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return loss, weight


def _subtb_bwd_triton(grad_loss, log_pf, log_term, log_reward, lengths, decay):
    B, T = log_pf.shape
    dev = log_pf.device
    acc = _acc_dtype(log_pf.dtype)
    g_pf = torch.empty(B, T, device=dev, dtype=log_pf.dtype)
    g_t = torch.empty(B, T + 1, device=dev, dtype=log_term.dtype)
    g_r = torch.empty(B, T + 1, device=dev, dtype=log_reward.dtype)
    if B > 0:
        scratch = torch.empty(B, 2, T + 1, device=dev, dtype=acc)
        block, warps = _block(T)
        _subtb_bwd_kernel[(B,)](
            grad_loss, log_pf, log_term, log_reward, lengths, scratch, g_pf, g_t, g_r, T,
            log_pf.stride(0), log_term.stride(0), log_reward.stride(0), *_split(decay),
            ACC=_tl_acc(log_pf.dtype), BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return g_pf, g_t, g_r


# ----------------------------------------------------------------------------------------------------------------
# Pure-torch backend: the same summaries, reduced / scanned as balanced trees (log2 T vectorized steps, O(B T)
# work and memory in total)
# ----------------------------------------------------------------------------------------------------------------
def _elements(log_pf, log_term, log_reward, lengths, acc):
    """Per state t in [0, T]: delta_{t-1} (0 for t = 0 and past the row) and the live mask t <= n."""
    B, T = log_pf.shape
    t = torch.arange(T + 1, device=log_pf.device)
    n = lengths.to(torch.int64)
    ok = (n >= 0) & (n <= T)
    nn = torch.where(ok, n, -1)[:, None]
    lr, lt, pf = log_reward.to(acc), log_term.to(acc), log_pf.to(acc)
    d = (lr[:, :-1] - lr[:, 1:]) + (lt[:, 1:] - lt[:, :-1]) + pf  # delta_t, t in [0, T)
    d = torch.where(t[None, :T] < nn, d, 0.0)  # padding may hold anything: never used
    d_in = torch.nn.functional.pad(d, (1, 0))  # state t's element carries delta_{t-1}
    live = t[None, :] <= nn
    return d, d_in, live, ok, nn


def _pad_pow2(fields, identity):
    N = fields[0].shape[-1]
    P = next_pow2(max(N, 1))
    if P == N:
        return fields
    return tuple(torch.nn.functional.pad(f, (0, P - N), value=float(v)) for f, v in zip(fields, identity, strict=True))


def _tree_reduce(fields, combine, identity):
    fields = _pad_pow2(fields, identity)
    while fields[0].shape[-1] > 1:
        fields = combine(*(f[..., 0::2] for f in fields), *(f[..., 1::2] for f in fields))
    return tuple(f[..., 0] for f in fields)


def _exclusive_scan(fields, combine, identity):
    """Blelloch scan: element k of the result combines elements 0..k-1 (identity for k = 0), in order."""
    N = fields[0].shape[-1]
    levels = [_pad_pow2(fields, identity)]
    while levels[-1][0].shape[-1] > 1:
        x = levels[-1]
        levels.append(combine(*(f[..., 0::2] for f in x), *(f[..., 1::2] for f in x)))
    top = levels[-1]
    excl = tuple(torch.full_like(f, float(v)) for f, v in zip(top, identity, strict=True))
    for x in reversed(levels[:-1]):
        left = tuple(f[..., 0::2] for f in x)
        right = combine(*excl, *left)
        excl = tuple(torch.stack([a, b], -1).flatten(-2) for a, b in zip(excl, right, strict=True))
    return tuple(f[..., :N] for f in excl)


_IDENTITY_FULL = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
_IDENTITY_4 = (1.0, 0.0, 0.0, 0.0)


def _subtb_fwd_torch(log_pf, log_term, log_reward, lengths, decay):
    acc = _acc_dtype(log_pf.dtype)
    _, d_in, live, ok, _ = _elements(log_pf, log_term, log_reward, lengths, acc)
    one = live.to(acc)
    zero = torch.zeros_like(one)
    pw = torch.where(live, torch.full_like(one, decay), 1.0)
    agg = _tree_reduce((pw, d_in, one, zero, zero, one, d_in, d_in * d_in, zero, zero), _full_combine, _IDENTITY_FULL)
    nan = torch.tensor(float("nan"), dtype=acc, device=log_pf.device)
    return torch.where(ok, agg[8], nan), torch.where(ok, agg[9], nan)


def _subtb_bwd_torch(grad_loss, log_pf, log_term, log_reward, lengths, decay):
    acc = _acc_dtype(log_pf.dtype)
    d, d_in, live, ok, nn = _elements(log_pf, log_term, log_reward, lengths, acc)
    B, T = log_pf.shape
    one = live.to(acc)
    zero = torch.zeros_like(one)
    pw = torch.where(live, torch.full_like(one, decay), 1.0)
    # Prefix summaries P(t-1) (exclusive) and P(t).
    e_p, e_d, e_r0, e_r1 = _exclusive_scan((pw, d_in, one, zero), _prefix_combine, _IDENTITY_4)
    i_p, i_d, i_r0, i_r1 = _prefix_combine(e_p, e_d, e_r0, e_r1, pw, d_in, one, zero)
    # Suffix summaries S(t+1): state t+1's element sits at position t, scanned right to left (flipped operator).
    has = torch.arange(T + 1, device=d.device)[None, :] < nn
    d_out = torch.nn.functional.pad(d, (0, 1))
    u = (torch.where(has, torch.full_like(d_out, decay), 1.0), d_out, has.to(acc), d_out)
    flipped = tuple(f.flip(-1) for f in u)
    x = _exclusive_scan(flipped, _suffix_combine_flipped, _IDENTITY_4)
    x = _suffix_combine_flipped(*x, *flipped)  # inclusive
    _, _, l0s, l1s = (f.flip(-1) for f in x)
    g = grad_loss.to(acc)[:, None]
    g_c = torch.where(live, g * 2.0 * ((e_r1 + d_in * e_r0) - l1s), 0.0)
    g_d = torch.where(has, g * 2.0 * (i_r0 * l1s + i_r1 * l0s), 0.0)[:, :T]
    bad = ~ok[:, None]
    g_c = torch.where(bad, float("nan"), g_c)
    g_d = torch.where(bad, float("nan"), g_d)
    return g_d.to(log_pf.dtype), g_c.to(log_term.dtype), (-g_c).to(log_reward.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Backend tables
# ----------------------------------------------------------------------------------------------------------------
def _native_fwd(*args):
    return torch.ops.lacot.subtb_fwd_native(*args)


def _native_bwd(*args):
    return torch.ops.lacot.subtb_bwd_native(*args)


FWD = {"cuda": _native_fwd, "triton": _subtb_fwd_triton, "torch": _subtb_fwd_torch}
BWD = {"cuda": _native_bwd, "triton": _subtb_bwd_triton, "torch": _subtb_bwd_torch}


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::subtb_loss (+ its backward op), fake kernels, autograd
# ----------------------------------------------------------------------------------------------------------------
def _check_lengths_values(lengths: torch.Tensor, T: int) -> None:
    """Eager value check of the lengths: free on CPU tensors, opt-in (LACOT_CHECK_BOUNDS=1) on CUDA tensors,
    where reading the result back would synchronize; unchecked bad rows give NaN losses and gradients."""
    if lengths.numel() == 0:
        return
    if lengths.device.type != "cpu" and not _registry.check_bounds_enabled():
        return
    bad = (lengths < 0) | (lengths > T)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        raise ValueError(
            f"lengths must be in [0, T] = [0, {T}] (T = log_pf.shape[1]); got {int(lengths[idx])} at row {idx}"
        )


@torch.library.register_kernel("lacot::subtb_loss", ("cpu", "cuda"))
def _subtb_loss_impl(log_pf, log_term, log_reward, lengths, decay, backend):
    _check_lengths_values(lengths, log_pf.shape[1])
    name = _registry.resolve_backend(backend, log_pf.device, native_op=NATIVE_FWD)
    return FWD[name](log_pf, log_term, log_reward, lengths, decay)


@torch.library.register_fake("lacot::subtb_loss")
def _subtb_loss_fake(log_pf, log_term, log_reward, lengths, decay, backend):
    B = log_pf.shape[0]
    acc = _acc_dtype(log_pf.dtype)
    return log_pf.new_empty(B, dtype=acc), log_pf.new_empty(B, dtype=acc)


@torch.library.register_kernel("lacot::subtb_loss_backward", ("cpu", "cuda"))
def _subtb_loss_backward_impl(grad_loss, log_pf, log_term, log_reward, lengths, decay, backend):
    name = _registry.resolve_backend(backend, log_pf.device, native_op=NATIVE_FWD)
    return BWD[name](grad_loss, log_pf, log_term, log_reward, lengths, decay)


@torch.library.register_fake("lacot::subtb_loss_backward")
def _subtb_loss_backward_fake(grad_loss, log_pf, log_term, log_reward, lengths, decay, backend):
    return torch.empty_like(log_pf), torch.empty_like(log_term), torch.empty_like(log_reward)


def _setup_context(ctx, inputs, output):
    log_pf, log_term, log_reward, lengths, decay, backend = inputs
    ctx.save_for_backward(log_pf, log_term, log_reward, lengths)
    ctx.args = (decay, backend)


def _backward(ctx, grad_loss, _grad_weight):
    log_pf, log_term, log_reward, lengths = ctx.saved_tensors
    decay, backend = ctx.args
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    g_pf, g_t, g_r = torch.ops.lacot.subtb_loss_backward(
        grad_loss.to(_acc_dtype(log_pf.dtype)).contiguous(), log_pf, log_term, log_reward, lengths, decay, backend
    )
    need = ctx.needs_input_grad
    return (g_pf if need[0] else None), (g_t if need[1] else None), (g_r if need[2] else None), None, None, None


torch.library.register_autograd("lacot::subtb_loss", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    # The kernels need unit stride along T (any row stride).
    return _checks.unit_stride_rows(x)


def subtb_loss(
    log_pf: torch.Tensor,
    log_term: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    *,
    decay: float = 1.0,
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Sub-trajectory balance loss ``sum_{0<=i<j<=n} decay^(j-i-1) (C_j - C_i)^2`` per row (LaCoT Eq. 2/5).

    ``C_0 = 0``, ``C_j = sum_{t<j} (logF_t + log_pf_t - logF_{t+1})``, ``logF_t = log_reward_t - log_term_t``;
    row ``b`` has ``n = lengths[b]`` tokens and states ``s_0..s_n``. Computed in O(B * T) time and memory (no
    T x T tensor) with fp32 accumulation (fp64 for fp64 inputs) from local differences only (see the module
    docstring), so rewards of magnitude 1e3 lose nothing to cancellation.

    Args:
        log_pf: ``(B, T)`` ``log q(z_{t+1} | s_t)``, the log-prob of the token that leaves state t.
        log_term: ``(B, T + 1)`` ``log q(stop | s_t)``, the termination log-prob at each state.
        log_reward: ``(B, T + 1)`` ``log R(s_t stop)`` (exact or interpolated, see :func:`interpolate_rewards`).
            The three share one dtype: float32 / bfloat16 / float16 (or float64, computed in float64).
        lengths: ``(B,)`` int32 / int64, ``0 <= lengths[b] <= T``. Entries past a row's length (``log_pf[b, t]``
            for ``t >= n``, the others for ``t > n``) are never read and get exactly 0 gradient.
        decay: finite, ``>= 0``; the weight of a sub-trajectory of ``k`` transitions is ``decay^(k-1)``
            (``0^0 = 1``: ``decay=0`` keeps the single transitions only, i.e. detailed balance).
        reduction: ``"sum"`` over rows (the paper); ``"mean"``: ``sum_b loss_b / sum_b sum_{i<j<=n_b}
            decay^(j-i-1)``, the total weight of every pair of the batch (the official code's pooled mean;
            0 when every row is empty); ``"none"``: the per-row losses.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``auto`` honours ``LACOT_BACKEND``).

    Returns:
        float32 (float64 for float64 inputs): ``()`` for ``"sum"`` / ``"mean"``, ``(B,)`` for ``"none"``.
        Differentiable with respect to the three float inputs (gradients in their dtype).

    Lengths outside ``[0, T]`` raise ValueError on CPU tensors; on CUDA tensors they give NaN for that row
    unless ``LACOT_CHECK_BOUNDS=1`` is set (the check synchronizes the host with the GPU).
    """
    for name, x in (("log_pf", log_pf), ("log_term", log_term), ("log_reward", log_reward), ("lengths", lengths)):
        _checks.check_tensor(name, x)
    _checks.check_dtype("log_pf", log_pf, _FLOAT_DTYPES)
    for name, x in (("log_term", log_term), ("log_reward", log_reward)):
        if x.dtype != log_pf.dtype:
            raise TypeError(f"{name} must have the dtype of log_pf ({log_pf.dtype}), got {x.dtype}")
    _checks.check_dtype("lengths", lengths, _checks.INDEX_DTYPES)
    _checks.check_same_device(
        ("log_pf", log_pf), ("log_term", log_term), ("log_reward", log_reward), ("lengths", lengths)
    )
    if log_pf.dim() != 2:
        raise ValueError(f"log_pf must be 2-D (B, T), got shape {tuple(log_pf.shape)}")
    B, T = log_pf.shape
    for name, x in (("log_term", log_term), ("log_reward", log_reward)):
        if tuple(x.shape) != (B, T + 1):
            raise ValueError(f"{name} must have shape (B, T + 1) = {(B, T + 1)}, got {tuple(x.shape)}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
    decay = _checks.check_float("decay", decay, low=0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")

    loss, weight = torch.ops.lacot.subtb_loss(
        _rows(log_pf),
        _rows(log_term),
        _rows(log_reward),
        lengths.to(torch.int64).contiguous(),
        decay,
        backend,
    )
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # Every non-empty row has a pair of weight 1 (adjacent states), so clamping at 1 only affects an all-empty
    # batch, whose loss is then 0 rather than 0 / 0.
    return loss.sum() / weight.sum().clamp(min=1.0)
