"""Typed configuration: dataclasses, loaded from a YAML file and overridden by dotted ``section.key=value`` pairs.

Every default is visible here (nanoGPT style) and the whole resolved config is written to
``<out_dir>/config.yaml`` at start-up. An unknown section or key, or a value of the wrong type, is a
``ValueError`` that names the source (file or command line), the key, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .algorithms import ALGORITHMS

# yaml is imported where it is used: `lacot-train --help` must run (and name the missing `train` extra) without it.

PRECISIONS = ("auto", "bf16-mixed", "fp32", "bf16-pure")


@dataclass
class LoraConfig:
    r: int = 0  # 0 = full fine-tuning; > 0 = LoRA through peft (the reference is then the adapter-disabled base)
    alpha: int = 16  # scale of the LoRA update: alpha / r
    dropout: float = 0.0  # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    vision: bool = False  # also adapt matching modules of the vision tower (official LaCoT: `visual*` excluded)


@dataclass
class ModelConfig:
    path: str = ""  # a transformers checkpoint directory (or hub id when online)
    ref_path: str = ""  # frozen reference / reward model π_Φ; "" = path (with LoRA: the adapter-disabled base)
    # auto | float32 | bfloat16 | float16: storage of *frozen* weights only (a reference model, a LoRA base, the model
    # bin evaluates); auto = bfloat16 under a bf16 train.precision, else float32. Trained weights follow
    # train.precision. The ops accumulate and return fp32 whatever it is.
    dtype: str = "auto"
    attn_implementation: str = "auto"  # auto = flash_attention_2 when installed and on CUDA, else sdpa
    backend: str = "auto"  # lacot_kernels backend for every op call
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more compute)
    freeze_vision: bool = False  # keep the vision tower (and merger) fixed
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class FormatConfig:
    """The chat layout X | Z ⊤ | Y: prompt, rationale ended by the terminator token, then the answer turn.

    The rationale gets its own turn (LaCoT's "Analyzer" role) so that ⊤ is one token whose probability the
    policy models at every state, and the answer can be scored or generated after any rationale.
    """

    system: str = ""  # text before the user turn
    user: str = "<|im_start|>user\n{image}{question}<|im_end|>\n"  # the user turn
    image: str = "<|vision_start|>{image_pad}<|vision_end|>"  # {image_pad} = the pad token x image size
    image_pad: str = "<|image_pad|>"  # the image placeholder token, repeated once per merged image patch
    rationale_header: str = "<|im_start|>analyzer\n"  # ends the prompt X
    terminator: str = "<|im_end|>"  # ⊤: must be a single token
    answer_header: str = "\n<|im_start|>assistant\n"  # forced after ⊤, never trained on
    answer_end: str = "<|im_end|>"  # closes the answer turn (a single token)


@dataclass
class DataConfig:
    train_file: str = ""  # .json / .jsonl / .parquet
    eval_file: str = ""  # held-out rows for greedy evaluation (bin: the evaluated set)
    question_field: str = "question"  # row field holding the question
    answer_field: str = "answer"  # row field holding the short answer
    rationale_field: str = "rationale"  # row field holding the reference rationale
    image_field: str = "image"  # a path (relative to the data file or image_root), bytes, or {"bytes","path"}
    image_root: str = ""  # folder that relative image paths are resolved against (default: the data file's folder)
    max_prompt_tokens: int = 2048  # longer prompts: question text cut from the left (image and template kept)
    direct_answer_ratio: float = 0.0  # SFT: P(a row with a rationale is trained as a direct answer at a step)
    shuffle: bool = True  # reshuffle the rows every epoch (the order is a function of the seed)


@dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr over this many updates
    schedule: str = "cosine"  # cosine | constant | linear
    min_lr_ratio: float = 0.1  # cosine / linear decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainConfig:
    algorithm: str = "sft"  # sft | dpo | grpo | lacot | bin (set by the command)
    out_dir: str = "out/run"  # metrics, checkpoints and the final model go here
    steps: int = 100  # optimizer steps for sft/dpo; generation batches for grpo/lacot
    batch_size: int = 8  # prompts (sft/grpo/lacot/bin) or pairs (dpo) per step, over all processes
    micro_batch_size: int = 0  # rows per forward/backward (gradient accumulation; DPO: pairs, 2 rows each); 0 = all
    seed: int = 0  # every RNG; rank r uses seed + r
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed cuBLAS workspace
    device: str = "auto"  # auto | cpu | cuda
    # bf16-mixed: fp32 weights and AdamW state, forward/backward under bf16 autocast (the default on GPU).
    # fp32: everything fp32 (the default on CPU). bf16-pure: bf16 weights updated in place: opt-in, warns, because
    # updates below 2^-8 of a weight round away (5 DPO steps at lr 5e-7 changed 0.6% of a model's weights).
    # auto = bf16-mixed on CUDA, fp32 on CPU.
    precision: str = "auto"
    strategy: str = "ddp"  # several processes (torchrun): ddp (replicated weights) | fsdp (FSDP2 sharding)
    threads: int = 0  # torch.set_num_threads (0 = leave)
    log_every: int = 1  # write a metrics line every N steps
    eval_every: int = 0  # greedy accuracy on data.eval_file every N steps (0 = only at the end)
    eval_size: int = 200  # evaluate on the first N rows of data.eval_file
    eval_batch_size: int = 100  # rows per generation call in evaluation
    max_new_tokens: int = 64  # rationale budget for evaluation rollouts
    answer_max_tokens: int = 16  # answer budget after the forced answer header
    save_every: int = 0  # 0 = only the final model
    keep_last: int = 2  # checkpoints kept on disk (the oldest are deleted)
    resume: str = "auto"  # auto (latest checkpoint in out_dir) | never | a checkpoint directory
    tensorboard: bool = False  # also write tensorboard event files
    progress: bool = True  # a tqdm progress bar on rank 0
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit; not resumable)


@dataclass
class SFTConfig:
    train_rationale: bool = True  # cross-entropy on rationale + ⊤ (else on the answer only)


@dataclass
class DPOConfig:
    beta: float = 0.1  # DPO inverse temperature (LLaVA-Reasoner: 0.1)
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # cDPO: assumed fraction of flipped preference labels
    num_samples: int = 8  # chains sampled per prompt from the SFT model to build pairs
    temperature: float = 1.0  # sampling temperature of the chains that make the pairs
    pair_prompts: int = 256  # prompts sampled to build pairs
    pairs_per_prompt: int = 1  # pairs made from one prompt's chains (at most)


@dataclass
class GRPOConfig:
    group_size: int = 8  # G chains sampled per prompt
    temperature: float = 1.0  # sampling temperature (the log-probs are taken at the same temperature)
    updates_per_batch: int = 1  # several optimizer updates per generation batch, with saved old log-probs
    beta: float = 0.0  # k3 KL to the reference model (0 = no reference forward)
    eps_low: float = 0.2  # clip the ratio below at 1 - eps_low
    eps_high: float = 0.0  # 0 = eps_low
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    scale: str = "group"  # advantage scaling: group | batch | none
    correct_reward: float = 1.0  # reward of an exactly matching answer
    format_reward: float = 0.1  # reward of a well-formed chain (rationale closed, answer closed)
    # The rollout sampler's truncation (vLLM's order). The trained log-probs are taken under the same truncation,
    # so the ratio compares the distribution the tokens were really drawn from (trl#6789).
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    # Rollout-mismatch correction: the sampler's log-probs are recorded during generation and weight the
    # policy-gradient term by rho = pi_old / pi_rollout (lacot_kernels.grpo_loss: tis | mis | icepop | none).
    is_correction: str = "none"
    is_cap: float = 2.0  # tis: min(rho, cap); mis: rho masked above cap
    is_band_low: float = 0.5  # icepop: rho masked outside [low, high]
    is_band_high: float = 5.0
    is_level: str = "token"  # token | sequence (rho of the whole sequence)
    ratio_level: str = "token"  # token (GRPO) | sequence (GSPO; use eps_low ~ 3e-4, eps_high ~ 4e-4)


@dataclass
class LaCoTConfig:
    num_samples: int = 6  # m explored rationales per prompt (the reference rationale is always added)
    stride: int = 8  # λ: exact rewards every λ tokens, interpolated in between
    min_len: int = 0  # first anchor after state 0
    max_len: int = 700  # rationale token budget
    min_new_tokens: int = 0  # ban ⊤ for the first tokens of a rollout
    temperature_max: float = 1.0  # the exploration temperature drawn with probability p_max_temperature
    temperature_min: float = 0.5  # lower end of U(temperature_min, temperature_max)
    p_max_temperature: float = 0.75  # P(sample at temperature_max); else U(temperature_min, temperature_max)
    delta_start: float = 1.5  # RGFN acceptance: reward >= delta * reference reward (log scale)
    delta_end: float = 1.0  # final delta of the RGFN acceptance rule
    delta_horizon: int = 50  # steps over which delta goes from delta_start to delta_end
    reward_temp_start: float = 1.0  # divide log-rewards by this at step 0
    reward_temp_end: float = 0.7  # ... and by this after reward_temp_horizon steps
    reward_temp_horizon: int = 50  # steps over which the reward temperature anneals
    filter_reward: str = "mean"  # mean (per-token, as the official code) | sum (as the paper's text)
    subtb_decay: float = 1.0  # weight decay^(k-1) of a sub-trajectory of k transitions (1 = plain SubTB)
    reduction: str = "sum"  # sum (the paper) | mean (the official code's pooled mean over sub-trajectories)
    anchor_chunk: int = 64  # anchors scored per suffix pass (bounds the reward pass memory)
    # Truncation of the exploration sampler (vLLM's order; 0 / 1 / 0 = off). SubTB is an off-policy objective:
    # its log-probs stay those of the untruncated policy q_θ, whatever sampler proposed the rationales.
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


@dataclass
class BiNConfig:
    num_samples: int = 5  # N rationales per question
    temperature: float = 0.7  # sampling temperature of the N rationales
    reduce: str = "mean"  # mean (official) | logmeanexp (the paper's marginal likelihood)
    scorer: str = "policy"  # policy (q_θ, official code) | reference (π_Φ, the paper)
    answers: str = "reference"  # who answers after each rationale: reference (π_Φ = model.ref_path, LaCoT) | policy


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lacot: LaCoTConfig = field(default_factory=LaCoTConfig)
    bin: BiNConfig = field(default_factory=BiNConfig)

    def validate(self) -> Config:
        """Cross-field checks; raises ValueError naming the key."""

        def need(ok: bool, key: str, expected: str, got: object) -> None:
            if not ok:
                raise ValueError(f"config {key}: expected {expected}, got {got!r}")

        t, o = self.train, self.optim
        need(t.algorithm in ALGORITHMS, "train.algorithm", f"one of {ALGORITHMS}", t.algorithm)
        need(t.steps >= 0, "train.steps", ">= 0", t.steps)
        need(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
        need(t.micro_batch_size >= 0, "train.micro_batch_size", ">= 0", t.micro_batch_size)
        need(t.device in ("auto", "cpu", "cuda"), "train.device", "auto | cpu | cuda", t.device)
        need(t.precision in PRECISIONS, "train.precision", " | ".join(PRECISIONS), t.precision)
        need(t.strategy in ("ddp", "fsdp"), "train.strategy", "ddp | fsdp", t.strategy)
        need(
            not (t.strategy == "fsdp" and self.model.lora.r > 0),
            "train.strategy",
            "ddp with LoRA (model.lora.r > 0: the adapters are small, FSDP + LoRA is not wired)",
            t.strategy,
        )
        need(t.resume not in ("",), "train.resume", "auto | never | a checkpoint path", t.resume)
        need(t.keep_last >= 1, "train.keep_last", ">= 1", t.keep_last)
        need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "a finite float > 0", o.lr)
        need(o.schedule in ("cosine", "constant", "linear"), "optim.schedule", "cosine | constant | linear", o.schedule)
        need(len(o.betas) == 2, "optim.betas", "two floats", o.betas)
        need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "in [0, 1]", o.min_lr_ratio)
        dtypes = ("auto", "float32", "bfloat16", "float16")
        need(self.model.dtype in dtypes, "model.dtype", " | ".join(dtypes), self.model.dtype)
        need(self.model.backend in ("auto", "cuda", "triton", "torch"), "model.backend", "auto|cuda|triton|torch", None)
        need(self.model.lora.r >= 0, "model.lora.r", ">= 0", self.model.lora.r)
        need(0.0 <= self.data.direct_answer_ratio <= 1.0, "data.direct_answer_ratio", "in [0, 1]", None)
        need(self.data.max_prompt_tokens >= 0, "data.max_prompt_tokens", ">= 0 (0 = no limit)", None)
        need(self.grpo.group_size >= 2, "grpo.group_size", ">= 2", self.grpo.group_size)
        need(self.grpo.updates_per_batch >= 1, "grpo.updates_per_batch", ">= 1", self.grpo.updates_per_batch)
        need(self.grpo.scale in ("group", "batch", "none"), "grpo.scale", "group | batch | none", self.grpo.scale)
        need(
            self.grpo.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"), "grpo.loss_type", "grpo|bnpo|dr_grpo|dapo", None
        )
        need(self.grpo.temperature > 0, "grpo.temperature", "> 0", self.grpo.temperature)
        gp = self.grpo
        need(gp.top_k >= 0, "grpo.top_k", ">= 0 (0 = off)", gp.top_k)
        need(0 < gp.top_p <= 1, "grpo.top_p", "in (0, 1] (1 = off)", gp.top_p)
        need(0 <= gp.min_p <= 1, "grpo.min_p", "in [0, 1] (0 = off)", gp.min_p)
        need(gp.is_correction in ("none", "tis", "mis", "icepop"), "grpo.is_correction", "none|tis|mis|icepop", None)
        need(gp.is_cap > 0, "grpo.is_cap", "> 0", gp.is_cap)
        need(0 <= gp.is_band_low <= gp.is_band_high, "grpo.is_band_low", "in [0, is_band_high]", gp.is_band_low)
        need(gp.is_level in ("token", "sequence"), "grpo.is_level", "token | sequence", gp.is_level)
        need(gp.ratio_level in ("token", "sequence"), "grpo.ratio_level", "token | sequence", gp.ratio_level)
        need(self.dpo.num_samples >= 2, "dpo.num_samples", ">= 2", self.dpo.num_samples)
        need(
            self.dpo.loss_type in ("sigmoid", "ipo", "hinge", "robust"), "dpo.loss_type", "sigmoid|ipo|hinge|robust", 0
        )
        lc = self.lacot
        need(lc.num_samples >= 0, "lacot.num_samples", ">= 0", lc.num_samples)
        need(lc.stride >= 1, "lacot.stride", ">= 1", lc.stride)
        need(lc.max_len >= 1, "lacot.max_len", ">= 1", lc.max_len)
        need(0 < lc.temperature_min <= lc.temperature_max, "lacot.temperature_min", "in (0, temperature_max]", None)
        need(lc.reward_temp_end > 0 and lc.reward_temp_start > 0, "lacot.reward_temp_*", "> 0", None)
        need(lc.filter_reward in ("mean", "sum"), "lacot.filter_reward", "mean | sum", lc.filter_reward)
        need(lc.subtb_decay >= 0, "lacot.subtb_decay", ">= 0", lc.subtb_decay)
        need(lc.anchor_chunk >= 1, "lacot.anchor_chunk", ">= 1", lc.anchor_chunk)
        need(lc.reduction in ("sum", "mean"), "lacot.reduction", "sum | mean", lc.reduction)
        need(lc.top_k >= 0, "lacot.top_k", ">= 0 (0 = off)", lc.top_k)
        need(0 < lc.top_p <= 1, "lacot.top_p", "in (0, 1] (1 = off)", lc.top_p)
        need(0 <= lc.min_p <= 1, "lacot.min_p", "in [0, 1] (0 = off)", lc.min_p)
        need(self.bin.num_samples >= 1, "bin.num_samples", ">= 1", self.bin.num_samples)
        need(self.bin.reduce in ("mean", "logmeanexp"), "bin.reduce", "mean | logmeanexp", self.bin.reduce)
        need(self.bin.scorer in ("policy", "reference"), "bin.scorer", "policy | reference", self.bin.scorer)
        need(self.bin.answers in ("policy", "reference"), "bin.answers", "policy | reference", self.bin.answers)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_precision(self, cuda: bool) -> str:
        """``train.precision`` with ``auto`` resolved for the device."""
        if self.train.precision != "auto":
            return self.train.precision
        return "bf16-mixed" if cuda else "fp32"


# ---- loading -------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and gently convert: int -> float, a YAML string from the CLI) a value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{source}: {key} expects a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {key} expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{source}: {key} expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{source}: {key} expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{source}: {key} expects a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _set(obj: Any, path: list[str], value: Any, source: str, full_key: str) -> None:
    types_ = _field_types(obj)
    name = path[0]
    if name not in types_:
        known = ", ".join(sorted(types_))
        raise ValueError(f"{source}: unknown config key {full_key!r} ({name!r} is not one of: {known})")
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {full_key} is a section and expects a mapping, got {value!r}")
            for k, v in value.items():
                _set(current, [str(k)], v, source, f"{full_key}.{k}")
            return
        _set(current, path[1:], value, source, full_key)
        return
    if len(path) > 1:
        raise ValueError(f"{source}: {full_key!r}: {name!r} is a value, not a section")
    setattr(obj, name, _coerce(value, types_[name], full_key, source))


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str) -> Config:
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: expected a mapping of sections at the top level, got {type(mapping).__name__}")
    for key, value in mapping.items():
        _set(cfg, str(key).split("."), value, source, str(key))
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``--train.lr=1e-4`` or ``train.lr=1e-4`` -> ("train.lr", 1e-4); the value is read as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ValueError(f"command line: override {text!r} must look like section.key=value")
    import yaml

    key, raw = body.split("=", 1)
    if not key or "." not in key:
        raise ValueError(f"command line: override {text!r} must name section.key (e.g. optim.lr=1e-5)")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"command line: cannot read the value of {key}: {exc}") from exc
    return key, value


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """A config file's mapping; a missing file or invalid YAML is one clear error naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any) -> Config:
    """Defaults <- YAML file <- dotted overrides, then :meth:`Config.validate`."""
    cfg = Config()
    if defaults:
        apply_mapping(cfg, defaults, "defaults")
    if path:
        apply_mapping(cfg, read_yaml_file(path), str(path))
    for text in overrides or []:
        key, value = parse_override(text)
        _set(cfg, key.split("."), value, "command line", key)
    return cfg.validate()


def dump_config(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
