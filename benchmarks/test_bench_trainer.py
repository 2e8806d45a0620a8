"""The trainer's hot paths on the tiny built-in models (the demo's Qwen2-VL), ours vs the official formulation.

Cases (one table each):
  * ``lacot_reward_scoring`` - exact LaCoT log-rewards ``log π_Φ(z_{1:t} ⊤ Y | X)`` at every anchor of R
    rationales of n tokens (anchors every λ tokens + the terminal state):
      - ``lacot-trainer``: one pass over ``X z`` (prefix sums of fused-op log-probs) + one pass of all anchors'
        ``⊤ Y`` suffixes over the KV cache (:func:`lacot_kernels.trainer.rewards.score_suffixes`);
      - ``naive-per-anchor``: the official code's way, one full forward of ``X z_{1:t} ⊤ Y`` per anchor with fp32
        logits over the vocabulary.
    Error column: largest |difference| of the rewards to the naive scoring run in float64.
  * ``bin_scoring`` - BiN: every one of A candidate answers scored after every one of N rationales (Q questions):
    ours (one pass per rationale + its A suffixes on the cache) vs one full forward per (answer, rationale).
  * ``trainer_logprobs`` - per-token log-probs of completions with their gradient through a tiny causal LM with
    a 32k vocabulary: ``lacot-trainer`` (backbone + ``fused_linear_token_logprobs``, no B x T x V logits) vs
    ``hf-logits`` (``model(...).logits`` -> fp32 log_softmax -> gather): time and peak extra memory.

Sizes: smoke (CI), full (the issue's: n = 512, λ = 8 on the CPU). On the CPU both providers run with one torch
thread, as the demo does: these models are tiny, and on a shared 2-core machine two spinning OpenMP threads made
every call several times slower and the timings noise.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from lacot_kernels.trainer.config import FormatConfig
from lacot_kernels.trainer.demo import task, tiny
from lacot_kernels.trainer.modeling import Codec, Policy, Prompt, build_batch, completion_logprobs
from lacot_kernels.trainer.rewards import SuffixQuery, anchor_queries, naive_score_suffixes, score_suffixes

import lacot_kernels as lk

from . import _harness as H

SIZES = {
    "lacot_reward_scoring": {"smoke": dict(R=2, n=48, lam=8), "full": dict(R=2, n=512, lam=8)},
    "bin_scoring": {"smoke": dict(Q=2, N=3, A=3, n=24), "full": dict(Q=4, N=5, A=5, n=128)},
    "trainer_logprobs": {"smoke": dict(B=2, T=64, V=2000), "full": dict(B=8, T=512, V=32000)},
}
PROVIDERS = {
    "lacot_reward_scoring": ["lacot-trainer", "naive-per-anchor"],
    "bin_scoring": ["lacot-trainer", "naive-per-pair"],
    "trainer_logprobs": ["lacot-trainer", "hf-logits"],
}
MODES = {"lacot_reward_scoring": "fwd_nograd", "bin_scoring": "fwd_nograd", "trainer_logprobs": "fwd_bwd"}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for op, sizes in SIZES.items():
        dims = sizes[size]
        case = H.Case(op, MODES[op], False, tuple(dims.items()), "fp32", 0.0, size)
        for p in PROVIDERS[op]:
            params.append(pytest.param(case, p, id=f"{op}-{case.param_id()}-{p}"))
    metafunc.parametrize("case,provider", params)


_CACHE: dict = {}


def _vl():
    """The demo's tiny Qwen2-VL (random init), its codec, and a question with an image."""
    if "vl" not in _CACHE:
        tok = tiny.build_tokenizer()
        model = tiny.build_qwen2vl(tok).eval()
        codec = Codec(tok, tiny.build_image_processor(), FormatConfig())
        import random

        from lacot_kernels.trainer.data import Example

        s = task.draw_sample(random.Random(0))
        ex = Example(task.QUESTION, s.answer, s.rationale, task.render(s), "bench")
        _CACHE["vl"] = (model, codec, codec.prompt(ex))
    return _CACHE["vl"]


def _random_rationales(codec, k: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(len(codec.tok)) if i not in set(codec.banned_ids) | {codec.terminator_id}])
    return [allowed[torch.randint(0, len(allowed), (n,), generator=g)].tolist() for _ in range(k)]


def _reward_inputs(case: H.Case) -> dict:
    key = ("reward", case.shape)
    if key not in _CACHE:
        d = case.dims
        model, codec, prompt = _vl()
        rats = _random_rationales(codec, d["R"], d["n"], 0)
        prompts = [prompt] * d["R"]
        suffix = codec.suffix(codec.answer("7"))
        batch = build_batch(codec, prompts, rats, torch.device("cpu"))
        anchors = lk.reward_anchors(batch.lengths, d["lam"], max_len=batch.T)
        queries = anchor_queries(anchors, [suffix] * d["R"])
        ref = naive_score_suffixes(_double(model), codec, _double_prompts(prompts), rats, queries).total
        _CACHE[key] = dict(model=model, codec=codec, prompts=prompts, rats=rats, batch=batch, queries=queries, ref=ref)
    return _CACHE[key]


