"""The papers' recipes in their details: BiN answers from π_Φ, the official Best-of-N, Tmin, LoRA off the vision
tower, a missing BiN reference, prompt truncation, and the SFT mix of CoT and direct answers."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from lacot_kernels.trainer import rollout
from lacot_kernels.trainer.config import DataConfig, FormatConfig, load_config
from lacot_kernels.trainer.data import Example, direct_answer_mix, load_examples
from lacot_kernels.trainer.loop import run
from lacot_kernels.trainer.modeling import Codec, build_batch, load_model, lora_target_names, unwrap

from .conftest import make_cfg

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


def _load(path: Path):
    return load_model(load_config().model, torch.device("cpu"), path=str(path), trainable=False)


# ---- BiN ------------------------------------------------------------------------------------------------------


def test_bin_answers_are_written_by_the_reference_by_default(sft_text_model, text_model_dir, text_data, tmp_path):
    """Rationales come from the policy, the answers after them from π_Φ (model.ref_path), as LaCoT's evaluation."""
    calls: list[tuple[int, int]] = []
    original = rollout.generate

    def spy(model, codec, prompts, **kw):
        calls.append((id(unwrap(model)), "answer" if kw.get("forced") else "rationale"))
        return original(model, codec, prompts, **kw)

    rollout.generate = spy
    try:
        cfg = make_cfg(
            sft_text_model,
            text_data,
            tmp_path / "bin",
            "bin",
            bin={"num_samples": 2},
            model={"ref_path": str(text_model_dir)},
        )
        result = run(cfg)
    finally:
        rollout.generate = original
    tr = result.trainer
    policy, reference = id(unwrap(tr.model)), id(unwrap(tr._reference))
    term, end = "rationale", "answer"
    # Greedy chain: policy rationale + policy answer. Sampled chains: policy rationales, reference answers.
    assert (policy, term) in calls and (policy, end) in calls and (reference, end) in calls
    assert (reference, term) not in calls
    assert calls.count((reference, end)) == calls.count((policy, term)) // 2  # one answer pass per sampled batch
    rec = result.history[0]
    assert {"bin/bon", "bin/bon_joint"} <= set(rec)


@pytest.mark.parametrize("key", ["scorer", "answers"])
def test_bin_reference_without_ref_path_is_an_error(key, sft_text_model, text_data, tmp_path):
    other = "answers" if key == "scorer" else "scorer"
    cfg = make_cfg(sft_text_model, text_data, tmp_path / "bin", "bin", bin={key: "reference", other: "policy"})
    with pytest.raises(ValueError, match=rf"bin\.{key}=reference needs .*model\.ref_path"):
        run(cfg)


def test_bin_answers_policy_needs_no_reference(sft_text_model, text_data, tmp_path):
    cfg = make_cfg(sft_text_model, text_data, tmp_path / "bin", "bin", bin={"num_samples": 2, "answers": "policy"})
    assert run(cfg).history[0]["bin/pass@n"] >= 0.0


def test_official_best_of_n_scores_the_answer_alone(sft_text_model, text_model_dir, text_data):
    """``own_answer_logprobs`` = mean log π(answer tokens + answer end | X, Z, ⊤, header), from full logits."""
    from lacot_kernels.trainer.algorithms.bin import own_answer_logprobs

    policy, tok, _ = _load(sft_text_model)
    answerer, _, _ = _load(text_model_dir)  # another model: the score must come from the answer model
    codec = Codec(tok, None, FormatConfig())
    exs = load_examples(text_data["eval"], DataConfig(), need_rationale=True)[:4]
    prompts = [codec.prompt(e) for e in exs]
    torch.manual_seed(0)
    chains = rollout.sample_chains(
        policy, codec, prompts, max_rationale_tokens=24, max_answer_tokens=3, rationale_temperature=1.0
    )
    batch = build_batch(codec, prompts, [c.rationale for c in chains], torch.device("cpu"))
    got = own_answer_logprobs(answerer, codec, batch, chains)
    for p, c, g in zip(prompts, chains, got, strict=True):
        full = [*c.rationale, codec.terminator_id, *codec.answer_header_ids, *c.answer, codec.answer_end_id]
        ids = torch.tensor([p.ids + full])
        with torch.no_grad():
            logp = torch.log_softmax(answerer(input_ids=ids).logits[0].double(), -1)
        start = len(p.ids) + len(c.rationale) + 1 + len(codec.answer_header_ids)  # first answer token
        targets = full[start - len(p.ids) :]
        lp = [logp[start + k - 1, t].item() for k, t in enumerate(targets)]
        assert g == pytest.approx(sum(lp) / len(lp), abs=1e-4)


# ---- LaCoT: Tmin ----------------------------------------------------------------------------------------------


def test_lacot_yaml_has_the_paper_tmin():
    cfg = load_config(CONFIGS / "lacot.yaml")
    assert cfg.lacot.min_new_tokens == 64 and cfg.lacot.max_len == 700 and cfg.lacot.stride == 8
    assert cfg.model.lora.vision is False


