"""The one place where every `torch.ops.lacot.*` schema is defined, and where backends are chosen.

Schemas live here, in Python (the torchao pattern), so every op exists whether or not the compiled
extension `lacot_kernels._C` was built. The extension only *implements* the `*_native` kernel ops through
`TORCH_LIBRARY_IMPL(lacot, CPU|CUDA, m)`; the public ops are implemented in `lacot_kernels/ops/*.py`, which
also register their fake (meta) kernels and autograd formulas.

Backends (per call `backend=...`, else the `LACOT_BACKEND` environment variable, else `auto`):
  * ``cuda``   - the compiled extension: the CUDA kernel for CUDA tensors, its CPU twin (same math, OpenMP)
                 for CPU tensors;
  * ``triton`` - the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
  * ``torch``  - pure torch (chunked where it matters), the last resort;
  * ``auto``   - CUDA tensors: ``cuda`` if the extension has CUDA kernels, else ``triton``, else ``torch``;
                 CPU tensors: ``cuda`` (the CPU twin) if the extension is built, else ``torch``.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")

lib = torch.library.Library("lacot", "FRAGMENT")

# name -> schema. Public ops take the backend name as a string argument: under torch.compile it is a
# constant, and the choice is made inside the (opaque) op at run time, so tracing never sees a branch.
SCHEMAS: dict[str, str] = {
    # ---- per-token log-probs of chosen tokens, from logits ---------------------------------------------
    # stats (N, 2) fp32 = [row max of the raw logits, log sum_v exp((x_v - max) / T)]: the softmax normalizer
    # kept in two parts so that differences of huge logits are formed before the 1/T scaling (exact).
    "token_logprobs": "token_logprobs(Tensor logits, Tensor targets, float temperature, int ignore_index, "
    "bool compute_entropy, str backend) -> (Tensor logp, Tensor entropy, Tensor stats)",
    "token_logprobs_backward": "token_logprobs_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, "
    "Tensor targets, Tensor stats, Tensor entropy, float temperature, int ignore_index, str backend) -> Tensor",
    # ---- the same, fused with the LM head (hidden @ weight.T + bias), never holding N x V logits ------------
    "fused_linear_token_logprobs": "fused_linear_token_logprobs(Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor targets, float temperature, int ignore_index, bool compute_entropy, str backend, "
    "str precision='default') -> (Tensor logp, Tensor entropy, Tensor stats)",
    "fused_linear_token_logprobs_backward": "fused_linear_token_logprobs_backward(Tensor grad_logp, "
    "Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor stats, "
    "Tensor entropy, float temperature, int ignore_index, bool[3] needs_grad, str backend, "
    "str precision='default') -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
    # ---- GRPO policy loss (TRL semantics; ops/grpo.py) --------------------------------------------------------
    # logp/old_logp/ref_logp/mask (B, T) (mask fp32 weights), advantages (B,) fp32; loss () fp32,
    # stats (4,) fp32 = [mean kl, low, high, region clip fractions], row_scale (B,) = per-row loss weights c_b.
    "grpo_loss": "grpo_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, "
    "Tensor? dapo_normalizer, float beta, float eps_low, float eps_high, str loss_type, int max_completion_length, "
    "str backend) -> (Tensor loss, Tensor stats, Tensor row_scale)",
    "grpo_loss_backward": "grpo_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, "
    "Tensor mask, Tensor? ref_logp, Tensor row_scale, float beta, float eps_low, float eps_high, str backend) "
    "-> Tensor",
    # hidden (N, D) with N = B*T, targets/old_logp/mask/ref_logp (N,), advantages (B,). The gradients are formed
    # in the forward pass (for the inputs flagged in needs_grad; empty otherwise) and scaled in backward.
    "fused_linear_grpo_loss": "fused_linear_grpo_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    "Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, Tensor? dapo_normalizer, float temperature, "
    "float beta, float eps_low, float eps_high, str loss_type, int max_completion_length, bool[3] needs_grad, "
    "str backend, str precision='default') "
    "-> (Tensor loss, Tensor stats, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
    # ---- GRPO group advantages, LaCoT reward interpolation and sub-trajectory balance (ops/rewards.py, subtb.py)
    # Outputs and accumulation are fp32, fp64 for fp64 inputs; input gradients have the inputs' dtypes.
    # rewards (N,) contiguous, N % group_size == 0; scale "group" | "batch" | "none"; NaN rewards -> advantage 0.
    "group_advantages": "group_advantages(Tensor rewards, int group_size, str scale, float eps, bool unbiased, "
    "str backend) -> Tensor",
    "group_advantages_backward": "group_advantages_backward(Tensor grad, Tensor rewards, int group_size, "
    "str scale, float eps, bool unbiased, str backend) -> Tensor",
    # values (B, S) float, anchor_mask (B, S) bool, both unit stride along S; the backward returns fp32 / fp64.
    "interpolate_rewards": "interpolate_rewards(Tensor values, Tensor anchor_mask, str backend) -> Tensor",
    "interpolate_rewards_backward": "interpolate_rewards_backward(Tensor grad, Tensor anchor_mask, str backend) "
    "-> Tensor",
    # log_pf (B, T), log_term / log_reward (B, T+1) one dtype, lengths (B,) int64 -> per-row loss and pair weight.
    "subtb_loss": "subtb_loss(Tensor log_pf, Tensor log_term, Tensor log_reward, Tensor lengths, float decay, "
    "str backend) -> (Tensor loss, Tensor weight)",
    "subtb_loss_backward": "subtb_loss_backward(Tensor grad_loss, Tensor log_pf, Tensor log_term, "
    "Tensor log_reward, Tensor lengths, float decay, str backend) "
    "-> (Tensor grad_log_pf, Tensor grad_log_term, Tensor grad_log_reward)",
    # The same three families in csrc/rewards_{cpu.cpp,cuda.cu} (math in csrc/rewards_math.h). scale: 0 = group,
    # 1 = batch, 2 = none. Rows whose length is outside [0, T] give NaN (loss, weight and gradients).
    "group_advantages_fwd_native": "group_advantages_fwd_native(Tensor rewards, int group_size, int scale, "
    "float eps, bool unbiased) -> Tensor",
    "group_advantages_bwd_native": "group_advantages_bwd_native(Tensor grad, Tensor rewards, int group_size, "
    "int scale, float eps, bool unbiased) -> Tensor",
    "interpolate_rewards_fwd_native": "interpolate_rewards_fwd_native(Tensor values, Tensor anchor_mask) -> Tensor",
    "interpolate_rewards_bwd_native": "interpolate_rewards_bwd_native(Tensor grad, Tensor anchor_mask) -> Tensor",
    "subtb_fwd_native": "subtb_fwd_native(Tensor log_pf, Tensor log_term, Tensor log_reward, Tensor lengths, "
    "float decay) -> (Tensor loss, Tensor weight)",
    "subtb_bwd_native": "subtb_bwd_native(Tensor grad_loss, Tensor log_pf, Tensor log_term, Tensor log_reward, "
    "Tensor lengths, float decay) -> (Tensor grad_log_pf, Tensor grad_log_term, Tensor grad_log_reward)",
    # ---- kernels implemented in csrc/ (CPU twin + CUDA) -------------------------------------------------------
    # logits (N, V) with unit stride along V, targets (N,) int64. Ignored rows: logp = entropy = 0, stats = 0,
    # the row is not read. Targets outside [0, V) (other than ignore_index): logp = entropy = NaN.
    # tau (N,) fp32, optional: the sampler threshold of token_logprobs(top_k=...); logits below it are dropped.
    "token_logprobs_fwd_native": "token_logprobs_fwd_native(Tensor logits, Tensor targets, float temperature, "
    "int ignore_index, bool compute_entropy, Tensor? tau=None) -> (Tensor logp, Tensor entropy, Tensor stats)",
    # grad_logits (N, V), contiguous, logits dtype:
    #   (g_logp * (1[v == y] - p_v) - g_ent * p_v * (log p_v + H)) / T, exactly 0 on ignored rows.
    "token_logprobs_bwd_native": "token_logprobs_bwd_native(Tensor grad_logp, Tensor? grad_entropy, "
    "Tensor logits, Tensor targets, Tensor stats, Tensor entropy, float temperature, int ignore_index, "
    "Tensor? tau=None) -> Tensor",
    # ---- RL features (issue 14) -------------------------------------------------------------------------------
    # token_logprobs under the sampler's truncation: the softmax is over {v : logits[n, v] >= tau[n]} (tau (N,)
    # fp32 from ops/sampler_truncation.kept_threshold). A target below tau: logp = -inf (its gradient is 0).
    # tau None: no truncation (the op is then token_logprobs' batch-invariant variant: deterministic=True makes the
    # torch backend reduce in a fixed order, ops/batch_invariance.py; the other backends already do).
    "token_logprobs_truncated": "token_logprobs_truncated(Tensor logits, Tensor targets, Tensor? tau, "
    "float temperature, int ignore_index, bool compute_entropy, bool deterministic, str backend) "
    "-> (Tensor logp, Tensor entropy, Tensor stats)",
    "token_logprobs_truncated_backward": "token_logprobs_truncated_backward(Tensor grad_logp, Tensor? grad_entropy, "
    "Tensor logits, Tensor targets, Tensor? tau, Tensor stats, Tensor entropy, float temperature, int ignore_index, "
    "str backend) -> Tensor",
    # fused_linear_token_logprobs over whole-row tiles (ops/fused_linear.py): the sampler's truncation (tau (N,) fp32
    # per row, computed from each tile; empty when no filter is set) and/or batch invariance (fixed, zero-padded row
    # chunks of DET_ROWS). rows_step: the row chunk of both the forward and the backward (same logits bitwise).
    "fused_linear_token_logprobs_rowwise": "fused_linear_token_logprobs_rowwise(Tensor hidden, Tensor weight, "
    "Tensor? bias, Tensor targets, float temperature, int ignore_index, bool compute_entropy, int? top_k, "
    "float? top_p, float? min_p, str sampler_order, bool deterministic, int rows_step, str backend, "
    "str precision='default') -> (Tensor logp, Tensor entropy, Tensor stats, Tensor tau)",
    "fused_linear_token_logprobs_rowwise_backward": "fused_linear_token_logprobs_rowwise_backward("
    "Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    "Tensor stats, Tensor entropy, Tensor tau, float temperature, int ignore_index, bool[3] needs_grad, "
    "bool deterministic, int rows_step, str backend, str precision) "
    "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
    # grpo_loss with a per-token importance weight on the policy-gradient term (rollout correction, (B, T) fp32 or
    # None) and token- or sequence-level ratios (ratio_level "token" | "sequence" = GSPO).
    # stats (4,) as grpo_loss; seq_logratio (B,) fp32 = masked mean of logp - old_logp (0 for token level).
    "grpo_loss_rl": "grpo_loss_rl(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, "
    "Tensor? is_weight, Tensor? dapo_normalizer, float beta, float eps_low, float eps_high, str loss_type, "
    "int max_completion_length, str ratio_level, bool deterministic, str backend) "
    "-> (Tensor loss, Tensor stats, Tensor row_scale, Tensor seq_logratio)",
    "grpo_loss_rl_backward": "grpo_loss_rl_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, "
    "Tensor advantages, Tensor mask, Tensor? ref_logp, Tensor? is_weight, Tensor row_scale, Tensor seq_logratio, "
    "float beta, float eps_low, float eps_high, str ratio_level, bool deterministic, str backend) -> Tensor",
}

for _schema in SCHEMAS.values():
    lib.define(_schema)


def native_available(device_type: str, op: str = "token_logprobs_fwd_native") -> bool:
    """True when the compiled extension has a kernel of `lacot::<op>` for this device type ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lacot::{op}", key)