def _bin_inputs(case: H.Case) -> dict:
    key = ("bin", case.shape)
    if key not in _CACHE:
        d = case.dims
        model, codec, prompt = _vl()
        rats = _random_rationales(codec, d["Q"] * d["N"], d["n"], 1)
        answers = [codec.suffix(codec.answer(str(a))) for a in range(d["A"])]
        prompts = [prompt] * len(rats)
        queries = [SuffixQuery(r, len(rats[r]), *s) for r in range(len(rats)) for s in answers]
        batch = build_batch(codec, prompts, rats, torch.device("cpu"))
        ref = naive_score_suffixes(_double(model), codec, _double_prompts(prompts), rats, queries).total
        _CACHE[key] = dict(model=model, codec=codec, prompts=prompts, rats=rats, batch=batch, queries=queries, ref=ref)
    return _CACHE[key]


def _double(model):
    if "double" not in _CACHE:
        _CACHE["double"] = copy.deepcopy(model).double()
    return _CACHE["double"]


def _double_prompts(prompts: list[Prompt]) -> list[Prompt]:
    return [
        Prompt(p.ids, None if p.pixel_values is None else p.pixel_values.double(), p.image_grid_thw) for p in prompts
    ]


def _lm_inputs(case: H.Case) -> dict:
    key = ("lm", case.shape)
    if key not in _CACHE:
        _CACHE.pop(next((k for k in _CACHE if isinstance(k, tuple) and k[0] == "lm"), None), None)
        gc.collect()
        d = case.dims
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=d["V"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        codec = _vl()[1]
        codec = copy.copy(codec)
        codec.pad_id = 0
        g = torch.Generator().manual_seed(2)
        prompts = [Prompt(torch.randint(2, d["V"], (32,), generator=g).tolist()) for _ in range(d["B"])]
        comps = [torch.randint(2, d["V"], (d["T"],), generator=g).tolist() for _ in range(d["B"])]
        batch = build_batch(codec, prompts, comps, torch.device("cpu"))
        with torch.no_grad():
            ref = _hf_logprobs(copy.deepcopy(model).double(), batch)
        _CACHE[key] = dict(model=model, batch=batch, ref=ref)
    return _CACHE[key]


def _hf_logprobs(model, batch):
    logits = model(**batch.model_inputs()).logits[:, batch.prompt_len - 1 : batch.prompt_len - 1 + batch.T]
    lp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, -1)
    return lp.gather(-1, batch.completion.clamp_min(0).unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def one_thread():
    if H.ON_GPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_trainer_paths(case, provider, benchmark, one_thread):
    if case.op == "trainer_logprobs":
        inp = _lm_inputs(case)
        model, batch = inp["model"], inp["batch"]
        policy = Policy(model)

        def run(_):
            model.zero_grad(set_to_none=True)
            lp = completion_logprobs(policy, batch) if provider == "lacot-trainer" else _hf_logprobs(model, batch)
            lp.sum().backward()
            return lp.detach()

        def check(out):
            return {"logp": H.max_abs_err(out.double(), inp["ref"])}

    else:
        inp = _reward_inputs(case) if case.op == "lacot_reward_scoring" else _bin_inputs(case)
        ours = provider == "lacot-trainer"

        @torch.no_grad()
        def run(_):
            if ours:
                return score_suffixes(inp["model"], inp["batch"], inp["queries"]).total
            # The official code: one forward per anchor (per candidate pair) over the rows.
            rows = len(inp["rats"]) if case.op == "lacot_reward_scoring" else 1
            return naive_score_suffixes(
                inp["model"], inp["codec"], inp["prompts"], inp["rats"], inp["queries"], rows_per_forward=rows
            ).total

        def check(out):
            return {"logp": H.max_abs_err(out.double(), inp["ref"])}

    H.bench(benchmark, case, provider, missing=None, run=run, prepare=lambda: None, check=check, full_rounds=3)


def _summary(rows: list[H.Row]) -> list[str]:
    out = []
    for op, (ours, peer) in {
        "lacot_reward_scoring": ("lacot-trainer", "naive-per-anchor"),
        "bin_scoring": ("lacot-trainer", "naive-per-pair"),
        "trainer_logprobs": ("lacot-trainer", "hf-logits"),
    }.items():
        r = {x.provider: x for x in rows if x.case.op == op and x.ms is not None}
        if ours in r and peer in r:
            line = f"{op}: {peer} / ours = {r[peer].ms / r[ours].ms:.1f}x time"
            if r[ours].peak_extra_mib and r[peer].peak_extra_mib:
                line += f", {r[peer].peak_extra_mib / max(r[ours].peak_extra_mib, 1e-3):.1f}x peak memory"
            if op == "lacot_reward_scoring":
                line += "  (target: >= 5x at n = 512, λ = 8 on the CPU)"
            out.append(line)
    return out


for _op in SIZES:
    H.register_summary(_op, _summary)