def test_min_new_tokens_bans_the_terminator(sft_text_model, text_data):
    """With min_new_tokens = k no sampled rationale ends before k tokens (the trained model ends at ~14)."""
    model, tok, _ = _load(sft_text_model)
    codec = Codec(tok, None, FormatConfig())
    exs = load_examples(text_data["eval"], DataConfig(), need_rationale=True)[:4]
    prompts = [codec.prompt(e) for e in exs for _ in range(3)]
    torch.manual_seed(0)
    free = rollout.generate(model, codec, prompts, max_new_tokens=40, eos_id=codec.terminator_id, temperature=1.0)
    k = max(len(z) for z, ok in free if ok) + 3
    torch.manual_seed(0)
    held = rollout.generate(
        model, codec, prompts, max_new_tokens=40, eos_id=codec.terminator_id, temperature=1.0, min_new_tokens=k
    )
    assert all(len(z) >= k for z, ok in held if ok) and any(len(z) < k for z, ok in free if ok)


# ---- LoRA targets -------------------------------------------------------------------------------------------


def test_lora_targets_skip_the_vision_tower():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_tiny import tiny_qwen25_vl

    model = tiny_qwen25_vl()
    targets = load_config(CONFIGS / "lacot.yaml").model.lora.target_modules
    names = lora_target_names(model, targets)
    assert names and not any("visual" in n for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == set(targets)
    with_vision = lora_target_names(model, targets, vision=True)
    # Qwen2.5-VL's vision MLPs have gate/up/down_proj: a plain name list would have put adapters there.
    assert any(n.startswith("model.visual.") and n.endswith("gate_proj") for n in with_vision)
    assert set(with_vision) - set(names) == {n for n in with_vision if ".visual." in n or n.startswith("visual")}
    with pytest.raises(ValueError, match="match no module"):
        lora_target_names(model, ["fc1"])


def test_lora_model_loads_without_vision_adapters(vl_model_dir):
    cfg = load_config(None, ["model.lora.r=2", "model.lora.target_modules=[q_proj, qkv]"])
    model, _, _ = load_model(cfg.model, torch.device("cpu"), path=str(vl_model_dir), trainable=True)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and not any("visual" in n for n in lora)
    cfg = load_config(None, ["model.lora.r=2", "model.lora.target_modules=[q_proj, qkv]", "model.lora.vision=true"])
    model, _, _ = load_model(cfg.model, torch.device("cpu"), path=str(vl_model_dir), trainable=True)
    assert any("visual" in n for n, _ in model.named_parameters() if "lora_" in n)


# ---- data.max_prompt_tokens -----------------------------------------------------------------------------------


def test_max_prompt_tokens_cuts_the_question_from_the_left(tok):
    codec = Codec(tok, None, FormatConfig(), max_prompt_tokens=0)
    long_q = " ".join(f"{i} red and {i} blue." for i in range(40)) + " How many squares?"
    ex = Example(long_q, "1", None, None, "f.jsonl:7")
    full = codec.prompt(ex).ids
    cut_codec = Codec(tok, None, FormatConfig(), max_prompt_tokens=40)
    with pytest.warns(UserWarning, match="cut to data.max_prompt_tokens=40"):
        cut = cut_codec.prompt(ex).ids
    assert len(full) > 40 and len(cut) == 40
    head = codec.text("<|im_start|>user\n")
    tail = codec.text("<|im_end|>\n<|im_start|>analyzer\n")
    assert cut[: len(head)] == head and cut[-len(tail) :] == tail  # the template survives
    assert tok.decode(cut[len(head) : -len(tail)]).endswith("How many squares?")  # the question's end survives
    assert cut_codec.truncated_prompts == 1
    short = Example("How many squares?", "1", None, None, "f.jsonl:8")
    assert cut_codec.prompt(short).ids == codec.prompt(short).ids
    with pytest.raises(ValueError, match=r"f\.jsonl:7: .*data\.max_prompt_tokens=5"):
        Codec(tok, None, FormatConfig(), max_prompt_tokens=5).prompt(ex)


def test_max_prompt_tokens_keeps_the_image(vl_model_dir, vl_data):
    model, tok, ip = _load(vl_model_dir)
    ex = load_examples(vl_data["eval"], DataConfig(), need_rationale=False)[0]
    ex = Example("many words " * 30 + ex.question, ex.answer, None, ex.image, ex.where)
    full = Codec(tok, ip, FormatConfig()).prompt(ex)
    cut = Codec(tok, ip, FormatConfig(), max_prompt_tokens=30)
    with pytest.warns(UserWarning):
        p = cut.prompt(ex)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert len(p.ids) == 30 < len(full.ids) and p.ids.count(pad) == full.ids.count(pad) > 0


def test_trainer_applies_max_prompt_tokens(sft_text_model, text_data, tmp_path):
    cfg = make_cfg(sft_text_model, text_data, tmp_path / "sft", "sft", train={"steps": 1})
    cfg.data.max_prompt_tokens = 12  # (make_cfg's own `data` argument is the files)
    with pytest.warns(UserWarning, match="max_prompt_tokens=12"):
        result = run(cfg)
    assert result.trainer.codec.max_prompt_tokens == 12 and result.trainer.codec.truncated_prompts > 0


# ---- SFT: CoT + direct answers ------------------------------------------------------------------------------


def test_direct_answer_mix_is_seeded_and_proportional():
    exs = [Example(f"q{i}", str(i % 10), "because", None, f"f:{i}") for i in range(4000)]
    exs += [Example("q", "1", None, None, "f:x")]
    a = direct_answer_mix(exs, 0.5, seed=3, step=7)
    assert a == direct_answer_mix(exs, 0.5, seed=3, step=7)  # a resumed step draws the same mix
    assert a != direct_answer_mix(exs, 0.5, seed=3, step=8)
    frac = sum(e.rationale is None for e in a[:-1]) / 4000
    assert 0.47 < frac < 0.53 and a[-1].rationale is None
    assert direct_answer_mix(exs, 0.0, seed=3, step=7) is exs
    assert all(e.rationale is None for e in direct_answer_mix(exs, 1.0, seed=0, step=0))
    with pytest.raises(ValueError, match="data.direct_answer_ratio"):
        load_config(None, ["data.direct_answer_ratio=1.5"])


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_rows_without_rationale_train_the_direct_answer(text_model_dir, text_data, tmp_path):
    """A file mixing CoT rows and rows with no rationale trains; direct rows teach ⊤ at state 0 then the answer:
    after training on direct answers only, greedy decoding closes the rationale at once and answers."""
    rows = [json.loads(line) for line in Path(text_data["train"]).read_text().splitlines()]
    mixed = [r if i % 2 else {k: v for k, v in r.items() if k != "rationale"} for i, r in enumerate(rows)]
    data = {"train": _write(tmp_path / "mixed.jsonl", mixed), "eval": text_data["eval"]}
    res = run(make_cfg(text_model_dir, data, tmp_path / "mixed", "sft", train={"steps": 2}))
    assert [r["tokens"] for r in res.history if "tokens" in r][0] > 0

    cfg = make_cfg(
        text_model_dir,
        text_data,
        tmp_path / "direct",
        "sft",
        train={"steps": 60, "batch_size": 16},
        optim={"lr": 1e-2},
    )
    cfg.data.direct_answer_ratio = 1.0
    res = run(cfg)
    model, tok, _ = _load(res.final_dir)
    codec = Codec(tok, None, FormatConfig())
    exs = load_examples(text_data["eval"], DataConfig(), need_rationale=True)
    chains = rollout.sample_chains(
        model, codec, [codec.prompt(e) for e in exs], max_rationale_tokens=24, max_answer_tokens=3,
        rationale_temperature=None,
    )  # fmt: skip
    assert all(c.rationale == [] and c.terminated for c in chains), [codec.decode(c.rationale) for c in chains]
    assert all(c.answered and codec.decode(c.answer).strip().isdigit() for c in chains)  # then a closed answer


def test_sft_with_ratio_zero_keeps_rationales(text_model_dir, text_data, tmp_path):
    """direct_answer_ratio = 0 (the default) trains every CoT row on its rationale: more tokens than ratio 1."""
    tokens = {}
    for ratio in (0.0, 1.0):
        cfg = make_cfg(text_model_dir, text_data, tmp_path / f"r{ratio}", "sft", train={"steps": 1})
        cfg.data.direct_answer_ratio = ratio
        tokens[ratio] = run(cfg).history[-1]["tokens"]
    n_answer = 4 * (1 + 2)  # 4 rows x (⊤ + answer digit + end) at ratio 1
    assert tokens[1.0] == pytest.approx(n_answer, abs=4) and tokens[0.0] > 4 * tokens[1.0]


# ---- the demo task ------------------------------------------------------------------------------------------


def test_paths_task_has_two_reasoning_paths_to_one_answer():
    from lacot_kernels.trainer.demo import task

    rng = random.Random(0)
    samples = [task.draw_sample(rng, task="paths") for _ in range(400)]
    firsts = {s.rationale.split()[3] for s in samples}
    assert firsts == {"red", "blue"}  # "I see 2 red and ..." / "I see 3 blue and ..."
    for s in samples:
        a, b = (int(x) for x in s.rationale.split(". ")[1].split(" = ")[0].split(" + "))
        assert a + b == int(s.answer) == s.red + s.blue
    # The count task's data is unchanged by the paths variant (same draws, same single wording).
    rng1, rng2 = random.Random(5), random.Random(5)
    for _ in range(50):
        s = task.draw_sample(rng1, task="count")
        red, blue = rng2.randint(0, 4), rng2.randint(0, 4)
        assert (s.red, s.blue, s.cells, s.blue_first) == (red, blue, tuple(rng2.sample(range(49), red + blue)), False)
        assert s.rationale == f"I see {red} red and {blue} blue. {red} + {blue} = {red + blue}."
    with pytest.raises(ValueError, match="task must be one of"):
        task.draw_sample(rng1, task="nope")
