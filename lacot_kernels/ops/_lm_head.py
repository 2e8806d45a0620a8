"""The LM-head tile engine: every op that needs ``hidden @ weight.T (+ bias)`` without holding N x V goes here.

It owns the things the fused-head callers used to write each for themselves:
  * the workspace rule: ``LACOT_FUSED_WORKSPACE_MB`` (default 128 MiB on CPU, 2048 MiB on CUDA, where fewer,
    larger tiles cut the read-modify-write traffic of the fp32 gradient accumulators) bounds every tile;
  * the precision rule: 16-bit inputs are multiplied on their own dtype with fp32 accumulation (tensor cores on
    a GPU); fp32 inputs are IEEE fp32 in every GEMM, forward and backward, whatever ``allow_tf32`` says, so the
    statistics saved by a forward and the softmax recomputed by its backward come from the same products;
  * the fp32-accumulated matmuls (in place where cuBLAS allows it, no fp32 temporary of the accumulator's size);
  * autocast: the ops choose their own precision, so a caller's autocast region is switched off inside them;
  * the two tile orders, each taking a per-tile function from its caller:
      - :func:`row_chunks`: chunks of rows x the whole vocabulary (fp32 logits tile; the per-row kernels and the
        GRPO gradient formed in the forward need whole rows), then dX = G W and dW += G^T X;
      - :func:`vocab_blocks`: vocabulary blocks x chunks of rows (the caller's tile function returns dlogits for
        one block, e.g. the fused Triton kernel that recomputes the logits in registers); dW of a block is
        finished before the next one starts, so no V x D fp32 buffer exists;
      - :func:`tiles`: plain (row chunk x vocabulary block) fp32 logits tiles for no-gradient statistics.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

from ._triton_utils import jit, tl

WORKSPACE_ENV = "LACOT_FUSED_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = {"cpu": 128.0, "cuda": 2048.0}
PRECISIONS = ("default", "high")
# Row blocks per group of the program order: a group's programs walk the vocabulary together, so GROUP_M panels of
# `hidden` (1 MiB each at BLOCK_M=128, D=4096 bf16) stay in L2 while each weight tile is read once per group.
GROUP_M = 8


# ----------------------------------------------------------------------------------------------------------------
# Triton pieces shared by the LM-head kernels: program order and the fp32-accumulated logits tile
# ----------------------------------------------------------------------------------------------------------------
@jit
def _grouped_pid(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time: consecutive programs share row
    blocks (their `hidden` panels) and, across the group, column blocks (their weight tiles)."""
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


