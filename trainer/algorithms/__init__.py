"""Algorithms: small modules over one training loop (:mod:`..loop`).

Each is a class with ``train_step(batch) -> metrics`` that calls ``trainer.backward`` / ``trainer.optimizer_step``
(``bin`` evaluates instead: ``run()``). Every log-prob, reward, advantage and loss goes through a
``lacot_kernels`` op on hidden states: no B x T x V logits are formed.
"""

from __future__ import annotations

from typing import Any


class Algorithm:
    trains = True  # False: evaluation only (no optimizer; model loaded frozen)
    needs_rationale = False  # the training file must have a rationale on every row
    progress_keys: tuple[str, ...] = ("loss",)

    def __init__(self, trainer):
        self.tr = trainer
        self.cfg = trainer.cfg

    def setup(self) -> None:
        """Once before the first step (and again after a resume, which must rebuild the same state)."""

    def next_batch(self) -> Any:
        return self.tr.next_examples()

    def train_step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def linear_schedule(start: float, end: float, horizon: int, step: int) -> float:
    """``start -> end`` linearly over ``horizon`` steps, then ``end`` (LaCoT's δ and reward temperature)."""
    if horizon <= 0:
        return end
    return start + (end - start) * min(1.0, step / horizon)


from .bin import BiN  # noqa: E402
from .dpo import DPO  # noqa: E402
from .grpo import GRPO  # noqa: E402
from .lacot import LaCoT  # noqa: E402
from .sft import SFT  # noqa: E402

ALGORITHMS = {"sft": SFT, "dpo": DPO, "grpo": GRPO, "lacot": LaCoT, "bin": BiN}
