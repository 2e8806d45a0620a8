"""Op families. Importing this package registers every op's implementation, fake and autograd."""

from . import bin, fused_linear, grpo, preference, rewards, subtb, token_logprobs  # noqa: F401
