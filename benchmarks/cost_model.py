"""CPU-side cost model of the fused LM-head kernels on a GPU: FLOPs, HBM bytes and roofline time per GPU config.

It describes what our kernels move and compute (the tile engine's real tile orders and default workspace), not a
measurement: ``roofline_ms = max(FLOPs / dense peak, bytes / HBM bandwidth)`` is a lower bound, and
``estimate_ms`` divides the compute time by an assumed GEMM efficiency (``EFFICIENCY``) and adds the traffic of
elementwise kernels that run between GEMMs (GRPO's tile kernel). Both are *estimates*; only a GPU run
(``make gpu-check``) measures. ``python -m benchmarks.cost_model`` prints the table for the headline shapes.

Modes (bf16 inputs, every row valid):
  * ``fwd``: forward with entropy, 2·NDV. The weight is streamed once per group of GROUP_M row blocks (grouped
    program order; a group's ``hidden`` panels stay in L2); hidden read once; per-split statistics written.
  * ``fwd_bwd``: ``fwd`` + the Triton backward, 8·NDV: the dlogits kernel (2·NDV, weight once per row group,
    a 16-bit dlogits tile written), then per vocabulary block dX += G·W (G and W read, the fp32 dX accumulator
    read and written) and dW = Gᵀ·X (G and hidden read, dW written).
  * ``grpo``: fused GRPO with the gradient formed in the forward, 6·NDV: per row chunk an fp32 logits tile written
    by cuBLAS and read twice by the tile kernel, a 16-bit dlogits tile written and read by both GEMMs, and the
    fp32 dW accumulator read and written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GPUS = {
    # dense bf16 tensor-core peak (TFLOP/s), HBM bandwidth (TB/s)
    "H100-SXM": (989.4, 3.35),
    "H200": (989.4, 4.8),
}
EFFICIENCY = 0.70  # assumed fraction of the roofline reached by a good Hopper GEMM-bound kernel (estimate)
HEADLINE = [(8192, 4096, 152064), (8192, 4096, 128256)]
MODES = ("fwd", "fwd_bwd", "grpo")
BLOCK_M, GROUP_M = 128, 8
CUDA_WORKSPACE = 2048 << 20  # the tile engine's default on CUDA


@dataclass(frozen=True)
class Cost:
    mode: str
    N: int
    D: int
    V: int
    gpu: str
    flops: float
    bytes: float
    compute_ms: float
    memory_ms: float
    serial_ms: float  # traffic of elementwise kernels that cannot hide behind a GEMM (GRPO's tile kernel)

    @property
    def roofline_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def estimate_ms(self) -> float:
        return max(self.compute_ms / EFFICIENCY, self.memory_ms) + self.serial_ms


def _fwd_bytes(N: int, D: int, V: int, e: int) -> float:
    row_groups = math.ceil(math.ceil(N / BLOCK_M) / GROUP_M)
    splits = 64  # upper bound of the wave-aware split count: 4 fp32 partials per row and split
    return N * D * e + row_groups * V * D * e + splits * N * 16 + N * 16


def cost(mode: str, N: int, D: int, V: int, gpu: str = "H100-SXM", elem_bytes: int = 2) -> Cost:
    e = elem_bytes
    tflops, tbs = GPUS[gpu]
    ndv = float(N) * D * V
    serial = 0.0
    if mode == "fwd":
        flops, nbytes = 2 * ndv, _fwd_bytes(N, D, V, e)
    elif mode == "fwd_bwd":
        v_step = max(128, min(V, CUDA_WORKSPACE // (e * N)))
        blocks = math.ceil(V / v_step)
        dlogits = N * D * e + math.ceil(math.ceil(N / BLOCK_M) / GROUP_M) * V * D * e + N * V * e + N * 32
        dx = N * V * e + V * D * e + blocks * 2 * N * D * 4
        dw = N * V * e + blocks * N * D * e + V * D * e + V * D * 4
        flops, nbytes = 8 * ndv, _fwd_bytes(N, D, V, e) + dlogits + dx + dw + N * D * e
    elif mode == "grpo":
        rows = max(1, CUDA_WORKSPACE // (V * (4 + e)))
        chunks = math.ceil(N / rows)
        logits = chunks * V * D * e + N * D * e + N * V * 4  # GEMM reads W per chunk, writes the fp32 tile
        tile = 2 * N * V * 4 + N * V * e  # the tile kernel reads it twice and writes dlogits
        serial = tile
        grads = 2 * N * V * e + chunks * (V * D * e + 2 * V * D * 4) + 2 * N * D * e
        flops, nbytes = 6 * ndv, logits + tile + grads + V * D * e
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ms = lambda b: b / (tbs * 1e12) * 1e3  # noqa: E731
    return Cost(mode, N, D, V, gpu, flops, float(nbytes), flops / (tflops * 1e12) * 1e3, ms(nbytes), ms(serial))


def table(shapes=HEADLINE, gpus=tuple(GPUS)) -> list[str]:
    lines = [
        "| mode | N, D, V | GPU | TFLOP | HBM GB | compute ms | memory ms | roofline ms | estimate ms (GEMMs at "
        f"{EFFICIENCY:.0%}) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for N, D, V in shapes:
        for gpu in gpus:
            for mode in MODES:
                c = cost(mode, N, D, V, gpu)
                lines.append(
                    f"| {mode} | {N}, {D}, {V} | {gpu} | {c.flops / 1e12:.1f} | {c.bytes / 1e9:.1f} | "
                    f"{c.compute_ms:.1f} | {c.memory_ms:.1f} | {c.roofline_ms:.1f} | {c.estimate_ms:.1f} |"
                )
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
