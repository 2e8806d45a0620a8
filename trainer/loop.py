"""The one training loop every algorithm runs in.

Set-up (device, processes, seeds, data, model, reference, optimizer, schedule), then per step (nanoGPT's
``train.py`` keeps this in one visible place; here it is :meth:`Trainer.train_step`)::

    prepared = algorithm.prepare(next batch)          # rollouts, rewards, fixed log-probs, split in micro-batches
    for each of algorithm.updates_per_batch updates:
        for each micro-batch:                         # gradient accumulation; DDP/FSDP sync on the last only
            loss = algorithm.loss(policy, micro-batch); loss.backward()
        clip, optimizer step, LR schedule, zero grad

then metrics, periodic evaluation and checkpoint. Everything a resumed run needs is in the checkpoint; the
training data order is a pure function of (seed, epoch, position).

Precision (``train.precision``): ``bf16-mixed`` keeps fp32 weights and AdamW state and runs forward (rollouts
included) under bf16 autocast; ``fp32``; ``bf16-pure`` stores and updates bf16 weights (opt-in, warns).

Several processes: ``torchrun --nproc_per_node=K -m lacot_kernels.trainer ...``; each rank takes ``batch_size / K``
prompts of every step; gloo on CPU, nccl on GPU. ``train.strategy=ddp`` replicates the policy (DDP);
``train.strategy=fsdp`` shards it with FSDP2 (``fully_shard``): one group per decoder layer / vision block and a
root group for the rest (embeddings, final norm, **LM head**). The root group is all-gathered for the whole
forward, so the fused ops always see the full LM-head weight; for generation and evaluation the root group is
gathered explicitly (:meth:`Trainer.gathered`). Frozen reference models are not sharded (every rank holds one).
Checkpoints are then sharded with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .algorithms import get as get_algorithm
from .algorithms.base import Prepared, TrainResult
from .config import Config, dump_config
from .data import Example, Sampler, load_examples
from .evaluate import greedy_accuracy
from .metrics import MetricsLogger
from .modeling import Codec, Policy, count_params, load_model, unwrap

__all__ = ["TrainResult", "Trainer", "run", "seed_all"]


def seed_all(seed: int) -> None:
    """Python, numpy, torch (CPU and every CUDA device) from one seed."""
    from transformers import set_seed

    set_seed(seed)


def lr_lambda(cfg: Config, updates_per_step: int):
    """Warmup then cosine / linear decay to ``min_lr_ratio`` (or constant).

    Hand-written rather than ``transformers.get_scheduler``: its warmup starts at lr 0 (ours at lr/warmup, so
    the first update is not wasted) and its linear schedule decays to 0, not to ``min_lr_ratio``.
    """
    o, total = cfg.optim, max(1, cfg.train.steps * updates_per_step)

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


BF16_PURE_WARNING = (
    "train.precision=bf16-pure: AdamW updates bf16 weights in place, and an update below 2^-8 of a weight rounds "
    "away (5 DPO steps at lr 5e-7 changed 0.6% of a model's weights, fp32 master weights 87.7%). Use bf16-mixed "
    "unless memory forces this."
)


def _load(model_cfg, device: torch.device, key: str, **kwargs):
    """:func:`load_model`, with a failure to find or read the checkpoint naming the config key and the value."""
    try:
        return load_model(model_cfg, device, **kwargs)
    except OSError as exc:
        path = kwargs.get("path") or model_cfg.path
        raise OSError(f"{key}={path!r} cannot be loaded: {exc}") from exc


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
        algo_cls = get_algorithm(cfg.train.algorithm)

        # Data first: a bad row should fail in a second, not after a model has loaded.
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

        # Precision: which dtype the weights are stored in, and whether forward runs under bf16 autocast.
        self.precision = cfg.resolved_precision(self.device.type == "cuda")
        if self.precision == "bf16-pure" and algo_cls.trains and self.is_main:
            warnings.warn(BF16_PURE_WARNING, stacklevel=2)
        bf16 = self.precision in ("bf16-mixed", "bf16-pure")
        frozen_dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if bf16 else "float32")
        if not algo_cls.trains:
            dtype = frozen_dtype
        elif cfg.model.lora.r > 0:  # the base is frozen (peft keeps the adapters in fp32)
            dtype = frozen_dtype
        else:
            dtype = "bfloat16" if self.precision == "bf16-pure" else "float32"
        self.model_cfg = replace(cfg.model, dtype=dtype)
        self.ref_cfg = replace(cfg.model, dtype=frozen_dtype)

        self.model, tokenizer, image_processor = _load(
            self.model_cfg, self.device, "model.path", trainable=algo_cls.trains
        )
        self.codec = Codec(tokenizer, image_processor, cfg.format, max_prompt_tokens=cfg.data.max_prompt_tokens)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.is_vision = image_processor is not None
        self.fsdp = self.world > 1 and algo_cls.trains and cfg.train.strategy == "fsdp"
        policy: torch.nn.Module = Policy(self.model)
        if self.fsdp:
            policy = self._shard(policy)
        elif self.world > 1 and algo_cls.trains:
            # Batches without images leave the vision tower unused: let DDP look for unused parameters then.
            policy = torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=self.is_vision)
        self.policy = policy
        self._reference: torch.nn.Module | None = None
        self.sampler = Sampler(
            max(1, len(self.train_examples)),
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            rank=self.rank,
            world_size=self.world,
        )
        self.step = 0
        self.updates = 0
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main, tensorboard=cfg.train.tensorboard)
        self.algorithm = algo_cls(self)
        # After sharding: FSDP replaces the parameters by sharded ones, and the optimizer must hold those.
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.params = params
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
        self.scheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.algorithm.updates_per_batch))
            if params
            else None
        )

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
            key = "model.ref_path" if self.cfg.model.ref_path else "model.path"
            self._reference, _, _ = _load(self.ref_cfg, self.device, key, path=path, trainable=False)
        yield self._reference

    def _shard(self, policy: Policy) -> torch.nn.Module:
        """FSDP2: one group per decoder layer / vision block (the model's ``_no_split_modules``), the root group
        (embeddings, final norm, LM head) on the Policy, so the head is gathered for the whole forward."""
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(unwrap(self.model), "_no_split_modules", None) or [])
        blocks = [m for m in self.model.modules() if type(m).__name__ in names]
        if not blocks:
            raise ValueError(
                f"train.strategy=fsdp: the model names no layer class to shard (_no_split_modules={names})"
            )
        for m in blocks:
            fully_shard(m)
        fully_shard(policy)
        # FSDP2 picks its root lazily, as the first module to run forward; generation and evaluation call the
        # layers without the Policy's forward (possibly before any training step), so fix the root now. There is
        # no public call for this in torch 2.14.
        policy._get_fsdp_state()._lazy_init()
        return policy

    # ---- optimisation -------------------------------------------------------------------------------------------

    def autocast(self):
        """bf16 autocast for bf16-mixed (weights stay fp32); nothing otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")

    @contextlib.contextmanager
    def gathered(self):
        """The model usable outside the policy's own forward (generation, scoring, evaluation): under FSDP the
        root group (embeddings, final norm, LM head) is all-gathered for the duration; the layer groups gather
        themselves in their forward hooks. A no-op without FSDP."""
        if not self.fsdp:
            yield
            return
        self.policy.unshard()
        try:
            yield
        finally:
            self.policy.reshard()

    def no_sync(self, skip: bool):
        """Context for the forward *and* backward of a micro-batch that is not the step's last: DDP then skips
        its gradient all-reduce (it decides at forward time), FSDP its reduce-scatter; gradients accumulate."""
        if skip and isinstance(self.policy, torch.nn.parallel.DistributedDataParallel):
            return self.policy.no_sync()
        if self.fsdp:
            return self._fsdp_sync(not skip)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _fsdp_sync(self, sync: bool):
        self.policy.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.policy.set_requires_gradient_sync(True)

    def train_step(self) -> dict[str, float]:
        """One step: prepare the batch, accumulate the micro-batches' gradients, update (``updates_per_batch`` x)."""
        algo = self.algorithm
        with self.gathered(), self.autocast():
            prepared: Prepared = algo.prepare(algo.next_batch())
        mbs, updates = prepared.micro_batches, algo.updates_per_batch
        sums: dict[str, float] = {"loss": 0.0}
        grad_norms = []
        for _ in range(updates):
            for i, mb in enumerate(mbs):
                with self.no_sync(i < len(mbs) - 1):
                    with self.autocast():
                        loss, stats = algo.loss(self.policy, mb)
                    loss.backward()  # outside autocast: backward runs each op in its forward's dtype anyway
                sums["loss"] += float(loss.detach())
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            grad_norms.append(self.optimizer_step())
        return {
            **{k: v / updates for k, v in sums.items()},
            **prepared.stats,
            "grad_norm": sum(grad_norms) / len(grad_norms),
        }

    def optimizer_step(self) -> float:
        """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping."""
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor over the shards
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return float(norm)

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
        """``step-<N>/``: written into a temporary directory by every rank, then renamed by rank 0 (atomic).

        DDP / one process: ``model.pt`` and ``optimizer.pt`` (rank 0). FSDP: ``dcp/``, the sharded model and
        optimizer states written by every rank with ``torch.distributed.checkpoint``.
        """
        rngs = [checkpoint.rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        tmp = checkpoint.begin(self.ckpt_root, self.step) if self.is_main else None
        if self.world > 1:
            dist.barrier()  # the temporary directory exists before any rank writes into it
            tmp = checkpoint.tmp_dir(self.ckpt_root, self.step)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        if self.is_main:
            state = {
                "step": self.step,
                "updates": self.updates,
                "sampler": self.sampler.state(),
                "metric_lines": self.logger.lines,
                "algorithm": self.algorithm.state_dict(),
                "world": self.world,
                "strategy": "fsdp" if self.fsdp else "ddp",
            }
            payload: dict[str, Any] = {"scheduler": self.scheduler.state_dict(), "rng": rngs, "state": state}
            if not self.fsdp:
                payload.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            checkpoint.write(tmp, payload)
            checkpoint.commit(self.ckpt_root, self.step, tmp, self.cfg.train.keep_last)
        if self.world > 1:
            dist.barrier()

    def maybe_resume(self) -> bool:
        if self.is_main:
            checkpoint.clean_tmp(self.ckpt_root)
        if self.world > 1:
            dist.barrier()  # no rank looks for checkpoints while rank 0 is cleaning
        path = checkpoint.find_resume(self.ckpt_root, self.cfg.train.resume)
        if path is None:
            if self.is_main:
                self.logger.truncate(0)
            return False
        blob = checkpoint.load(path, ["scheduler", "rng", "state"])
        st = blob["state"]
        if st["world"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {st['world']} processes, this run has {self.world}")
        if st.get("strategy", "ddp") != ("fsdp" if self.fsdp else "ddp"):
            raise ValueError(f"checkpoint {path} was written with train.strategy={st.get('strategy', 'ddp')}")
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
            sd = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(sd, checkpoint_id=str(path / "dcp"))
            set_state_dict(self.policy, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        else:
            weights = checkpoint.load(path, ["model", "optimizer"])
            self.model.load_state_dict(weights["model"])
            self.optimizer.load_state_dict(weights["optimizer"])
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
        state_dict = None
        if self.fsdp:  # every rank takes part in gathering the full weights; rank 0 writes them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            # Tied weights (an LM head sharing the embedding) come back as two gathered copies: keep the name
            # save_pretrained keeps, the first one, as named_parameters() lists shared parameters once.
            keep = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
            state_dict = {k.removeprefix("model."): v for k, v in full.items() if k.removeprefix("model.") in keep}
        if not self.is_main:
            return None
        out = self.out_dir / "final"
        model = self.model
        if hasattr(model, "merge_and_unload"):  # LoRA: write merged weights so the next stage loads a plain model
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        tmp = self.out_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        self.tokenizer.save_pretrained(tmp)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    # ---- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        mine = self.eval_examples[self.rank :: self.world]
        with self.gathered(), self.autocast():
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
            "strategy": "fsdp" if self.fsdp else ("ddp" if self.world > 1 else "single"),
            "precision": self.precision,
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
        with self.gathered(), self.autocast():
            self.algorithm.setup()  # after a resume too: it must rebuild the same state
        if not resumed:
            total, trainable = count_params(self.model)
            if self.is_main and cfg.train.progress:
                print(
                    f"[{cfg.train.algorithm}] {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
                    f"{len(self.train_examples)} train / {len(self.eval_examples)} eval examples, world {self.world}, "
                    f"precision {self.precision}",
                    file=sys.stderr,
                )
            if cfg.train.eval_every and self.eval_examples:
                self.logger.log({"step": 0, **self.evaluate()})
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
            stats = self.train_step()
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
            with trainer.autocast():
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
