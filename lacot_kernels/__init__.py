"""lacot_kernels: fused CUDA / Triton kernels for RL and variational fine-tuning of (vision-)language models.

Public ops (all registered as ``torch.ops.lacot.*`` custom ops with fake kernels and autograd):

* :func:`token_logprobs` - per-token log-prob (and entropy) of chosen tokens from logits;
* :func:`fused_linear_token_logprobs` - the same straight from hidden states and the LM head, without ever
  holding the N x V logits.

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

from . import reference  # noqa: E402
from ._registry import BACKENDS, native_available, resolve_backend, triton_available  # noqa: E402
from .ops import fused_linear as _fused_linear  # noqa: E402
from .ops import token_logprobs as _token_logprobs  # noqa: E402

fused_linear_token_logprobs = _fused_linear.fused_linear_token_logprobs
token_logprobs = _token_logprobs.token_logprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "fused_linear_token_logprobs",
    "native_available",
    "reference",
    "resolve_backend",
    "token_logprobs",
    "triton_available",
    "__version__",
]
