"""Peak host memory of one DPO optimizer step, with and without micro-batching (CPU, fp32, tiny Qwen2).

    python tests/trainer/dpo_step_memory.py MICRO_BATCH_SIZE [PAIRS TOKENS]   ->  prints one JSON line

32 pairs of 256-token completions on a 4-layer, hidden-256 model; the pairs are synthetic (random tokens with
reference log-probs 0), so no sampling is involved. Reported: the process's peak resident set (``ru_maxrss``)
and the growth of its resident set during the first step (sampled every millisecond), i.e. what the step needs
on top of the model and data already resident.
Run in a fresh process per setting: ``ru_maxrss`` never goes down.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import tempfile
import threading
import time
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
    # The growth is the peak of the *current* resident set during the step (sampled every millisecond) over the
    # resident set just before it. ru_maxrss alone cannot give it: a transient peak while the model was built or
    # saved can exceed the step's, and then the step shows no growth at all.
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        tr.train_step()  # the first step: its peak includes AdamW's state (2 x 12 MiB here), allocated in it
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {
        "micro_batch_size": micro_batch_size,
        "peak_rss_growth_mib": (peak[0] - before) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


if __name__ == "__main__":
    print(json.dumps(measure(*map(int, sys.argv[1:]))))
