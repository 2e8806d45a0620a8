"""One TRL GRPOTrainer step on a tiny Qwen2 with a realistic vocabulary, patched by
``lacot_kernels.integrations.trl`` vs TRL as installed (and TRL's own ``use_liger_kernel`` path).

A step is what ``Trainer.train`` does per optimizer step: generate ``G`` completions for each of ``P`` prompts
(sampling, T = 0.7), score them, compute the reference model's log-probs (beta = 0.04) and the policy's
log-probs and entropies (with gradient), the GRPO loss, its backward, and the optimizer step. The model is
tiny (2 layers, hidden 64) so that the LM head over the vocabulary (``V``) is what the step spends its memory on,
as it is for real models at long completions.

Providers (each its own trainer, same seed, same data):
  * ``lacot-patch``: inside ``lacot_kernels.integrations.trl.patched()``: TRL's fused LM head computes its
    log-probs and entropies with :func:`lacot_kernels.fused_linear_token_logprobs`;
  * ``trl``: TRL 1.16 unpatched (its ``ChunkedLogProbFunction``: cuBLAS tiles + Triton fold on GPU, torch ops on
    the CPU);
  * ``trl+liger-kernel``: ``GRPOConfig(use_liger_kernel=True)`` unpatched: in TRL 1.16 this applies Liger's layer
    kernels (RMSNorm, RoPE, SwiGLU) only, its fused linear cross-entropy being incompatible with the fused head.

The error columns stay empty (there is no fp64 trainer); the summary gives the first step's loss of each
provider, which must agree (the tests check equality of losses and gradients over several steps).
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import warnings

import pytest
import torch

from . import _harness as H

OP = "trl_grpo_step"
GPU = (pytest.mark.gpu,)
# (prompts P, generations per prompt G, prompt words, completion tokens C, vocabulary V)
SHAPES = {
    "smoke": [((1, 4, 6, 4, 512), "fp32", ())],
    "full-cpu": [((2, 4, 32, 32, 32768), "fp32", ()), ((2, 4, 32, 32, 151936), "fp32", ())],
    "full-gpu": [((4, 8, 128, 512, 151936), "bf16", GPU)],
}
PROVIDERS = ["lacot-patch", "trl", "trl+liger-kernel"]
NOTES = {
    "lacot-patch": "generation + ref + policy fwd/bwd + optimizer",
    "trl+liger-kernel": "Liger layer kernels only (TRL 1.16)",
}
_FIRST_LOSS: dict[tuple[H.Case, str], float] = {}
_MODEL_DIRS: dict[int, str] = {}


def _shapes(size: str):
    if size == "smoke":
        return SHAPES["smoke"]
    return ([] if H.ON_GPU else SHAPES["full-cpu"]) + SHAPES["full-gpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for (P, G, W, C, V), dtype, marks in _shapes(size):
        dims = (("P", P), ("G", G), ("prompt", W), ("C", C), ("V", V))
        case = H.Case(OP, "fwd_bwd", True, dims, dtype, 0.0, size)
        for p in PROVIDERS:
            params.append(pytest.param(case, p, marks=marks, id=f"{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


def _missing(provider: str, case: H.Case) -> str | None:
    for module in ("trl", "datasets", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    if provider == "trl+liger-kernel":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if not H.ON_GPU and case.size == "full":
            return "Liger's layer kernels are Triton: on the CPU only the interpreter runs them (not a timing)"
    return None


def _model_dir(vocab: int) -> str:
    if vocab not in _MODEL_DIRS:
        from tests.hf_tiny import tiny_qwen2, word_tokenizer

        path = tempfile.mkdtemp(prefix=f"lacot-bench-qwen2-{vocab}-")
        tiny_qwen2(vocab, seed=0).save_pretrained(path)
        word_tokenizer(vocab).save_pretrained(path)
        _MODEL_DIRS[vocab] = path
    return _MODEL_DIRS[vocab]


def _reward(completions, **kwargs):
    return [float(sum(int(w[1:]) % 7 for w in c.split() if w[1:].isdigit())) for c in completions]


def _trainer(case: H.Case, provider: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tests.hf_tiny import word_tokenizer

    P, G, W, C, V = (case.dims[k] for k in ("P", "G", "prompt", "C", "V"))
    prompts = [{"prompt": " ".join(f"w{(i * 7 + j) % (V - 8)}" for j in range(W))} for i in range(64 * P)]
    bf16 = case.dtype == "bf16"
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="lacot-bench-grpo-"),
        per_device_train_batch_size=P * G,
        num_generations=G,
        max_completion_length=C,
        max_steps=1,
        learning_rate=1e-4,
        beta=0.04,
        temperature=0.7,
        report_to=[],
        use_cpu=not H.ON_GPU,
        bf16=bf16,
        seed=0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_liger_kernel=provider == "trl+liger-kernel",
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=_model_dir(V),
            reward_funcs=_reward,
            args=args,
            train_dataset=Dataset.from_list(prompts),
            processing_class=word_tokenizer(V),
        )
    return trainer


def _context(provider: str):
    if provider == "lacot-patch":
        from lacot_kernels.integrations import trl as lacot_trl

        return lacot_trl.patched()
    return contextlib.nullcontext()


def test_trl_grpo_step(case, provider, benchmark):
    missing = _missing(provider, case)
    state: dict = {}
    if missing is None:
        try:
            trainer = _trainer(case, provider)
            with _context(provider), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()  # sets up the optimizer, the wrapped model and the trainer state: not measured
        except Exception as exc:
            if provider.startswith("lacot"):
                raise
            missing = "failed: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        else:
            state["trainer"] = trainer
            state["batches"] = iter(trainer.get_train_dataloader())

    def prepare():
        return next(state["batches"])

    def run(batch):
        trainer = state["trainer"]
        with _context(provider), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = trainer.training_step(trainer.model_wrapped, batch, None)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        H.sync()
        return loss

    def check(loss):
        _FIRST_LOSS.setdefault((case, provider), float(loss))
        return {}

    H.bench(
        benchmark,
        case,
        provider,
        missing=missing,
        run=run,
        prepare=prepare,
        check=check,
        full_rounds=3,
        note=NOTES.get(provider, ""),
    )


def _summary(rows: list[H.Row]) -> list[str]:
    lines = []
    for case, rs in H.groups(rows).items():
        by = {r.provider: r for r in rs if r.missing is None}
        ours, trl = by.get("lacot-patch"), by.get("trl")
        if ours is None or trl is None:
            continue
        parts = [f"{case.shape_label} {case.dtype}: lacot-patch {ours.ms:.0f} ms vs trl {trl.ms:.0f} ms"]
        if ours.peak_extra_mib is not None and trl.peak_extra_mib:
            parts.append(
                f"peak extra memory {ours.peak_extra_mib:.0f} vs {trl.peak_extra_mib:.0f} MiB "
                f"({ours.peak_extra_mib / trl.peak_extra_mib:.2f}x)"
            )
        la, lb = _FIRST_LOSS.get((case, "lacot-patch")), _FIRST_LOSS.get((case, "trl"))
        if la is not None and lb is not None:
            parts.append(f"first measured step loss {la:.7g} vs {lb:.7g}")
        lines.append(", ".join(parts))
    return lines


H.register_summary(OP, _summary)
