"""The one registry of algorithms: command name -> the class that implements it, imported on first use.

The names are all that the config and the command line need, so this module imports nothing heavy (no torch):
``lacot-train --help`` and config validation work before any model code is loaded. Each algorithm is a small
module over the one training loop (:mod:`..loop`): see :class:`.base.Algorithm` for the contract.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class" inside this package. A new algorithm is one line here plus its module.
ALGORITHMS: dict[str, str] = {
    "sft": "sft:SFT",
    "dpo": "dpo:DPO",
    "grpo": "grpo:GRPO",
    "lacot": "lacot:LaCoT",
    "bin": "bin:BiN",
}


def get(name: str) -> Any:
    """The algorithm class registered as ``name`` (a ``ValueError`` naming the known ones otherwise)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: expected one of {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)
