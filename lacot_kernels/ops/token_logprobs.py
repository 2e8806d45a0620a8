"""Per-token log-probabilities of chosen tokens (and the entropy) from logits.

    logp[n]    = log_softmax(logits[n] / T)[targets[n]]
    entropy[n] = -sum_v p[n, v] log p[n, v],   p = softmax(logits[n] / T)

Read top to bottom: Triton kernels -> launchers -> pure-torch backend -> the registered op (implementation,
fake, autograd) -> the typed public function.

Numerics shared by every backend (and by the CUDA kernel and its CPU twin in csrc/):
  * one pass over each row with an online max / sum-exp, all in fp32 whatever the input dtype;
  * the running max m is kept in *raw logit* space and differences are formed before the 1/T scaling,
    d_v = (x_v - m) / T, so a logit of 1e4 at T = 0.6 loses nothing to the rounding of x / T;
  * the entropy accumulates sum_v e^{d_v} d_v (shifted), H = log s - sd / s, which has no cancellation
    between two numbers of the size of the logits;
  * the normalizer is saved as stats = [m, log s] for the backward.
"""

from __future__ import annotations

import torch

from .. import _checks, _registry
from . import batch_invariance as _bi
from . import sampler_truncation as _trunc
from ._triton_utils import INTERPRET, jit, next_pow2, tl, triton

