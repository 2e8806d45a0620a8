"""lacot_kernels: fused CUDA / Triton kernels for RL and variational fine-tuning of (vision-)language models.

Public ops (all registered as ``torch.ops.lacot.*`` custom ops with fake kernels and autograd):

* :func:`token_logprobs` - per-token log-prob (and entropy) of chosen tokens from logits;
* :func:`fused_linear_token_logprobs` - the same straight from hidden states and the LM head, without ever
  holding the N x V logits.
* :func:`grpo_loss` / :func:`fused_linear_grpo_loss` - TRL's GRPO policy loss (clipped surrogate, k3 KL, the
  grpo / bnpo / dr_grpo / dapo aggregations), from per-token log-probs or straight from the LM head.

Composites of torch ops (no custom op needed; they compile with ``fullgraph=True``):

* :func:`sequence_logprobs` and :func:`dpo_loss` - per-sequence log-probs and TRL's DPO losses;
* :func:`bin_rank` - LaCoT's BiN answer ranking over N rationales.

Set ``TRITON_INTERPRET=1`` *before* importing this package to run the Triton kernels on CPU tensors.
"""

from __future__ import annotations

import logging
import os

from . import _registry  # noqa: F401  (defines every torch.ops.lacot schema first)

_log = logging.getLogger(__name__)

# The compiled kernels are optional: without them every op still runs through Triton / torch.
if os.environ.get("LACOT_DISABLE_EXT", "0") != "1":
    try:
        from . import _C  # noqa: F401  (registers TORCH_LIBRARY_IMPL(lacot, CPU|CUDA) kernels)
    except ImportError as exc:  # not built, or built against another torch
        _log.debug("lacot_kernels._C not loaded (%s); using the Triton / torch backends", exc)

# (lacot_kernels.hf imports no transformers at import time)
from . import hf, reference  # noqa: E402
from ._registry import BACKENDS, native_available, resolve_backend, triton_available  # noqa: E402
from .ops import bin as _bin  # noqa: E402
from .ops import fused_linear as _fused_linear  # noqa: E402
from .ops import grpo as _grpo  # noqa: E402
from .ops import grpo_rl as _grpo_rl  # noqa: E402, F401  (registers lacot::grpo_loss_rl)
from .ops import is_correction as _is_correction  # noqa: E402
from .ops import preference as _preference  # noqa: E402
from .ops import rewards as _rewards  # noqa: E402
from .ops import sampler_truncation as _sampler_truncation  # noqa: E402
from .ops import subtb as _subtb  # noqa: E402
from .ops import token_logprobs as _token_logprobs  # noqa: E402

fused_linear_token_logprobs = _fused_linear.fused_linear_token_logprobs
token_logprobs = _token_logprobs.token_logprobs
grpo_loss = _grpo.grpo_loss
fused_linear_grpo_loss = _grpo.fused_linear_grpo_loss
dpo_loss = _preference.dpo_loss
sequence_logprobs = _preference.sequence_logprobs
bin_rank = _bin.bin_rank
group_advantages = _rewards.group_advantages
interpolate_rewards = _rewards.interpolate_rewards
reward_anchors = _rewards.reward_anchors
subtb_loss = _subtb.subtb_loss
kept_threshold = _sampler_truncation.kept_threshold
rollout_is_weights = _is_correction.rollout_is_weights

# nn.Module surfaces (Liger-style losses) over the public functions above.
from .modules import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearTokenLogprobs  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FusedLinearDPOLoss",
    "FusedLinearGRPOLoss",
    "FusedLinearTokenLogprobs",
    "bin_rank",
    "dpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_token_logprobs",
    "group_advantages",
    "grpo_loss",
    "hf",
    "interpolate_rewards",
    "kept_threshold",
    "native_available",
    "reference",
    "resolve_backend",
    "reward_anchors",
    "rollout_is_weights",
    "sequence_logprobs",
    "subtb_loss",
    "token_logprobs",
    "triton_available",
    "__version__",
]
