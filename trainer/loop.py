"""The one training loop every algorithm runs in.

Set-up (device, processes, seeds, model, reference, data, optimizer, schedule), then per step: the next batch
of examples -> ``algorithm.train_step`` (which calls :meth:`Trainer.backward` / :meth:`Trainer.optimizer_step`
as many times as it needs) -> metrics -> periodic evaluation and checkpoint. Everything a resumed run needs is
in the checkpoint; the training data order is a pure function of (seed, epoch, position).

Several processes: launch with ``torchrun --nproc_per_node=K -m lacot_kernels.trainer ...``; the policy is
wrapped in DDP (gloo on CPU, nccl on GPU), each rank takes ``batch_size / K`` prompts of every step.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .config import Config, dump_config
from .data import Example, Sampler, load_examples
from .metrics import MetricsLogger
from .modeling import Codec, Policy, count_params, load_model


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(cfg: Config):
    o, total = cfg.optim, max(1, cfg.train.steps * _updates_per_step(cfg))

    def f(update: int) -> float:
        if o.warmup_steps and update < o.warmup_steps:
            return (update + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (update - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _updates_per_step(cfg: Config) -> int:
    return cfg.grpo.updates_per_batch if cfg.train.algorithm == "grpo" else 1


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    trainer: Trainer | None = None


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self._init_distributed()
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        seed_all(cfg.train.seed + self.rank)
        from .algorithms import ALGORITHMS

        algo_cls = ALGORITHMS[cfg.train.algorithm]
        self.model, tokenizer, image_processor = load_model(cfg.model, self.device, trainable=algo_cls.trains)
        self.codec = Codec(tokenizer, image_processor, cfg.format, max_prompt_tokens=cfg.data.max_prompt_tokens)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.is_vision = image_processor is not None
        policy = Policy(self.model)
        if self.world > 1 and algo_cls.trains:
            # Batches without images leave the vision tower unused: let DDP look for unused parameters then.
            policy = torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=self.is_vision)
        self.policy = policy
        self._reference: torch.nn.Module | None = None
        self.train_examples: list[Example] = []
        if cfg.data.train_file:
            self.train_examples = load_examples(cfg.data.train_file, cfg.data, need_rationale=algo_cls.needs_rationale)
        elif algo_cls.trains:
            raise ValueError("data.train_file is empty: every training algorithm needs a data file")
        self.eval_examples: list[Example] = []
        if cfg.data.eval_file:
            self.eval_examples = load_examples(cfg.data.eval_file, cfg.data, need_rationale=False)[
                : cfg.train.eval_size
            ]
        self.sampler = Sampler(
            max(1, len(self.train_examples)),
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            rank=self.rank,
            world_size=self.world,
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.AdamW(
                params,
                lr=cfg.optim.lr,
                betas=tuple(cfg.optim.betas),
                eps=cfg.optim.eps,
                weight_decay=cfg.optim.weight_decay,
            )
            if params
            else None
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg)) if params else None
        self.step = 0
        self.updates = 0
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main, tensorboard=cfg.train.tensorboard)
        self.algorithm = algo_cls(self)

    # ---- processes --------------------------------------------------------------------------------------------

    def _init_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        want = self.cfg.train.device
        use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.is_main = self.rank == 0

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over processes (identity with one process)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=False)}

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    # ---- models -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference / reward model π_Φ: ``model.ref_path`` when set, else the LoRA adapter switched
        off, else the initial checkpoint ``model.path``."""
        if self.cfg.model.lora.r > 0 and not self.cfg.model.ref_path:
            peft_model = self.model
            with peft_model.disable_adapter():
                was = peft_model.training
                peft_model.eval()
                try:
                    yield peft_model
                finally:
                    peft_model.train(was)
            return
        if self._reference is None:
            # Loaded from model.path, not copied from the live policy: identical on resume.
            path = self.cfg.model.ref_path or self.cfg.model.path
            self._reference, _, _ = load_model(self.cfg.model, self.device, path=path, trainable=False)
        yield self._reference

    # ---- optimisation -------------------------------------------------------------------------------------------

    def no_sync(self, skip: bool):
        """Context for the forward *and* backward of a micro-batch that is not the step's last: DDP then skips
        its gradient all-reduce (it decides at forward time), the gradients accumulate locally."""
        if skip and isinstance(self.policy, torch.nn.parallel.DistributedDataParallel):
            return self.policy.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return float(norm)

    def micro_batches(self, n: int) -> list[slice]:
        mb = self.cfg.train.micro_batch_size or n
        return [slice(i, min(n, i + mb)) for i in range(0, n, mb)]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0

    # ---- data ---------------------------------------------------------------------------------------------------

    def next_examples(self) -> list[Example]:
        if self.cfg.train.batch_size % self.world:
            raise ValueError(
                f"train.batch_size ({self.cfg.train.batch_size}) must be divisible by the {self.world} processes"
            )
        return [self.train_examples[i] for i in self.sampler.next_indices(self.cfg.train.batch_size)]

    # ---- checkpoints --------------------------------------------------------------------------------------------

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        rngs = [checkpoint.rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.is_main:
            state = {
                "step": self.step,
                "updates": self.updates,
                "sampler": self.sampler.state(),
                "metric_lines": self.logger.lines,
                "algorithm": self.algorithm.state_dict(),
                "world": self.world,
            }
            payload = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "state": state,
            }
            checkpoint.save(self.ckpt_root, self.step, payload, self.cfg.train.keep_last)
        if self.world > 1:
            dist.barrier()

    def maybe_resume(self) -> bool:
        if self.is_main:
            checkpoint.clean_tmp(self.ckpt_root)
        path = checkpoint.find_resume(self.ckpt_root, self.cfg.train.resume)
        if path is None:
            if self.is_main:
                self.logger.truncate(0)
            return False
        blob = checkpoint.load(path, ["model", "optimizer", "scheduler", "rng", "state"])
        st = blob["state"]
        if st["world"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {st['world']} processes, this run has {self.world}")
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        checkpoint.set_rng_state(blob["rng"][self.rank])
        self.step, self.updates = st["step"], st["updates"]
        self.sampler.load_state(st["sampler"])
        self.algorithm.load_state_dict(st["algorithm"])
        self.logger.truncate(st["metric_lines"])
        if self.is_main:
            print(f"resumed from {path} (step {self.step})", file=sys.stderr)
        return True

    def save_final(self) -> Path | None:
        if not self.is_main:
            return None
        out = self.out_dir / "final"
        model = self.model
        if hasattr(model, "merge_and_unload"):  # LoRA: write merged weights so the next stage loads a plain model
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        tmp = self.out_dir / ".tmp-final"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    # ---- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        from .algorithms.bin import greedy_accuracy

        if not self.eval_examples:
            return {}
        mine = self.eval_examples[self.rank :: self.world]
        correct, total = greedy_accuracy(self, mine)
        t = self.all_sum(torch.tensor([correct, total], dtype=torch.float64, device=self.device))
        return {"eval/greedy_acc": float(t[0] / t[1]) if t[1] > 0 else 0.0}

    def _write_run_info(self) -> None:
        import json

        import transformers

        total, trainable = count_params(self.model)
        info = {
            "algorithm": self.cfg.train.algorithm,
            "world_size": self.world,
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "parameters": total,
            "trainable_parameters": trainable,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        (self.out_dir / "run.json").write_text(json.dumps(info, indent=2))

    # ---- the loop -------------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out_dir / "config.yaml")
            self._write_run_info()
        resumed = self.maybe_resume() if self.optimizer is not None else False
        if not resumed:
            self.algorithm.setup()
            total, trainable = count_params(self.model)
            if self.is_main and cfg.train.progress:
                print(
                    f"[{cfg.train.algorithm}] {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
                    f"{len(self.train_examples)} train / {len(self.eval_examples)} eval examples, world {self.world}",
                    file=sys.stderr,
                )
            if cfg.train.eval_every and self.eval_examples:
                self.logger.log({"step": 0, **self.evaluate()})
        else:
            self.algorithm.setup()
        bar = None
        if self.is_main and cfg.train.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.train.steps, initial=self.step, desc=cfg.train.algorithm, dynamic_ncols=True, file=sys.stderr
            )
        start = time.perf_counter()
        while self.step < cfg.train.steps:
            if cfg.train.time_budget_s and time.perf_counter() - start > cfg.train.time_budget_s:
                break
            t0 = time.perf_counter()
            stats = self.algorithm.train_step(self.algorithm.next_batch())
            self.step += 1
            stats = self.all_mean(stats)
            record = {"step": self.step, **stats, "lr": self.lr, "step_time_s": time.perf_counter() - t0}
            last = self.step == cfg.train.steps
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or last):
                record.update(self.evaluate())
            if self.step % cfg.train.log_every == 0 or "eval/greedy_acc" in record:
                self.logger.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in self.algorithm.progress_keys})
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < cfg.train.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        final = self.save_final() if self.optimizer is not None else None
        self.logger.close()
        from .metrics import read_metrics

        return TrainResult(self.out_dir, final, self.step, read_metrics(self.logger.path) if self.is_main else [], self)


def run(cfg: Config) -> TrainResult:
    """Train (or evaluate, for ``bin``) with one config; the entry point of the CLI and of the demo."""
    trainer = Trainer(cfg)
    finished = False
    try:
        if not trainer.algorithm.trains:
            result = trainer.algorithm.run()
            trainer.logger.close()
        else:
            result = trainer.fit()
        finished = True
        return result
    finally:
        # Leave the process group explicitly: a gloo group torn down by interpreter exit can abort a rank
        # ("terminate called without an active exception") after the work is done. No barrier after an
        # error: the other ranks may be waiting in a different collective.
        if dist.is_available() and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
