"""Peak host memory of one DPO optimizer step, with and without micro-batching (CPU, fp32, tiny Qwen2).

    python tests/trainer/dpo_step_memory.py MICRO_BATCH_SIZE [PAIRS TOKENS]   ->  prints one JSON line

32 pairs of 256-token completions on a 4-layer, hidden-256 model; the pairs are synthetic (random tokens with
reference log-probs 0), so no sampling is involved. Reported: the process's peak resident set (``ru_maxrss``)
and its growth during the first step, i.e. what the step needs on top of the model and data already resident.
Run in a fresh process per setting: ``ru_maxrss`` never goes down.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import tempfile
from pathlib import Path

import torch


def measure(micro_batch_size: int, pairs: int = 32, tokens: int = 256) -> dict[str, float]:
    from lacot_kernels.trainer.config import load_config
    from lacot_kernels.trainer.data import Sampler
    from lacot_kernels.trainer.demo import tiny
    from lacot_kernels.trainer.loop import Trainer

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    tok = tiny.build_tokenizer()
    model = tiny.build_causal_lm(tok, hidden=256, layers=4, heads=4, seed=0)
    model.save_pretrained(tmp / "m")
    tok.save_pretrained(tmp / "m")
    (tmp / "d.jsonl").write_text(json.dumps({"question": "q", "answer": "1", "rationale": "r"}) + "\n")
    cfg = load_config(
        None,
        [],
        model={"path": str(tmp / "m")},
        data={"train_file": str(tmp / "d.jsonl")},
        train={
            "algorithm": "dpo",
            "out_dir": str(tmp / "out"),
            "batch_size": pairs,
            "micro_batch_size": micro_batch_size,
            "precision": "fp32",
            "progress": False,
        },
    )
    tr = Trainer(cfg)
    rng = random.Random(0)
    vocab = len(tok)

    def chain():
        ids = [rng.randrange(10, vocab) for _ in range(tokens)]
        return ids, [1] * tokens

    algo = tr.algorithm
    algo.pairs = [
        {"example": 0, "chosen": chain(), "rejected": chain(), "ref_chosen": 0.0, "ref_rejected": 0.0}
        for _ in range(pairs)
    ]
    algo.pair_sampler = Sampler(len(algo.pairs), seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tr.train_step()  # the first step: its peak includes AdamW's state (2 x 12 MiB here), allocated in it
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "micro_batch_size": micro_batch_size,
        "peak_rss_growth_mib": (after - before) / 1024,
        "peak_rss_mib": after / 1024,
    }


if __name__ == "__main__":
    print(json.dumps(measure(*map(int, sys.argv[1:]))))
