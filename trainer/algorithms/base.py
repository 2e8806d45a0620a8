"""What an algorithm supplies to the one training loop, and what a run returns.

The loop (:meth:`..loop.Trainer.train_step`) owns everything that touches the optimizer::

    prepared = algorithm.prepare(algorithm.next_batch())        # rollouts, rewards, fixed log-probs (no grad)
    for update in range(algorithm.updates_per_batch):           # GRPO: several updates per generated batch
        for i, mb in enumerate(prepared.micro_batches):         # gradient accumulation
            with no_sync(i < last), autocast:                   # DDP/FSDP sync only on the last micro-batch
                loss, stats = algorithm.loss(policy, mb)
            loss.backward()
        clip, optimizer.step(), scheduler.step(), zero_grad

so an algorithm never calls backward or steps. Its contract: the losses of the micro-batches **add up** to the
loss of the whole batch (each micro-batch is already weighted by its share), and so do the ``stats`` that
``loss`` returns; ``prepare``'s own ``stats`` are per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Prepared:
    """One batch made ready for the optimizer: the micro-batches (opaque to the loop) and batch-level metrics."""

    micro_batches: list[Any]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    trainer: Any = None  # the loop.Trainer that produced it


class Algorithm:
    trains = True  # False: evaluation only (no optimizer; model loaded frozen): implement run() instead
    needs_rationale = False  # the training file must have a rationale on every row
    progress_keys: tuple[str, ...] = ("loss",)

    def __init__(self, trainer):
        self.tr = trainer
        self.cfg = trainer.cfg

    @property
    def updates_per_batch(self) -> int:
        """Optimizer updates per prepared batch (the loop also sizes the LR schedule with it)."""
        return 1

    def setup(self) -> None:
        """Once before the first step (and again after a resume, which must rebuild the same state)."""

    def next_batch(self) -> Any:
        return self.tr.next_examples()

    def prepare(self, batch: Any) -> Prepared:
        """Everything before the gradient: rollouts, rewards, advantages, fixed log-probs; split in micro-batches."""
        raise NotImplementedError

    def loss(self, policy: torch.nn.Module, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the batch loss (a scalar with grad) and additive metrics."""
        raise NotImplementedError

    def run(self) -> TrainResult:
        """Evaluation-only algorithms (``trains = False``) do their whole job here."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def chunks(n: int, size: int) -> list[slice]:
    """``[0, n)`` in slices of ``size`` (0 = one slice): the micro-batches of a batch of ``n`` rows."""
    size = size or max(1, n)
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def compute_dtype(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    """Hidden states, LM-head weight and bias in the autocast dtype when autocast is on (bf16-mixed).

    The lacot_kernels ops take one floating dtype for all three and accumulate in fp32 whatever it is; under
    autocast the backbone hands over fp32 hidden states (the final norm upcasts) and the head weight is the fp32
    master copy, so cast both as autocast would cast a ``Linear``: the gradient flows back to the fp32 weight.
    """
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dt), w.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return h, w, bias


def linear_schedule(start: float, end: float, horizon: int, step: int) -> float:
    """``start -> end`` linearly over ``horizon`` steps, then ``end`` (LaCoT's δ and reward temperature)."""
    if horizon <= 0:
        return end
    return start + (end - start) * min(1.0, step / horizon)
