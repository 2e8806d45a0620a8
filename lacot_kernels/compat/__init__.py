"""Functions with the names and signatures other RL frameworks use, computed by lacot_kernels' ops.

* :mod:`lacot_kernels.compat.verl` - ``logprobs_from_logits``, ``entropy_from_logits``,
  ``entropy_from_logits_with_chunking`` (``verl.utils.torch_functional``) and ``linear_cross_entropy``
  (``verl.utils.kernel.linear_cross_entropy``): swap the import, keep the call sites.
"""
