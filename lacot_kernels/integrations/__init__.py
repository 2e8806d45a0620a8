"""Drop-in patches that route other trainers' log-prob computations through lacot_kernels' ops.

* :mod:`lacot_kernels.integrations.trl` - ``patch()`` / ``unpatch()`` / ``patched()`` for TRL's GRPO, DPO and every
  other trainer that computes per-token log-probs through ``trl.trainer.utils``.

Submodules are imported on demand (``from lacot_kernels.integrations import trl``), so importing lacot_kernels
never imports a trainer.
"""