def triton_available(device_type: str) -> bool:
    """True when the Triton kernels can run on tensors of this device type."""
    from .ops import _triton_utils

    if not _triton_utils.HAS_TRITON:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and _triton_utils.INTERPRET


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    native_op: str | None = "token_logprobs_fwd_native",
    has_triton: bool = True,
) -> str:
    """Turn a requested backend into the one that runs: ``"cuda"``, ``"triton"`` or ``"torch"``.

    `native_op` names the compiled kernel op this op family uses (None: the family has no compiled kernel),
    `has_triton` whether it has Triton kernels. A backend the op family does not implement at all falls back
    to the `auto` order (so `LACOT_BACKEND=cuda` does not break ops that only exist in Triton / torch); a backend
    it implements but that cannot run here (extension not built, no Triton) raises RuntimeError.
    Raises ValueError for an unknown name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("LACOT_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"LACOT_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    dev = device.type
    if (backend == "cuda" and native_op is None) or (backend == "triton" and not has_triton):
        backend = "auto"
    if backend == "auto":
        if native_op is not None and native_available(dev, native_op):
            return "cuda"
        if has_triton and dev == "cuda" and triton_available(dev):
            return "triton"
        return "torch"
    if backend == "cuda" and not native_available(dev, native_op):
        raise RuntimeError(
            f"backend='cuda' was requested for {dev} tensors, but lacot_kernels._C has no {dev} kernels "
            "(the extension was not built, or built without CUDA). Reinstall with "
            "`pip install --no-build-isolation .` on a machine with nvcc, or use backend='triton'/'torch'."
        )
    if backend == "triton" and not triton_available(dev):
        raise RuntimeError(
            f"backend='triton' was requested for {dev} tensors, but Triton cannot run them here "
            "(Triton missing, or CPU tensors without TRITON_INTERPRET=1 set before importing lacot_kernels)."
        )
    return backend


def check_bounds_enabled() -> bool:
    """Host-side target range checks on CUDA tensors (they synchronize, so they are opt-in there)."""
    return os.environ.get("LACOT_CHECK_BOUNDS", "0").strip().lower() in ("1", "true", "yes", "on")
