"""The trainer's GRPO with the RL features of issue 14: truncated rollouts scored under the same truncation,
the sampler's log-probs recorded during generation as rollout_logp (mismatch correction), GSPO's ratios."""

from __future__ import annotations

import math

import pytest
import torch
from lacot_kernels.trainer.config import load_config
from lacot_kernels.trainer.loop import run

from .conftest import make_cfg, params_of


def _train_records(result):
    return [r for r in result.history if "loss" in r]


@pytest.mark.parametrize("sampler", [dict(top_k=5, top_p=0.9), dict(min_p=0.1)])
def test_recorded_rollout_logp_matches_the_trainers_logp(sft_text_model, text_data, tmp_path, sampler):
    # fp32 model on CPU: the sampler (KV-cache generation + Truncate) and the trainer (fused op with the same
    # top_k/top_p/min_p) compute the same distribution, so rho = exp(old - rollout) is 1 up to rounding. A
    # misaligned recording (off by one token, the forced header, a truncation rule that differs) moves it far.
    cfg = make_cfg(
        sft_text_model,
        text_data,
        tmp_path / "grpo_is",
        "grpo",
        grpo={"group_size": 4, "temperature": 0.9, "is_correction": "tis", "is_cap": 2.0, **sampler},
        model={"dtype": "float32"},
    )
    result = run(cfg)
    recs = _train_records(result)
    assert len(recs) == 2
    for r in recs:
        assert abs(r["is/ratio_mean"] - 1.0) < 1e-3, r
        assert abs(r["is/weight_mean"] - 1.0) < 1e-3, r
        assert r["is/truncated_frac"] == 0.0
        assert r["truncation_dropped"] <= 2  # only boundary ties, if any
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    before, after = params_of(sft_text_model), params_of(result.final_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gspo_sequence_ratios_train(sft_text_model, text_data, tmp_path):
    cfg = make_cfg(
        sft_text_model,
        text_data,
        tmp_path / "gspo",
        "grpo",
        grpo={"group_size": 4, "updates_per_batch": 2, "ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    )
    result = run(cfg)
    recs = _train_records(result)
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    before, after = params_of(sft_text_model), params_of(result.final_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "key,value",
    [("top_k", -1), ("top_p", 0.0), ("min_p", 1.5), ("is_correction", "clip"), ("ratio_level", "batch"),
     ("is_level", "step"), ("is_cap", 0.0)],
)  # fmt: skip
def test_bad_rl_settings_are_named(key, value):
    with pytest.raises(ValueError, match=f"grpo.{key}"):
        load_config(None, [], grpo={key: value}).validate()


def test_lacot_explores_with_a_truncated_sampler(sft_text_model, text_data, tmp_path):
    cfg = make_cfg(
        sft_text_model,
        text_data,
        tmp_path / "lacot_topk",
        "lacot",
        lacot={"num_samples": 3, "stride": 4, "max_len": 16, "top_k": 3, "top_p": 0.9},
    )
    result = run(cfg)
    recs = _train_records(result)
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
