"""lacot_kernels.trainer: a compact trainer for SFT, DPO, GRPO, LaCoT and BiN evaluation of (vision-)language models.

Installed under the import name ``lacot_kernels.trainer`` (the folder is ``trainer/``; PyPI's ``trainer`` is
another project). Command line: ``lacot-train`` or ``python -m lacot_kernels.trainer``::

    lacot-train demo                                   # the embedded end-to-end job, CPU, nothing downloaded
    lacot-train sft --config sft optim.lr=2e-5         # any algorithm: a (packaged or own) YAML + overrides
    lacot-train grpo --help                            # every option, its default and meaning
    torchrun --nproc_per_node=8 -m lacot_kernels.trainer grpo --config cfg.yaml train.strategy=fsdp

Every log-prob, advantage, reward and loss goes through a ``lacot_kernels`` op on hidden states.
"""

from typing import Any

from .config import Config, load_config

__all__ = ["Config", "TrainResult", "Trainer", "load_config", "run"]


def __getattr__(name: str) -> Any:
    # The loop (torch, transformers) loads on first use, so that the command line can answer --help and
    # --version, and name a missing `train` extra, before importing it.
    if name in ("Trainer", "TrainResult", "run"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
