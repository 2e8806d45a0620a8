"""Per-token log-probs (and entropy) straight from hidden states and the LM head, never holding N x V logits.

    logits = hidden @ weight.T + bias            (never materialized as a whole)
    logp[n] = log_softmax(logits[n] / T)[targets[n]],   entropy[n] = H(softmax(logits[n] / T))

Read top to bottom: Triton kernels (forward statistics, backward dlogits) -> launchers -> the tiled paths of the
other backends -> the registered op (implementation, fake, autograd) -> the typed public function. Tiling,
workspace (``LACOT_FUSED_WORKSPACE_MB``), fp32-accumulated GEMMs and autocast live in the tile engine
``_lm_head.py``, shared with the fused GRPO op and the TRL patch.

  * triton forward: one kernel; each program owns BLOCK_M rows x a vocabulary split, runs the GEMM tiles with
    fp32 accumulation and folds them into online (max, sum-exp, sum-exp*d) statistics in registers; the splits
    are merged in a fixed order (deterministic). Programs run in grouped order (GROUP_M row blocks walk the
    vocabulary together, so their `hidden` panels stay in L2) and the split count fills whole waves of SMs.
    Rows are first ordered valid-first on the device and program blocks past the number of valid rows exit at
    once: ignored rows cost no matmul work and no host sync.
  * triton backward (the default on CUDA): vocabulary blocks x row chunks of the valid rows; one kernel
    recomputes each logits tile in registers with the forward's own products, forms dlogits in fp32 from the saved
    statistics and stores only dlogits in the input dtype (precision="default") or as a hi/lo pair ("high");
    dX += G W and dW = G^T X follow as fp32-accumulated tensor-core GEMMs. No fp32 tile and no N x V in memory;
    deterministic (no atomics).
  * cuda / torch forward: row chunks of the valid rows; each chunk's (rows x V) fp32 logits tile goes through
    the per-row kernel of `token_logprobs` (the compiled CPU twin / CUDA kernel, or torch).
  * cuda / torch backward: fp32 logits tiles recomputed by a GEMM, dlogits by the per-row backward kernel (torch:
    vocabulary blocks; cuda: row chunks over the whole vocabulary, its per-row kernel needs whole rows).
  The backward compacts the valid rows with one host sync (it sizes the loop), which the custom op hides from
  torch.compile.
"""

from __future__ import annotations

import os

import torch