@jit
def _logits_block(
    hidden_ptr,
    rows,
    rmask,
    stride_h,
    weight_ptr,
    cols,
    cmask,
    stride_w,
    D,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 (BLOCK_M x BLOCK_N) tile of hidden[rows] @ weight[cols].T. Offsets are int64: rows x D and V x D
    pass 2^31 elements at LM-head sizes (V = 152064 with D >= 14124)."""
    row_off = rows.to(tl.int64)[:, None] * stride_h
    col_off = cols.to(tl.int64)[:, None] * stride_w
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < D
        # One 64-bit offset per element (not a 64-bit base then a 32-bit step): every 2-D address is formed in
        # int64, which the sm_90 compile check verifies in the IR.
        x = tl.load(hidden_ptr + (row_off + kk[None, :]), mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(weight_ptr + (col_off + kk[None, :]), mask=cmask[:, None] & kmask[None, :], other=0.0)
        if DOT_FP32:
            # fp32 inputs stay IEEE fp32 (no TF32), the rule of every GEMM of this engine; under the interpreter
            # 16-bit dots are wrong (triton#11584), so they are upcast there too.
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


def wave_splits(row_blocks: int, col_tiles: int, sms: int, *, ctas_per_sm: int = 1, max_splits: int = 64) -> int:
    """Vocabulary splits per row block so that whole waves of programs cover the work: minimizes
    (waves x column tiles per program), the critical path when every program runs at the same speed; the smallest
    count within 2% of the best wins."""
    slots = max(1, sms * ctas_per_sm)
    costs = {}
    for s in range(1, min(max_splits, col_tiles) + 1):
        costs[s] = -(-(row_blocks * s) // slots) * -(-col_tiles // s)
    # Within 2% of the best, fewer splits win (fewer partial statistics to write and merge).
    floor = min(costs.values())
    return min(s for s, c in costs.items() if c <= 1.02 * floor)


# ----------------------------------------------------------------------------------------------------------------
# Host side: workspace, precision, GEMMs, tile orders
# ----------------------------------------------------------------------------------------------------------------


def workspace_bytes(device: torch.device) -> int:
    """Bytes one LM-head tile (logits and/or dlogits) may take on `device`."""
    env = os.environ.get(WORKSPACE_ENV, "").strip()
    mb = float(env) if env else DEFAULT_WORKSPACE_MB.get(device.type, 128.0)
    return max(1, int(mb * (1 << 20)))


def rows_per_chunk(V: int, bytes_per_elem: int, device: torch.device) -> int:
    """Rows of a (rows x V) tile of `bytes_per_elem` bytes per element that fit the workspace (at least 1)."""
    return max(1, workspace_bytes(device) // (max(V, 1) * bytes_per_elem))


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    # torch's fp32 GEMMs follow allow_tf32 on CUDA; the Triton kernels use IEEE fp32. One rule for both.
    if device.type != "cuda":
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32, without rounding the product to a 16-bit dtype."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        with _ieee_fp32(a.device):
            return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation, in place (no temporary of acc's size on CUDA or for fp32)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        with _ieee_fp32(a.device):
            acc.addmm_(a, b)
        return
    if acc.is_cuda and a.dtype == b.dtype:
        try:
            # One cuBLAS call: 16-bit A and B, fp32 C accumulated in place (beta = 1).
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
        except (AttributeError, RuntimeError):  # a torch without addmm.dtype_out for these dtypes
            pass
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
        return
    acc.addmm_(a.float(), b.float())


def split_hi_lo(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 g = hi + lo + O(eps^2 |g|) with hi, lo in `dtype`: two 16-bit GEMMs then carry g to ~fp32 accuracy."""
    hi = g.to(dtype)
    return hi, (g - hi.float()).to(dtype)


def logits_tile(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 (rows x cols) tile of h @ w.T + bias."""
    x = mm_f32(h, w.t())
    return x if bias is None else x.add_(bias.float())


def no_autocast(fn: Callable) -> Callable:
    """The ops choose their own precision (fp32 accumulation): a caller's autocast region must not recast the
    GEMMs inside them to 16 bits."""

    @functools.wraps(fn)
    def wrapper(hidden, *args):
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, *args)

    return wrapper


def _grad_buffers(n: int, D: int, V: int, needs, device: torch.device):
    f32 = dict(device=device, dtype=torch.float32)
    gh = torch.zeros(n, D, **f32) if needs[0] else None
    gw = torch.zeros(V, D, **f32) if needs[1] else None
    gb = torch.zeros(V, **f32) if needs[2] else None
    return gh, gw, gb


def _accumulate(g, w, h, gh, gw, gb):
    """gh += g @ w, gw += g^T @ h, gb += sum_rows g (each only when its buffer exists), fp32 accumulation.

    `g` is either a 16-bit tile (precision "default": dlogits already rounded to the GEMM dtype, as every peer
    does), an fp32 tile (fp32 inputs, or CPU: fp32 GEMMs), or a (hi, lo) pair of 16-bit tiles (precision "high"
    on a GPU: two tensor-core GEMMs per product instead of one)."""
    parts = g if isinstance(g, tuple) else (g,)
    for part in parts:
        if gh is not None:
            addmm_f32_(gh, part, w)
        if gw is not None:
            addmm_f32_(gw, part.t(), h)
        if gb is not None:
            gb += part.float().sum(0)


def row_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    bytes_per_elem: int,
    tile_fn: Callable[[torch.Tensor, torch.Tensor], object],
    needs=(False, False, False),
    logits_fn: Callable = logits_tile,
    rows_step: int | None = None,
    pad: bool = False,
):
    """Chunks of `rows` x the whole vocabulary: ``tile_fn(logits (r, V) fp32, chunk_rows (r,))`` sees each fp32
    logits tile (it may overwrite it) and returns its dlogits (see :func:`_accumulate`) or None.

    Returns (grad_hidden over `rows` (n, D) fp32, grad_weight (V, D) fp32, grad_bias (V,) fp32), each None when
    not in `needs`. `bytes_per_elem` is what one logits element costs the caller (fp32 tile + its own buffers).
    `rows_step` fixes the chunk size (default: what the workspace allows); a forward and the backward that
    recomputes its tiles pass the same one, so that both see bitwise the same logits. With `pad`, the last chunk
    is padded with zero rows to `rows_step`: every GEMM then has one shape, and a row's logits and its
    grad_hidden do not depend on which other rows share its chunk (batch invariance)."""
    n, D = rows.numel(), hidden.shape[1]
    V = weight.shape[0]
    gh, gw, gb = _grad_buffers(n, D, V, needs, hidden.device)
    step = rows_step if rows_step is not None else rows_per_chunk(V, bytes_per_elem, hidden.device)
    for r0 in range(0, n, step):
        chunk = rows[r0 : r0 + step]
        r = chunk.numel()
        h = hidden[chunk]
        short = pad and r < step
        if short:
            h = torch.cat([h, h.new_zeros(step - r, D)])
        logits = logits_fn(h, weight, bias)
        g = tile_fn(logits[:r] if short else logits, chunk)
        if g is not None:
            gh_c = gh[r0 : r0 + step] if gh is not None else None
            if short:
                # The same GEMM shapes as a full chunk: zero dlogits rows for the padding, a full-size gh block.
                parts = g if isinstance(g, tuple) else (g,)
                parts = tuple(torch.cat([p, p.new_zeros(step - r, p.shape[1])]) for p in parts)
                g = parts if isinstance(g, tuple) else parts[0]
                gh_full = torch.zeros(step, D, device=h.device, dtype=torch.float32) if gh is not None else None
                _accumulate(g, weight, h, gh_full, gw, gb)
                if gh is not None:
                    gh_c.copy_(gh_full[:r])
            else:
                _accumulate(g, weight, h, gh_c, gw, gb)
        del logits, g  # release this tile before the next one is allocated: one tile alive at a time
    return gh, gw, gb


def vocab_blocks(
    h_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bytes_per_elem: int,
    tile_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, slice, int], object],
    needs,
):
    """Vocabulary blocks x row chunks of the (already compacted) rows `h_rows` (n, D).

    ``tile_fn(h_chunk, w_block, b_block, row_slice, v0)`` returns the dlogits of one (row chunk x vocabulary block)
    tile (see :func:`_accumulate`). dW of a block is finished (cast to the weight's dtype) before the next block
    starts. Returns (grad_hidden (n, D) fp32 | None, grad_weight (V, D) weight dtype | None, grad_bias (V,) fp32 |
    None). `bytes_per_elem` is what one tile element costs the tile function."""
    n, D = h_rows.shape
    V = weight.shape[0]
    dev = h_rows.device
    tile_elems = max(1, workspace_bytes(dev) // bytes_per_elem)
    # Whole row range per block when the workspace allows (dW of a block is then one GEMM), at least 128 columns.
    r_step = max(1, min(n, tile_elems // 128))
    v_step = max(128, min(V, tile_elems // max(r_step, 1)))
    gh = torch.zeros(n, D, device=dev, dtype=torch.float32) if needs[0] else None
    gw = torch.zeros_like(weight) if needs[1] else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if needs[2] else None
    for v0 in range(0, V, v_step):
        w_blk = weight[v0 : v0 + v_step]
        b_blk = bias[v0 : v0 + v_step] if bias is not None else None
        gw_acc = torch.zeros(w_blk.shape, device=dev, dtype=torch.float32) if needs[1] else None
        for r0 in range(0, n, r_step):
            sl = slice(r0, r0 + r_step)
            h = h_rows[sl]
            g = tile_fn(h, w_blk, b_blk, sl, v0)
            g_b = gb[v0 : v0 + v_step] if gb is not None else None
            _accumulate(g, w_blk, h, gh[sl] if gh is not None else None, gw_acc, g_b)
            del g  # one tile alive at a time
        if needs[1]:
            gw[v0 : v0 + v_step] = gw_acc.to(weight.dtype)
    return gh, gw, gb


def tiles(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, tile_elems: int | None = None
) -> Iterator[tuple[slice, int, torch.Tensor]]:
    """(row slice, first column, fp32 logits tile) over (row chunk x vocabulary block) tiles of at most
    `tile_elems` elements (default: the workspace in fp32). For statistics computed without gradients."""
    N, V = hidden.shape[0], weight.shape[0]
    elems = tile_elems if tile_elems is not None else workspace_bytes(hidden.device) // 4
    rows = max(1, min(N, 4096))
    cols = max(256, elems // rows)
    for r0 in range(0, N, rows):
        h = hidden[r0 : r0 + rows]
        for v0 in range(0, V, cols):
            yield (
                slice(r0, r0 + rows),
                v0,
                logits_tile(h, weight[v0 : v0 + cols], None if bias is None else bias[v0 : v0 + cols]),
            )