# Rows handled per step by the torch backend: bounds its fp32 temporaries to ~this many elements.
_TORCH_CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    stats_ptr,
    V,
    inv_t,
    ignore_index,
    tau_ptr,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_TAU: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row)
    if HAS_TAU:
        # Sampler truncation: logits below the row's threshold are dropped (act as -inf) everywhere below.
        tau = tl.load(tau_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)
    base = logits_ptr + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    sd = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    # An ignored row runs zero iterations: it is never read.
    v_end = tl.where(valid, V, 0)
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + cols0
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_TAU:
            # x < tau (not x >= tau) drops a logit: a NaN stays NaN, so a row holding one gives NaN with or without
            # truncation, on every backend (csrc keep_above is the same test).
            x = tl.where(x < tau, float("-inf"), x)
        m_new = tl.maximum(m, tl.max(x, 0))
        # The first block starts from the empty state (m = -inf, s = sd = 0): no rescaling then.
        delta = tl.where(m == float("-inf"), 0.0, (m - m_new) * inv_t)
        alpha = tl.exp(delta)
        d = (x - m_new) * inv_t
        e = tl.where(mask, tl.exp(d), 0.0)
        if COMPUTE_ENTROPY:
            sd = alpha * (sd + delta * s) + tl.sum(tl.where(e > 0.0, e * d, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new

    logs = tl.log(s)
    x_y = tl.load(base + y, mask=valid & in_range, other=0.0).to(tl.float32)
    if HAS_TAU:
        x_y = tl.where(x_y < tau, float("-inf"), x_y)
    logp = (x_y - m) * inv_t - logs
    logp = tl.where(valid, tl.where(in_range, logp, float("nan")), 0.0)
    tl.store(logp_ptr + row, logp)
    if COMPUTE_ENTROPY:
        ent = logs - sd / s
        ent = tl.where(valid, tl.where(in_range, ent, float("nan")), 0.0)
        tl.store(entropy_ptr + row, ent)
    tl.store(stats_ptr + 2 * row, tl.where(valid, m, 0.0))
    tl.store(stats_ptr + 2 * row + 1, tl.where(valid, logs, 0.0))


@jit
def _token_logprobs_bwd_kernel(
    grad_logp_ptr,
    grad_entropy_ptr,
    logits_ptr,
    stride_l,
    targets_ptr,
    stats_ptr,
    entropy_ptr,
    out_ptr,
    stride_o,
    n_cols,
    col_offset,
    V,
    inv_t,
    ignore_index,
    tau_ptr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_TAU: tl.constexpr = False,
):
    # Grid (rows, column blocks). `logits` may be a column slice [col_offset, col_offset + n_cols) of the
    # full vocabulary (the fused op's backward tiles); the softmax normalizer comes from `stats`.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < n_cols
    y = tl.load(targets_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)
    m = tl.load(stats_ptr + 2 * row)
    logs = tl.load(stats_ptr + 2 * row + 1)
    g_logp = tl.load(grad_logp_ptr + row)
    x = tl.load(logits_ptr + row * stride_l + cols, mask=cmask & valid, other=0.0).to(tl.float32)
    if HAS_TAU:
        # Dropped logits have p = 0 and get exactly 0 (the caller zeroes g_logp of rows whose target is dropped).
        x = tl.where(x < tl.load(tau_ptr + row), float("-inf"), x)
    # log p <= 0: logits recomputed by another GEMM than the forward's (the fused op) may exceed the saved max by
    # a rounding, which 1/T of a tiny temperature would blow up to exp(+large) = inf.
    log_p = tl.minimum((x - m) * inv_t - logs, 0.0, propagate_nan=tl.PropagateNan.ALL)  # (NaN stays NaN)
    p = tl.exp(log_p)
    g = -g_logp * p
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row)
        ent = tl.load(entropy_ptr + row)
        # dH/dz_v = -p_v (log p_v + H); an underflowed p_v (log p_v = -inf) contributes exactly 0.
        g -= g_ent * tl.where(p > 0.0, p * (log_p + ent), 0.0)
    g += tl.where(cols + col_offset == y, g_logp, 0.0)
    g = g * inv_t
    g = tl.where(valid, tl.where(in_range, g, float("nan")), 0.0)
    tl.store(out_ptr + row * stride_o + cols, g.to(out_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _fwd_block(V: int) -> tuple[int, int]:
    # The interpreter's cost grows with loop iterations, not lanes: one big block. On a GPU 4096 lanes
    # (16 per thread at 8 warps) keeps loads vectorized with enough blocks in flight.
    if INTERPRET:
        return min(next_pow2(V), 1 << 15), 1
    return min(next_pow2(V), 4096), 8


def _token_logprobs_fwd_triton(logits, targets, temperature, ignore_index, compute_entropy, tau=None):
    N, V = logits.shape
    inv_t = 1.0 / temperature
    logp = torch.empty(N, device=logits.device, dtype=torch.float32)
    entropy = torch.empty(N if compute_entropy else 0, device=logits.device, dtype=torch.float32)
    stats = torch.empty(N, 2, device=logits.device, dtype=torch.float32)
    if N > 0:
        block, warps = _fwd_block(V)
        _token_logprobs_fwd_kernel[(N,)](
            logits,
            logits.stride(0),
            targets,
            logp,
            entropy,
            stats,
            V,
            inv_t,
            ignore_index,
            tau if tau is not None else stats,
            COMPUTE_ENTROPY=compute_entropy,
            BLOCK_V=block,
            HAS_TAU=tau is not None,
            num_warps=warps,
        )
    return logp, entropy, stats


def _token_logprobs_bwd_triton(
    grad_logp,
    grad_entropy,
    logits,
    targets,
    stats,
    entropy,
    temperature,
    ignore_index,
    col_offset=0,
    vocab=None,
    out_dtype=None,
    tau=None,
):
    N, n_cols = logits.shape
    inv_t = 1.0 / temperature
    out = torch.empty(N, n_cols, device=logits.device, dtype=out_dtype or logits.dtype)
    if N > 0 and n_cols > 0:
        block = min(next_pow2(n_cols), 1 << 15 if INTERPRET else 2048)
        has_ge = grad_entropy is not None
        _token_logprobs_bwd_kernel[(N, triton.cdiv(n_cols, block))](
            grad_logp,
            grad_entropy if has_ge else grad_logp,
            logits,
            logits.stride(0),
            targets,
            stats,
            entropy if has_ge else grad_logp,
            out,
            out.stride(0),
            n_cols,
            col_offset,
            n_cols if vocab is None else vocab,
            inv_t,
            ignore_index,
            tau if tau is not None else stats,
            HAS_GRAD_ENTROPY=has_ge,
            BLOCK_V=block,
            HAS_TAU=tau is not None,
            num_warps=1 if INTERPRET else 8,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Pure-torch backend (same math, row-chunked so its fp32 temporaries stay bounded)
# ----------------------------------------------------------------------------------------------------------------
def _token_logprobs_fwd_torch(
    logits, targets, temperature, ignore_index, compute_entropy, tau=None, deterministic=False
):
    # deterministic: row sums in a fixed order (batch_invariance.tree_sum) instead of torch's shape-tuned sum.
    row_sum = _bi.tree_sum if deterministic else (lambda t: t.sum(-1))
    N, V = logits.shape
    inv_t = 1.0 / temperature
    dev = logits.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    entropy = torch.empty(N if compute_entropy else 0, device=dev, dtype=torch.float32)
    stats = torch.empty(N, 2, device=dev, dtype=torch.float32)
    step = max(1, _TORCH_CHUNK_ELEMS // max(V, 1))
    nan = torch.tensor(float("nan"), device=dev)
    for r0 in range(0, N, step):
        x = logits[r0 : r0 + step].float()
        if tau is not None:
            x = torch.where(x < tau[r0 : r0 + step, None], float("-inf"), x)
        y = targets[r0 : r0 + step]
        valid = y != ignore_index
        in_range = (y >= 0) & (y < V)
        m = x.amax(-1)
        d = (x - m[:, None]) * inv_t
        e = d.exp()
        s = row_sum(e)
        logs = s.log()
        d_y = d.gather(-1, torch.where(valid & in_range, y, 0)[:, None]).squeeze(-1)
        logp[r0 : r0 + step] = torch.where(valid, torch.where(in_range, d_y - logs, nan), 0.0)
        if compute_entropy:
            ent = logs - row_sum(torch.where(e > 0, e * d, 0.0)) / s
            entropy[r0 : r0 + step] = torch.where(valid, torch.where(in_range, ent, nan), 0.0)
        stats[r0 : r0 + step] = torch.where(valid[:, None], torch.stack([m, logs], -1), 0.0)
    return logp, entropy, stats


def _token_logprobs_bwd_torch(
    grad_logp,
    grad_entropy,
    logits,
    targets,
    stats,
    entropy,
    temperature,
    ignore_index,
    col_offset=0,
    vocab=None,
    out_dtype=None,
    tau=None,
):
    N, n_cols = logits.shape
    inv_t = 1.0 / temperature
    V = n_cols if vocab is None else vocab
    out = torch.empty(N, n_cols, device=logits.device, dtype=out_dtype or logits.dtype)
    step = max(1, _TORCH_CHUNK_ELEMS // max(n_cols, 1))
    nan = torch.tensor(float("nan"), device=logits.device)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        x = logits[sl].float()
        if tau is not None:
            x = torch.where(x < tau[sl, None], float("-inf"), x)
        y = targets[sl]
        valid = y != ignore_index
        in_range = (y >= 0) & (y < V)
        g_logp = grad_logp[sl][:, None]
        log_p = ((x - stats[sl, :1]) * inv_t - stats[sl, 1:]).clamp(max=0.0)  # log p <= 0 (see the Triton kernel)
        p = log_p.exp()
        g = -g_logp * p
        if grad_entropy is not None:
            g -= grad_entropy[sl][:, None] * torch.where(p > 0, p * (log_p + entropy[sl][:, None]), 0.0)
        local = y - col_offset
        hit = valid & (local >= 0) & (local < n_cols)
        g.scatter_add_(-1, torch.where(hit, local, 0)[:, None], torch.where(hit[:, None], g_logp, 0.0))
        g = g * inv_t
        g = torch.where(valid[:, None], torch.where(in_range[:, None], g, nan), 0.0)
        out[sl] = g.to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Backend tables (also used by the fused op on its logits tiles)
# ----------------------------------------------------------------------------------------------------------------
FWD = {
    "cuda": torch.ops.lacot.token_logprobs_fwd_native,
    "triton": _token_logprobs_fwd_triton,
    "torch": _token_logprobs_fwd_torch,
}
BWD = {
    "cuda": torch.ops.lacot.token_logprobs_bwd_native,
    "triton": _token_logprobs_bwd_triton,
    "torch": _token_logprobs_bwd_torch,
}


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::token_logprobs (+ its backward op), fake kernels, autograd
# ----------------------------------------------------------------------------------------------------------------
@torch.library.register_kernel("lacot::token_logprobs", ("cpu", "cuda"))
def _token_logprobs_impl(logits, targets, temperature, ignore_index, compute_entropy, backend):
    _checks.check_targets_in_range(targets, logits.shape[1], ignore_index)
    name = _registry.resolve_backend(backend, logits.device)
    return FWD[name](logits, targets, temperature, ignore_index, compute_entropy)


@torch.library.register_fake("lacot::token_logprobs")
def _token_logprobs_fake(logits, targets, temperature, ignore_index, compute_entropy, backend):
    N = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (
        logits.new_empty(N, **f32),
        logits.new_empty(N if compute_entropy else 0, **f32),
        logits.new_empty(N, 2, **f32),
    )


@torch.library.register_kernel("lacot::token_logprobs_backward", ("cpu", "cuda"))
def _token_logprobs_backward_impl(
    grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, backend
):
    name = _registry.resolve_backend(backend, logits.device)
    return BWD[name](grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index)


@torch.library.register_fake("lacot::token_logprobs_backward")
def _token_logprobs_backward_fake(
    grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, backend
):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, compute_entropy, backend = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, targets, stats, entropy)
    ctx.args = (temperature, ignore_index, compute_entropy, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, targets, stats, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, backend = ctx.args
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.lacot.token_logprobs_backward(
            grad_logp.float().contiguous(),
            grad_entropy.float().contiguous() if compute_entropy else None,
            logits,
            targets,
            stats,
            entropy,
            temperature,
            ignore_index,
            backend,
        )
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("lacot::token_logprobs", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Registered op: lacot::token_logprobs_truncated (the softmax over the sampler's kept set {x >= tau})
# ----------------------------------------------------------------------------------------------------------------
def _fwd_truncated(name, logits, targets, tau, temperature, ignore_index, compute_entropy, deterministic):
    if name == "cuda":  # the compiled kernels take the threshold too (keep_above in csrc/token_logprobs_math.h)
        return FWD["cuda"](logits, targets, temperature, ignore_index, compute_entropy, tau)
    if name == "torch":
        return FWD["torch"](logits, targets, temperature, ignore_index, compute_entropy, tau, deterministic)
    return FWD[name](logits, targets, temperature, ignore_index, compute_entropy, tau=tau)


@torch.library.register_kernel("lacot::token_logprobs_truncated", ("cpu", "cuda"))
def _token_logprobs_truncated_impl(
    logits, targets, tau, temperature, ignore_index, compute_entropy, deterministic, backend
):
    _checks.check_targets_in_range(targets, logits.shape[1], ignore_index)
    name = _registry.resolve_backend(backend, logits.device)
    return _fwd_truncated(name, logits, targets, tau, temperature, ignore_index, compute_entropy, deterministic)


@torch.library.register_fake("lacot::token_logprobs_truncated")
def _token_logprobs_truncated_fake(
    logits, targets, tau, temperature, ignore_index, compute_entropy, deterministic, backend
):
    return _token_logprobs_fake(logits, targets, temperature, ignore_index, compute_entropy, backend)


@torch.library.register_kernel("lacot::token_logprobs_truncated_backward", ("cpu", "cuda"))
def _token_logprobs_truncated_backward_impl(
    grad_logp, grad_entropy, logits, targets, tau, stats, entropy, temperature, ignore_index, backend
):
    name = _registry.resolve_backend(backend, logits.device)
    if name == "cuda":
        return BWD["cuda"](grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, tau)
    return BWD[name](grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, tau=tau)


@torch.library.register_fake("lacot::token_logprobs_truncated_backward")
def _token_logprobs_truncated_backward_fake(
    grad_logp, grad_entropy, logits, targets, tau, stats, entropy, temperature, ignore_index, backend
):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context_truncated(ctx, inputs, output):
    logits, targets, tau, temperature, ignore_index, compute_entropy, _deterministic, backend = inputs
    logp, entropy, stats = output
    ctx.save_for_backward(logits, targets, tau, stats, entropy, logp)
    ctx.args = (temperature, ignore_index, compute_entropy, backend)


def _backward_truncated(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, targets, tau, stats, entropy, logp = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, backend = ctx.args
    grad_logits = None
    if ctx.needs_input_grad[0]:
        # A target outside the kept set has logp = -inf, a constant of the logits (tau is a constant selector):
        # its gradient is 0, so its upstream gradient is dropped before the kernels add it at the target.
        g = torch.where(logp == float("-inf"), 0.0, grad_logp.float()).contiguous()
        grad_logits = torch.ops.lacot.token_logprobs_truncated_backward(
            g,
            grad_entropy.float().contiguous() if compute_entropy else None,
            logits,
            targets,
            tau,
            stats,
            entropy,
            temperature,
            ignore_index,
            backend,
        )
    return grad_logits, None, None, None, None, None, None, None


torch.library.register_autograd(
    "lacot::token_logprobs_truncated", _backward_truncated, setup_context=_setup_context_truncated
)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    sampler_order: str = "vllm",
    deterministic: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each chosen token, ``log_softmax(logits / temperature)[targets]``, in fp32.

    With ``top_k`` / ``top_p`` / ``min_p`` (the sampler's settings), the log-prob and entropy are those of the
    distribution the sampler drew from: ``softmax(logits / T)`` renormalized over the kept set
    ``K = {v : logits[v] >= tau}`` (``tau`` from ``sampler_truncation.kept_threshold``: its docstring states the
    ordering and tie rules, vLLM's by default, ``sampler_order="hf"`` for transformers'). A target outside ``K``
    has probability 0 under the sampler: its log-prob is ``-inf`` and its gradient 0 (its entropy is that of the
    kept set, with its usual gradient). ``tau`` is a constant selector: gradients flow through kept logits only.
    Without these arguments the op is the plain one, bitwise.

    Args:
        logits: ``(..., V)`` float32 / bfloat16 / float16, any strides (copied only if the last one is not 1).
        targets: ``(...)`` int32 / int64 token ids in ``[0, V)``, or ``ignore_index``.
        temperature: finite, > 0; the distribution is ``softmax(logits / temperature)``.
        ignore_index: target value whose positions give exactly 0 (and 0 gradient).
        return_entropy: also return the entropy of the same distribution.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``auto`` honours ``LACOT_BACKEND``).
        top_k: int >= 1 or None; top_p, min_p: float in (0, 1] or None; sampler_order: ``"vllm" | "hf"``.
        deterministic: batch-invariant mode (None: ``LACOT_BATCH_INVARIANT``): each row's outputs and gradient
            are bitwise independent of the other rows and of the row count (``ops/batch_invariance.py`` says
            which backends already are by default).

    Returns:
        ``logp`` ``(...)`` float32, or ``(logp, entropy)`` both ``(...)`` float32. Both are differentiable with
        respect to ``logits``; the gradient has the dtype of ``logits``.

    Out-of-range target ids raise ValueError on CPU tensors; on CUDA tensors they give NaN unless
    ``LACOT_CHECK_BOUNDS=1`` is set (the check synchronizes the host with the GPU).
    """
    _checks.check_tensor("logits", logits)
    _checks.check_tensor("targets", targets)
    _checks.check_dtype("logits", logits, _checks.FLOAT_DTYPES)
    _checks.check_dtype("targets", targets, _checks.INDEX_DTYPES)
    _checks.check_same_device(("logits", logits), ("targets", targets))
    if logits.dim() < 1:
        raise ValueError(f"logits must have at least 1 dimension (..., V), got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets.shape must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    temperature = _checks.check_temperature(temperature)
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    if backend not in _registry.BACKENDS:
        raise ValueError(f"backend must be one of {_registry.BACKENDS}, got {backend!r}")
    _trunc.check_sampler_args(top_k, top_p, min_p, sampler_order)

    lead = logits.shape[:-1]
    x = _checks.unit_stride_rows(logits.reshape(-1, V))
    t = targets.reshape(-1).to(torch.int64).contiguous()
    det = _bi.enabled(deterministic)
    if _trunc.is_truncating(top_k, top_p, min_p) or det:
        tau = None
        if _trunc.is_truncating(top_k, top_p, min_p):
            tau = _trunc.kept_threshold(
                x.detach(), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, order=sampler_order,
                deterministic=det,
            )  # fmt: skip
        logp, entropy, _ = torch.ops.lacot.token_logprobs_truncated(
            x, t, tau, temperature, ignore_index, bool(return_entropy), det, backend
        )
    else:
        logp, entropy, _ = torch.ops.lacot.token_logprobs(
            x, t, temperature, ignore_index, bool(return_entropy), backend
        )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
