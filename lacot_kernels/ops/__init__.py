"""Op families. Importing this package registers every op's implementation, fake and autograd."""

from . import fused_linear, token_logprobs  # noqa: F401
