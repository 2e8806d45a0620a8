"""Per-token log-probs (and entropy) straight from hidden states and the LM head, never holding N x V logits.

    logits = hidden @ weight.T + bias            (never materialized as a whole)
    logp[n] = log_softmax(logits[n] / T)[targets[n]],   entropy[n] = H(softmax(logits[n] / T))

Read top to bottom: Triton kernel -> launchers (Triton forward; tiled forward/backward shared by all backends)
-> the registered op (implementation, fake, autograd) -> the typed public function.

How each backend bounds memory (``LACOT_FUSED_WORKSPACE_MB``, default 256, caps the logits tiles):
  * triton forward: one kernel; each program owns BLOCK_M rows x a vocabulary split, runs the GEMM tiles with
    fp32 accumulation and folds them into online (max, sum-exp, sum-exp*d) statistics in registers; the splits
    are merged in a fixed order (deterministic). Rows are first ordered valid-first on the device and program
    blocks past the number of valid rows exit at once: ignored rows cost no matmul work and no host sync.
  * cuda / torch forward: row chunks of the valid rows; each chunk's (rows x V) fp32 logits tile goes through
    the per-row kernel of `token_logprobs` (the compiled CPU twin / CUDA kernel, or torch).
  * backward (all backends): the logits tiles are recomputed in fp32 and turned into dlogits with the saved
    softmax statistics, then dX = G @ W and dW = G^T @ X with fp32 accumulation. The triton and torch backends
    walk vocabulary blocks (so dW is accumulated in fp32 one block at a time, never a V x D fp32 buffer); the
    cuda backend walks row chunks over the full vocabulary (its per-row kernel needs whole rows). The backward
    compacts the valid rows with one host sync (it sizes the loop), which a custom op hides from torch.compile.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import _checks, _registry
from . import token_logprobs as _tl
from ._triton_utils import INTERPRET, dot_in_fp32, jit, next_pow2, tl, triton


def _workspace_bytes() -> int:
    return int(float(os.environ.get("LACOT_FUSED_WORKSPACE_MB", "256")) * (1 << 20))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: GEMM tiles + online softmax statistics, per (row block, vocabulary split)
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
    inv_t,
    HAS_BIAS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
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
    offs_k = tl.arange(0, BLOCK_K)
    for v0 in range(v_start, v_stop, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < v_stop
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < D
            x = tl.load(
                hidden_ptr + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
            )
            w = tl.load(
                weight_ptr + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0
            )
            if DOT_FP32:
                # fp32 inputs stay IEEE fp32 (no TF32); under the interpreter bf16 dots are wrong, so upcast.
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
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


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _fwd_config(N: int, V: int, D: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps, num_stages)."""
    if INTERPRET:
        # Big tiles: the interpreter's cost is per program step, not per FLOP. Two splits whenever possible
        # so the split merge is exercised by every CPU test.
        bm, bn, bk = max(16, min(64, next_pow2(N))), max(16, min(128, next_pow2(V))), max(16, min(128, next_pow2(D)))
        return bm, bn, bk, min(2, triton.cdiv(V, bn)), 1, 1
    bm = 128 if N >= 2048 else 64
    bn, bk = 128, 64
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(N, bm)
    # Split the vocabulary when there are too few row blocks to fill the GPU (small N).
    splits = max(1, min(triton.cdiv(V, bn), triton.cdiv(2 * sms, row_blocks)))
    return bm, bn, bk, splits, 8, 3


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
    bm, bn, bk, splits, warps, stages = _fwd_config(N, V, D, dev)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), bn) * bn
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty(4, splits, N, device=dev, dtype=torch.float32)
    _fused_linear_fwd_kernel[(triton.cdiv(N, bm), splits)](
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
        inv_t,
        HAS_BIAS=bias is not None,
        COMPUTE_ENTROPY=compute_entropy,
        DOT_FP32=dot_in_fp32(hidden.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )
    m, logs, logp, ent = _merge_splits(part[0], part[1], part[2], part[3], inv_t, compute_entropy)
    stats = torch.stack([m, logs], -1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N, device=dev)
    return _finish(logp[inv], ent[inv] if compute_entropy else None, stats[inv], targets, V, ignore_index)


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


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 without rounding the product to a 16-bit dtype."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _logits_tile(h, w, bias):
    x = _mm_f32(h, w.t())
    return x if bias is None else x + bias.float()


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
    rows_all = _valid_rows(targets, ignore_index)
    step = max(1, _workspace_bytes() // (4 * V))
    for r0 in range(0, rows_all.numel(), step):
        rows = rows_all[r0 : r0 + step]
        logits = _logits_tile(hidden[rows], weight, bias)
        lp, en, st = _tl.FWD[backend](logits, targets[rows], temperature, ignore_index, compute_entropy)
        logp[rows] = lp
        stats[rows] = st
        if compute_entropy:
            ent[rows] = en
        # Release this tile before the next one is allocated: the peak stays at one tile, not two.
        del logits, lp, en, st
    nan = torch.tensor(float("nan"), device=dev)
    in_range = (targets >= 0) & (targets < V)
    valid = targets != ignore_index
    logp = torch.where(valid & ~in_range, nan, logp)
    if compute_entropy:
        ent = torch.where(valid & ~in_range, nan, ent)
    return logp, ent, stats


def _fused_bwd_vocab_blocked(
    grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature, ignore_index, needs, backend
):
    """Vocabulary blocks x row chunks of the valid rows; dW finished one block at a time (fp32 accumulation)."""
    N, D = hidden.shape
    V = weight.shape[0]
    rows = _valid_rows(targets, ignore_index)
    h = hidden[rows]
    y, st, g_logp = targets[rows], stats[rows], grad_logp[rows]
    g_ent = grad_entropy[rows] if grad_entropy is not None else None
    ent = entropy[rows] if grad_entropy is not None else None
    n = rows.numel()
    # Tile = (row chunk) x (vocab block) of fp32 logits + its dlogits: within the workspace budget.
    tile_elems = max(1, _workspace_bytes() // 8)
    r_step = max(1, min(n, tile_elems // 128))
    v_step = max(128, min(V, tile_elems // max(r_step, 1)))
    grad_h = torch.zeros(n, D, device=hidden.device, dtype=torch.float32) if needs[0] else None
    grad_w = torch.zeros_like(weight) if needs[1] else None
    grad_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if needs[2] else None
    bwd = _tl.BWD[backend]
    for v0 in range(0, V, v_step):
        w_blk = weight[v0 : v0 + v_step]
        b_blk = bias[v0 : v0 + v_step] if bias is not None else None
        gw_acc = torch.zeros(w_blk.shape, device=hidden.device, dtype=torch.float32) if needs[1] else None
        for r0 in range(0, n, r_step):
            sl = slice(r0, r0 + r_step)
            logits = _logits_tile(h[sl], w_blk, b_blk)
            g = bwd(
                g_logp[sl],
                g_ent[sl] if g_ent is not None else None,
                logits,
                y[sl],
                st[sl],
                ent[sl] if ent is not None else None,
                temperature,
                ignore_index,
                col_offset=v0,
                vocab=V,
                out_dtype=hidden.dtype,
            )
            if needs[0]:
                grad_h[sl] += _mm_f32(g, w_blk)
            if needs[1]:
                gw_acc += _mm_f32(g.t(), h[sl])
            if needs[2]:
                grad_b[v0 : v0 + v_step] += g.float().sum(0)
            del logits, g  # one tile alive at a time
        if needs[1]:
            grad_w[v0 : v0 + v_step] = gw_acc.to(weight.dtype)
    return _pack_grads(grad_h, grad_w, grad_b, rows, hidden, bias)


def _fused_bwd_row_chunked(
    grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature, ignore_index, needs, backend
):
    """Row chunks x the whole vocabulary, for per-row kernels (the compiled CPU twin / CUDA kernel)."""
    N, D = hidden.shape
    V = weight.shape[0]
    rows_all = _valid_rows(targets, ignore_index)
    n = rows_all.numel()
    step = max(1, _workspace_bytes() // (8 * V))
    grad_h = torch.zeros(n, D, device=hidden.device, dtype=torch.float32) if needs[0] else None
    grad_w = torch.zeros(weight.shape, device=hidden.device, dtype=torch.float32) if needs[1] else None
    grad_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if needs[2] else None
    bwd = _tl.BWD[backend]
    for r0 in range(0, n, step):
        rows = rows_all[r0 : r0 + step]
        h = hidden[rows]
        logits = _logits_tile(h, weight, bias)
        g = bwd(
            grad_logp[rows],
            grad_entropy[rows] if grad_entropy is not None else None,
            logits,
            targets[rows],
            stats[rows],
            entropy[rows] if grad_entropy is not None else None,
            temperature,
            ignore_index,
        )
        g = g.to(hidden.dtype)
        if needs[0]:
            grad_h[r0 : r0 + step] = _mm_f32(g, weight)
        if needs[1]:
            grad_w += _mm_f32(g.t(), h)
        if needs[2]:
            grad_b += g.float().sum(0)
        del logits, g  # one tile alive at a time
    return _pack_grads(grad_h, grad_w.to(weight.dtype) if needs[1] else None, grad_b, rows_all, hidden, bias)


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


def _no_autocast(fn):
    """The ops choose their own precision (fp32 accumulation); a caller's autocast region must not recast the
    GEMMs inside them to 16 bits."""

    @functools.wraps(fn)
    def wrapper(hidden, *args):
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, *args)

    return wrapper


@torch.library.register_kernel("lacot::fused_linear_token_logprobs", ("cpu", "cuda"))
@_no_autocast
def _fused_impl(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend):
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
def _fused_fake(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend):
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
):
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if needs_grad[0] else empty,
        torch.empty_like(weight) if needs_grad[1] else empty,
        torch.empty_like(bias) if (needs_grad[2] and bias is not None) else empty,
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, backend = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy)
    ctx.args = (temperature, ignore_index, compute_entropy, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, backend = ctx.args
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    if not any(needs):
        return None, None, None, None, None, None, None, None
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
    )
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None, None, None, None, None, None)


torch.library.register_autograd("lacot::fused_linear_token_logprobs", _backward, setup_context=_setup_context)


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
            tensors it prefers the fused Triton kernel).

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

    lead = hidden.shape[:-1]
    # Explicit row count: with D = 0 a reshape to (-1, 0) is ambiguous (the logits are then all bias, or 0).
    h = _checks.unit_stride_rows(hidden.reshape(targets.numel(), D))
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    logp, entropy, _ = torch.ops.lacot.fused_linear_token_logprobs(
        h, w, bias, t, temperature, ignore_index, bool(return_entropy), backend
    )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
