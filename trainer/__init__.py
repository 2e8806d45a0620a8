"""lacot_kernels.trainer: a compact trainer for SFT, DPO, GRPO, LaCoT and BiN evaluation of (vision-)language models.

Installed under the import name ``lacot_kernels.trainer`` (the folder is ``trainer/``; PyPI's ``trainer`` is
another project). Command line: ``lacot-train`` or ``python -m lacot_kernels.trainer``::

    lacot-train demo                                   # the embedded end-to-end job, CPU, nothing downloaded
    lacot-train sft  cfg.yaml optim.lr=2e-5            # any algorithm: a YAML config + dotted overrides
    torchrun --nproc_per_node=8 -m lacot_kernels.trainer grpo cfg.yaml

Every log-prob, advantage, reward and loss goes through a ``lacot_kernels`` op on hidden states.
"""

from .config import Config, load_config
from .loop import Trainer, TrainResult, run

__all__ = ["Config", "TrainResult", "Trainer", "load_config", "run"]