from .. import _checks, _registry
from . import _lm_head as _lm
from . import batch_invariance as _bi
from . import sampler_truncation as _trunc
from . import token_logprobs as _tl
from ._triton_utils import INTERPRET, dot_in_fp32, jit, next_pow2, tl, triton


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: forward statistics per (row block, vocabulary split); dlogits per (row block, vocabulary tile)
# ----------------------------------------------------------------------------------------------------------------
@jit
def _fused_linear_fwd_kernel(
    hidden_ptr,
    stride_h,
    perm_ptr,
    n_valid_ptr,
    weight_ptr,
    stride_w,
    bias_ptr,
    targets_ptr,
    part_m_ptr,
    part_s_ptr,
    part_sd_ptr,
    part_xy_ptr,
    N,
    V,
    D,
    v_per_split,
    n_splits,
    inv_t,
    HAS_BIAS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_s = _lm._grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), n_splits, GROUP_M)
    n_valid = tl.load(n_valid_ptr)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < n_valid
    rows = tl.load(perm_ptr + r, mask=rmask, other=0)
    y = tl.load(targets_ptr + rows, mask=rmask, other=-1)

    v_start = pid_s * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, V)
    # Row blocks made only of ignored rows (sorted last) do no work at all.
    v_stop = tl.where(pid_m * BLOCK_M < n_valid, v_stop, v_start)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    sd = tl.zeros([BLOCK_M], tl.float32)
    x_y = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < v_stop
        acc = _lm._logits_block(
            hidden_ptr, rows, rmask, stride_h, weight_ptr, cols, cmask, stride_w, D, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K
        )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(cmask[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        delta = tl.where(m == float("-inf"), 0.0, (m - m_new) * inv_t)
        alpha = tl.exp(delta)
        d = (logits - m_new[:, None]) * inv_t
        e = tl.where(cmask[None, :], tl.exp(d), 0.0)
        if COMPUTE_ENTROPY:
            sd = alpha * (sd + delta * s) + tl.sum(tl.where(e > 0.0, e * d, 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        x_y += tl.sum(tl.where(cols[None, :] == y[:, None], acc, 0.0), 1)
        m = m_new

    out = pid_s * N + r
    tl.store(part_m_ptr + out, m, mask=rmask)
    tl.store(part_s_ptr + out, s, mask=rmask)
    tl.store(part_xy_ptr + out, x_y, mask=rmask)
    if COMPUTE_ENTROPY:
        tl.store(part_sd_ptr + out, sd, mask=rmask)


@jit
def _fused_linear_dlogits_kernel(
    hidden_ptr,
    stride_h,
    weight_ptr,
    stride_w,
    bias_ptr,
    targets_ptr,
    stats_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    entropy_ptr,
    out_ptr,
    lo_ptr,
    stride_o,
    n_rows,
    n_cols,
    col_offset,
    V,
    D,
    inv_t,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SPLIT_HI_LO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # One (row block x vocabulary tile) of dlogits for the (compacted, all valid) rows of `hidden`: the logits
    # tile is recomputed in registers with the forward's own products, turned into dlogits in fp32 with the
    # saved statistics, and only the result, in the GEMM dtype (or as a hi/lo pair), is stored.
    pid_m, pid_n = _lm._grouped_pid(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_N), GROUP_M)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = r < n_rows
    # `weight_ptr` / `bias_ptr` point at the block's first row: local columns c address them, and the global
    # vocabulary id of column c is col_offset + c.
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < n_cols
    acc = _lm._logits_block(
        hidden_ptr, r, rmask, stride_h, weight_ptr, c, cmask, stride_w, D, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = tl.load(targets_ptr + r, mask=rmask, other=-1)
    m = tl.load(stats_ptr + 2 * r, mask=rmask, other=0.0)
    logs = tl.load(stats_ptr + 2 * r + 1, mask=rmask, other=0.0)
    g_logp = tl.load(grad_logp_ptr + r, mask=rmask, other=0.0)
    log_p = (acc - m[:, None]) * inv_t - logs[:, None]
    p = tl.exp(log_p)
    g = -g_logp[:, None] * p
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + r, mask=rmask, other=0.0)
        ent = tl.load(entropy_ptr + r, mask=rmask, other=0.0)
        # dH/dz_v = -p_v (log p_v + H); an underflowed p_v contributes exactly 0.
        g -= g_ent[:, None] * tl.where(p > 0.0, p * (log_p + ent[:, None]), 0.0)
    g += tl.where((col_offset + c)[None, :] == y[:, None], g_logp[:, None], 0.0)
    g = g * inv_t
    in_range = (y >= 0) & (y < V)
    g = tl.where(in_range[:, None], g, float("nan"))
    offs = r[:, None] * stride_o + c[None, :]
    omask = rmask[:, None] & cmask[None, :]
    hi = g.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, hi, mask=omask)
    if SPLIT_HI_LO:
        # precision="high": the rounding error of hi, itself rounded, so hi + lo carries g to ~2^-16 relative.
        tl.store(lo_ptr + offs, (g - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fwd_config(N: int, V: int, D: int, device: torch.device, dtype=None) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps, num_stages)."""
    if INTERPRET:
        # Big tiles: the interpreter's cost is per program step, not per FLOP. Two splits whenever possible
        # so the split merge is exercised by every CPU test.
        bm, bn, bk = max(16, min(64, next_pow2(N))), max(16, min(128, next_pow2(V))), max(16, min(128, next_pow2(D)))
        return bm, bn, bk, min(2, triton.cdiv(V, bn)), 1, 1
    if dtype == torch.float32:
        # IEEE fp32 has no tensor-core path: FMA tiles small enough to stay in registers (no spills).
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 2
    else:
        bm, bn, bk, warps, stages = (128, 128, 64, 8, 3) if N >= 2048 else (64, 128, 64, 4, 3)
    splits = _lm.wave_splits(triton.cdiv(N, bm), triton.cdiv(V, bn), _sm_count(device), ctas_per_sm=1)
    return bm, bn, bk, splits, warps, stages


def _dlogits_config(n: int, V: int, D: int, dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the dlogits kernel."""
    if INTERPRET:
        return max(16, min(64, next_pow2(n))), max(16, min(128, next_pow2(V))), max(16, min(128, next_pow2(D))), 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 128, 128, 64, 8, 3


def _merge_splits(part_m, part_s, part_sd, part_xy, inv_t, compute_entropy):
    """Fixed-order merge of the per-split statistics: (m, log s, log-prob numerator, entropy)."""
    m = part_m.amax(0)
    shift = (part_m - m) * inv_t
    w = shift.exp()
    s = (part_s * w).sum(0)
    logs = s.log()
    logp = (part_xy.sum(0) - m) * inv_t - logs
    ent = logs - (w * (part_sd + shift * part_s)).sum(0) / s if compute_entropy else None
    return m, logs, logp, ent


def _fused_fwd_triton(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    inv_t = 1.0 / temperature
    valid = targets != ignore_index
    # Valid rows first (stable), counted on the device: the kernel reads the count, the host never does.
    perm = torch.argsort((~valid).to(torch.int8), stable=True)
    n_valid = valid.sum(dtype=torch.int32).reshape(1)
    bm, bn, bk, splits, warps, stages = _fwd_config(N, V, D, dev, hidden.dtype)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), bn) * bn
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty(4, splits, N, device=dev, dtype=torch.float32)
    _fused_linear_fwd_kernel[(triton.cdiv(N, bm) * splits,)](
        hidden,
        hidden.stride(0),
        perm,
        n_valid,
        weight,
        weight.stride(0),
        bias if bias is not None else hidden,
        targets,
        part[0],
        part[1],
        part[2],
        part[3],
        N,
        V,
        D,
        v_per_split,
        splits,
        inv_t,
        HAS_BIAS=bias is not None,
        COMPUTE_ENTROPY=compute_entropy,
        DOT_FP32=dot_in_fp32(hidden.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=_lm.GROUP_M,
        num_warps=warps,
        num_stages=stages,
    )
    m, logs, logp, ent = _merge_splits(part[0], part[1], part[2], part[3], inv_t, compute_entropy)
    stats = torch.stack([m, logs], -1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N, device=dev)
    return _finish(logp[inv], ent[inv] if compute_entropy else None, stats[inv], targets, V, ignore_index)


def _dlogits_triton(h, w_blk, b_blk, y, st, g_logp, g_ent, ent, temperature, vocab, v0, out_dtype, split):
    """dlogits of one (rows x vocabulary block) tile, logits recomputed in registers; (hi, lo) when `split`."""
    n, D = h.shape
    nc = w_blk.shape[0]
    out = torch.empty(n, nc, device=h.device, dtype=out_dtype)
    lo = torch.empty_like(out) if split else out
    bm, bn, bk, warps, stages = _dlogits_config(n, nc, D, h.dtype)
    grid = (triton.cdiv(n, bm) * triton.cdiv(nc, bn),)
    _fused_linear_dlogits_kernel[grid](
        h,
        h.stride(0),
        w_blk,
        w_blk.stride(0),
        b_blk if b_blk is not None else h,
        y,
        st,
        g_logp,
        g_ent if g_ent is not None else g_logp,
        ent if ent is not None else g_logp,
        out,
        lo,
        out.stride(0),
        n,
        nc,
        v0,
        vocab,
        D,
        1.0 / temperature,
        HAS_BIAS=b_blk is not None,
        HAS_GRAD_ENTROPY=g_ent is not None,
        DOT_FP32=dot_in_fp32(h.dtype),
        SPLIT_HI_LO=split,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=_lm.GROUP_M,
        num_warps=warps,
        num_stages=stages,
    )
    return (out, lo) if split else out


def _finish(logp, ent, stats, targets, V, ignore_index):
    """Exact zeros on ignored rows, NaN for out-of-range targets (whatever the kernels left there)."""
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    nan = torch.tensor(float("nan"), device=logp.device)
    logp = torch.where(valid, torch.where(in_range, logp, nan), 0.0)
    if ent is None:
        ent = logp.new_empty(0)
    else:
        ent = torch.where(valid, torch.where(in_range, ent, nan), 0.0)
    return logp, ent, torch.where(valid[:, None], stats, 0.0)


# Kept as module attributes: tests spy on the tiles the torch paths build.
_logits_tile = _lm.logits_tile


def _valid_rows(targets, ignore_index):
    return (targets != ignore_index).nonzero().squeeze(1)


def _fused_fwd_tiled(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend):
    """Row chunks of the valid rows x the whole vocabulary, folded by the backend's per-row kernel."""
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(N, device=dev, dtype=torch.float32)
    ent = torch.zeros(N if compute_entropy else 0, device=dev, dtype=torch.float32)
    stats = torch.zeros(N, 2, device=dev, dtype=torch.float32)
    fwd = _tl.FWD[backend]

    def tile(logits, rows):
        lp, en, st = fwd(logits, targets[rows], temperature, ignore_index, compute_entropy)
        logp[rows] = lp
        stats[rows] = st
        if compute_entropy:
            ent[rows] = en

    _lm.row_chunks(
        hidden, weight, bias, _valid_rows(targets, ignore_index), bytes_per_elem=4, tile_fn=tile, logits_fn=_logits_tile
    )
    nan = torch.tensor(float("nan"), device=dev)
    in_range = (targets >= 0) & (targets < V)
    valid = targets != ignore_index
    logp = torch.where(valid & ~in_range, nan, logp)
    if compute_entropy:
        ent = torch.where(valid & ~in_range, nan, ent)
    return logp, ent, stats


def _gemm_dlogits(g32: torch.Tensor, dtype: torch.dtype, precision: str):
    """The form the backward GEMMs take fp32 dlogits in: rounded to the input dtype ("default"), or a hi/lo pair
    on a GPU ("high"; on a CPU the GEMMs run in fp32 anyway, so the fp32 tile itself is used)."""
    if dtype == torch.float32:
        return g32
    if precision == "high":
        return _lm.split_hi_lo(g32, dtype) if g32.is_cuda else g32
    return g32.to(dtype)


def _fused_bwd_vocab_blocked(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    stats,
    entropy,
    temperature,
    ignore_index,
    needs,
    backend,
    precision="default",
):
    """Vocabulary blocks x row chunks of the valid rows; dW finished one block at a time (fp32 accumulation).

    triton: the dlogits kernel recomputes each logits tile in registers (no fp32 tile in memory); torch: an fp32
    logits tile and the per-row backward of token_logprobs."""
    V = weight.shape[0]
    rows = _valid_rows(targets, ignore_index)
    h = hidden[rows]
    y, st, g_logp = targets[rows], stats[rows].contiguous(), grad_logp[rows].contiguous()
    g_ent = grad_entropy[rows].contiguous() if grad_entropy is not None else None
    ent = entropy[rows].contiguous() if grad_entropy is not None else None
    split = precision == "high" and hidden.dtype != torch.float32
    if backend == "triton":
        out_dtype = hidden.dtype

        def tile(hc, w_blk, b_blk, sl, v0):
            return _dlogits_triton(
                hc,
                w_blk,
                b_blk,
                y[sl],
                st[sl],
                g_logp[sl],
                g_ent[sl] if g_ent is not None else None,
                ent[sl] if ent is not None else None,
                temperature,
                V,
                v0,
                out_dtype,
                split,
            )

        per_elem = hidden.element_size() * (2 if split else 1)
    else:
        bwd = _tl.BWD[backend]
        keep32 = split or hidden.dtype == torch.float32

        def tile(hc, w_blk, b_blk, sl, v0):
            g = bwd(
                g_logp[sl],
                g_ent[sl] if g_ent is not None else None,
                _logits_tile(hc, w_blk, b_blk),
                y[sl],
                st[sl],
                ent[sl] if ent is not None else None,
                temperature,
                ignore_index,
                col_offset=v0,
                vocab=V,
                out_dtype=torch.float32 if keep32 else hidden.dtype,
            )
            return _gemm_dlogits(g, hidden.dtype, precision) if keep32 else g

        per_elem = 8
    gh, gw, gb = _lm.vocab_blocks(h, weight, bias, bytes_per_elem=per_elem, tile_fn=tile, needs=needs)
    return _pack_grads(gh, gw, gb, rows, hidden, bias)


def _fused_bwd_row_chunked(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    stats,
    entropy,
    temperature,
    ignore_index,
    needs,
    backend,
    precision="default",
    tau=None,
    rows_step=None,
    pad=False,
):
    """Row chunks x the whole vocabulary, for per-row kernels (the compiled CPU twin / CUDA kernel, and every
    backend in the row-wise variant: `tau` (rows,) the sampler thresholds, `rows_step` / `pad` the forward's
    chunking, see :func:`_lm_head.row_chunks`)."""
    bwd = _tl.BWD[backend]

    def tile(logits, rows):
        args = (
            grad_logp[rows],
            grad_entropy[rows] if grad_entropy is not None else None,
            logits,
            targets[rows],
            stats[rows],
            entropy[rows] if grad_entropy is not None else None,
            temperature,
            ignore_index,
        )
        t = tau[rows] if tau is not None else None
        # The compiled op takes tau positionally (its schema), the Python kernels as a keyword.
        g = bwd(*args, t) if backend == "cuda" else bwd(*args, tau=t)
        return _gemm_dlogits(g, hidden.dtype, precision)

    rows_all = _valid_rows(targets, ignore_index)
    gh, gw, gb = _lm.row_chunks(
        hidden,
        weight,
        bias,
        rows_all,
        bytes_per_elem=8,
        tile_fn=tile,
        needs=needs,
        logits_fn=_logits_tile,
        rows_step=rows_step,
        pad=pad,
    )
    return _pack_grads(gh, gw.to(weight.dtype) if gw is not None else None, gb, rows_all, hidden, bias)


def _pack_grads(grad_h_valid, grad_w, grad_b, rows, hidden, bias):
    empty = hidden.new_empty(0)
    if grad_h_valid is not None:
        grad_h = torch.zeros_like(hidden)
        grad_h[rows] = grad_h_valid.to(hidden.dtype)
    else:
        grad_h = empty
    return (
        grad_h,
        grad_w if grad_w is not None else empty,
        grad_b.to(bias.dtype) if grad_b is not None else empty,
    )


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::fused_linear_token_logprobs (+ its backward op), fake kernels, autograd
# ----------------------------------------------------------------------------------------------------------------
def _resolve(backend: str, device: torch.device) -> str:
    # On CUDA tensors the fused Triton kernel is the first choice for `auto` (the compiled CUDA kernel only
    # folds materialized logits tiles); elsewhere the usual order applies.
    if backend == "auto" and device.type == "cuda" and os.environ.get("LACOT_BACKEND", "auto") in ("", "auto"):
        if _registry.triton_available("cuda"):
            return "triton"
    return _registry.resolve_backend(backend, device)


# Kept under its old name: the fused GRPO op imports it from here.
_no_autocast = _lm.no_autocast


@torch.library.register_kernel("lacot::fused_linear_token_logprobs", ("cpu", "cuda"))
@_no_autocast
def _fused_impl(
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend, precision="default"
):
    V = weight.shape[0]
    _checks.check_targets_in_range(targets, V, ignore_index)
    name = _resolve(backend, hidden.device)
    if hidden.shape[0] == 0:
        f32 = dict(device=hidden.device, dtype=torch.float32)
        return torch.empty(0, **f32), torch.empty(0, **f32), torch.empty(0, 2, **f32)
    if name == "triton":
        return _fused_fwd_triton(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy)
    return _fused_fwd_tiled(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, name)


@torch.library.register_fake("lacot::fused_linear_token_logprobs")
def _fused_fake(
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend, precision="default"
):
    N = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    return (
        hidden.new_empty(N, **f32),
        hidden.new_empty(N if compute_entropy else 0, **f32),
        hidden.new_empty(N, 2, **f32),
    )


@torch.library.register_kernel("lacot::fused_linear_token_logprobs_backward", ("cpu", "cuda"))
@_no_autocast
def _fused_backward_impl(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    stats,
    entropy,
    temperature,
    ignore_index,
    needs_grad,
    backend,
    precision="default",
):
    name = _resolve(backend, hidden.device)
    fn = _fused_bwd_row_chunked if name == "cuda" else _fused_bwd_vocab_blocked
    return fn(
        grad_logp,
        grad_entropy,
        hidden,
        weight,
        bias,
        targets,
        stats,
        entropy,
        temperature,
        ignore_index,
        list(needs_grad),
        name,
        precision,
    )


@torch.library.register_fake("lacot::fused_linear_token_logprobs_backward")
def _fused_backward_fake(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    stats,
    entropy,
    temperature,
    ignore_index,
    needs_grad,
    backend,
    precision="default",
):
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if needs_grad[0] else empty,
        torch.empty_like(weight) if needs_grad[1] else empty,
        torch.empty_like(bias) if (needs_grad[2] and bias is not None) else empty,
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend = inputs[:8]
    precision = inputs[8] if len(inputs) > 8 else "default"
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy)
    ctx.args = (temperature, ignore_index, compute_entropy, backend, precision)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, backend, precision = ctx.args
    n_in = len(ctx.needs_input_grad)
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    if not any(needs):
        return (None,) * n_in
    gh, gw, gb = torch.ops.lacot.fused_linear_token_logprobs_backward(
        grad_logp.float().contiguous(),
        grad_entropy.float().contiguous() if compute_entropy else None,
        hidden,
        weight,
        bias,
        targets,
        stats,
        entropy,
        temperature,
        ignore_index,
        needs,
        backend,
        precision,
    )
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + (None,) * (n_in - 3)


torch.library.register_autograd("lacot::fused_linear_token_logprobs", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::fused_linear_token_logprobs_rowwise (sampler truncation, batch invariance)
# ----------------------------------------------------------------------------------------------------------------
# Both need whole rows of logits: the sampler's kept set (top-k / top-p) is a selection over the row, and a
# batch-invariant row must not share its reductions with other rows. So this variant runs the engine's row-chunk
# order for every backend: each (rows x V) fp32 tile gives the rows' threshold tau (sampler_truncation) and then
# goes through the backend's per-row kernel with that tau. The backward recomputes the tiles with the *same* row
# chunks (rows_step is an argument of both ops), so it sees bitwise the logits the forward compared with tau: a
# token at the boundary (top_k=1's argmax, top-p's last kept token) is kept or dropped by both alike.
# Deterministic mode fixes the chunk at DET_ROWS rows, the last one zero-padded: every GEMM has one shape, so a
# row's logits, outputs and grad_hidden do not depend on the other rows, the row count or the workspace size.
DET_ROWS = 64


def _rows_step(V: int, deterministic: bool, device: torch.device) -> int:
    # 8 bytes per element: the fp32 logits tile and the backward's fp32 dlogits tile.
    return DET_ROWS if deterministic else _lm.rows_per_chunk(V, 8, device)


@torch.library.register_kernel("lacot::fused_linear_token_logprobs_rowwise", ("cpu", "cuda"))
@_no_autocast
def _rowwise_impl(
    hidden,
    weight,
    bias,
    targets,
    temperature,
    ignore_index,
    compute_entropy,
    top_k,
    top_p,
    min_p,
    sampler_order,
    deterministic,
    rows_step,
    backend,
    precision="default",
):
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    _checks.check_targets_in_range(targets, V, ignore_index)
    name = _resolve(backend, dev)
    f32 = dict(device=dev, dtype=torch.float32)
    truncating = _trunc.is_truncating(top_k, top_p, min_p)
    logp = torch.zeros(N, **f32)
    ent = torch.zeros(N if compute_entropy else 0, **f32)
    stats = torch.zeros(N, 2, **f32)
    tau_all = torch.full((N if truncating else 0,), float("-inf"), **f32)

    def tile(logits, rows):
        tau = None
        if truncating:
            tau = _trunc.kept_threshold(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, order=sampler_order,
                deterministic=deterministic,
            )  # fmt: skip
            tau_all[rows] = tau
        lp, en, st = _tl._fwd_truncated(
            name, logits, targets[rows], tau, temperature, ignore_index, compute_entropy, deterministic
        )
        logp[rows] = lp
        stats[rows] = st
        if compute_entropy:
            ent[rows] = en

    _lm.row_chunks(
        hidden,
        weight,
        bias,
        _valid_rows(targets, ignore_index),
        bytes_per_elem=8,
        tile_fn=tile,
        logits_fn=_logits_tile,
        rows_step=rows_step,
        pad=deterministic,
    )
    logp, ent, stats = _finish(logp, ent if compute_entropy else None, stats, targets, V, ignore_index)
    return logp, ent, stats, tau_all


@torch.library.register_fake("lacot::fused_linear_token_logprobs_rowwise")
def _rowwise_fake(
    hidden,
    weight,
    bias,
    targets,
    temperature,
    ignore_index,
    compute_entropy,
    top_k,
    top_p,
    min_p,
    sampler_order,
    deterministic,
    rows_step,
    backend,
    precision="default",
):
    N = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    truncating = _trunc.is_truncating(top_k, top_p, min_p)
    return (
        hidden.new_empty(N, **f32),
        hidden.new_empty(N if compute_entropy else 0, **f32),
        hidden.new_empty(N, 2, **f32),
        hidden.new_empty(N if truncating else 0, **f32),
    )


@torch.library.register_kernel("lacot::fused_linear_token_logprobs_rowwise_backward", ("cpu", "cuda"))
@_no_autocast
def _rowwise_backward_impl(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    stats,
    entropy,
    tau,
    temperature,
    ignore_index,
    needs_grad,
    deterministic,
    rows_step,
    backend,
    precision,
):
    return _fused_bwd_row_chunked(
        grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature, ignore_index,
        list(needs_grad), _resolve(backend, hidden.device), precision, tau=tau if tau.numel() > 0 else None,
        rows_step=rows_step, pad=deterministic,
    )  # fmt: skip


@torch.library.register_fake("lacot::fused_linear_token_logprobs_rowwise_backward")
def _rowwise_backward_fake(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    stats,
    entropy,
    tau,
    temperature,
    ignore_index,
    needs_grad,
    deterministic,
    rows_step,
    backend,
    precision,
):
    return _fused_backward_fake(
        grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature, ignore_index,
        needs_grad, backend,
    )  # fmt: skip


def _setup_context_rowwise(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy = inputs[:7]
    deterministic, rows_step, backend = inputs[11:14]
    precision = inputs[14] if len(inputs) > 14 else "default"
    logp, entropy, stats, tau = output
    ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy, tau, logp)
    ctx.args = (temperature, ignore_index, compute_entropy, deterministic, rows_step, backend, precision)


def _backward_rowwise(ctx, grad_logp, grad_entropy, _grad_stats, _grad_tau):
    hidden, weight, bias, targets, stats, entropy, tau, logp = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, deterministic, rows_step, backend, precision = ctx.args
    n_in = len(ctx.needs_input_grad)
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    if not any(needs):
        return (None,) * n_in
    # A target outside the kept set has logp = -inf, a constant of the logits (tau is a constant selector): its
    # upstream gradient is dropped before the kernels add it at the target.
    g = torch.where(logp == float("-inf"), 0.0, grad_logp.float()).contiguous()
    gh, gw, gb = torch.ops.lacot.fused_linear_token_logprobs_rowwise_backward(
        g,
        grad_entropy.float().contiguous() if compute_entropy else None,
        hidden,
        weight,
        bias,
        targets,
        stats,
        entropy,
        tau,
        temperature,
        ignore_index,
        needs,
        deterministic,
        rows_step,
        backend,
        precision,
    )
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + (None,) * (n_in - 3)


torch.library.register_autograd(
    "lacot::fused_linear_token_logprobs_rowwise", _backward_rowwise, setup_context=_setup_context_rowwise
)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    precision: str = "default",
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    sampler_order: str = "vllm",
    deterministic: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, targets, ...)`` without materializing the N x V logits.

    Args:
        hidden: ``(..., D)`` float32 / bfloat16 / float16 (the last hidden states, N = prod(...) rows).
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``.
        targets: ``(...)`` int32 / int64 token ids in ``[0, V)``, or ``ignore_index`` (such rows cost no
            matmul work and give exactly 0 and 0 gradient).
        bias: optional ``(V,)``, same dtype as ``weight``.
        temperature: finite, > 0.
        ignore_index: target value of positions to skip.
        return_entropy: also return the entropy of ``softmax(logits / temperature)``.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``auto`` honours ``LACOT_BACKEND``; on CUDA
            tensors it prefers the fused Triton kernels, forward and backward).
        precision: ``"default"``: for 16-bit inputs the backward rounds dlogits to the input dtype before the
            dX / dW GEMMs (fp32 accumulation), as every peer does; ``"high"``: dlogits enter those GEMMs as a
            hi + lo pair of 16-bit tiles (two tensor-core GEMMs per product instead of one), which keeps the
            gradients at about fp32 accuracy. No effect for fp32 inputs (IEEE fp32 throughout).
        top_k, top_p, min_p, sampler_order: the sampler's truncation, as in :func:`token_logprobs`: the log-prob
            and entropy of ``softmax(logits / T)`` renormalized over the kept set (a target outside it gives
            ``-inf`` and no gradient). Each row's threshold is computed from its own (rows x V) fp32 tile.
        deterministic: batch-invariant mode (None: ``LACOT_BATCH_INVARIANT``): each row's ``logp``, entropy and
            ``hidden`` gradient are bitwise independent of the other rows, the row count and the workspace size
            (fixed 64-row GEMMs, zero-padded). ``weight``'s gradient is a sum over rows and is not.
            With truncation or this mode every backend runs whole-row (rows x V) fp32 tiles bounded by the
            workspace (``ops/fused_linear.py``: the row-wise variant; about one extra GEMM-pass of time on
            Triton/CUDA, where the plain op keeps the tiles in registers); without them the op is the plain one.

    Returns:
        ``logp`` ``(...)`` float32, or ``(logp, entropy)``. Differentiable with respect to ``hidden``,
        ``weight`` and ``bias`` (gradients in their dtypes, accumulated in fp32). Under ``torch.no_grad()``
        nothing is saved for backward.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _checks.check_tensor(name, t)
    _checks.check_dtype("hidden", hidden, _checks.FLOAT_DTYPES)
    _checks.check_dtype("weight", weight, _checks.FLOAT_DTYPES)
    _checks.check_dtype("targets", targets, _checks.INDEX_DTYPES)
    if bias is not None:
        _checks.check_tensor("bias", bias)
        _checks.check_dtype("bias", bias, _checks.FLOAT_DTYPES)
    _checks.check_same_device(("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (..., D), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    D = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight.shape[1] must equal hidden.shape[-1] = {D}, got weight.shape {tuple(weight.shape)}")
    if V == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets.shape must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    temperature = _checks.check_temperature(temperature)
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    if precision not in _lm.PRECISIONS:
        raise ValueError(f"precision must be one of {_lm.PRECISIONS}, got {precision!r}")
    _trunc.check_sampler_args(top_k, top_p, min_p, sampler_order)
    det = _bi.enabled(deterministic)

    lead = hidden.shape[:-1]
    # Explicit row count: with D = 0 a reshape to (-1, 0) is ambiguous (the logits are then all bias, or 0).
    h = _checks.unit_stride_rows(hidden.reshape(targets.numel(), D))
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    if _trunc.is_truncating(top_k, top_p, min_p) or det:
        logp, entropy, _, _ = torch.ops.lacot.fused_linear_token_logprobs_rowwise(
            h, w, bias, t, temperature, ignore_index, bool(return_entropy), top_k,
            None if top_p is None else float(top_p), None if min_p is None else float(min_p), sampler_order, det,
            _rows_step(V, det, h.device), backend, precision,
        )  # fmt: skip
    else:
        logp, entropy, _ = torch.ops.lacot.fused_linear_token_logprobs(
            h, w, bias, t, temperature, ignore_index, bool(return_entropy), backend, precision
        )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
