"""lacot_kernels.integrations.trl: patch / unpatch identity, version checks, function-level equality with TRL's
originals, and real TRL runs (GRPOTrainer, DPOTrainer) on a tiny model, patched vs unpatched: same losses and
gradients in fp32, and a lower peak memory of the log-prob path at a 32k vocabulary."""

from __future__ import annotations

import ctypes
import gc
import math
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="trl not installed (pip install -r requirements-dev.txt)")
pytest.importorskip("datasets", reason="datasets not installed (pip install -r requirements-dev.txt)")

import trl  # noqa: E402
import trl.kernels  # noqa: E402
import trl.kernels.chunked_logprob  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402

import lacot_kernels as lk  # noqa: E402
import lacot_kernels.integrations.trl as lt  # noqa: E402
from lacot_kernels import reference  # noqa: E402

from .hf_tiny import tiny_qwen2, word_tokenizer  # noqa: E402

ORIG_SLS = trl_utils.selective_log_softmax
ORIG_ENT = trl_utils.entropy_from_logits
ORIG_SLSE = trl_utils.selective_log_softmax_and_entropy
ORIG_CHUNKED = trl_utils._ChunkedLogProbFunction
ORIG_KERNELS_CHUNKED = trl.kernels.ChunkedLogProbFunction


@pytest.fixture(autouse=True)
def _always_unpatched():
    lt.unpatch()
    yield
    lt.unpatch()


def _assert_originals():
    assert trl_utils.selective_log_softmax is ORIG_SLS
    assert trl_utils.entropy_from_logits is ORIG_ENT
    assert trl_utils.selective_log_softmax_and_entropy is ORIG_SLSE
    assert trl_utils._ChunkedLogProbFunction is ORIG_CHUNKED
    assert trl.kernels.ChunkedLogProbFunction is ORIG_KERNELS_CHUNKED
    assert trl.kernels.chunked_logprob.ChunkedLogProbFunction is ORIG_KERNELS_CHUNKED


# ----------------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------------
def test_patch_replaces_every_binding_and_unpatch_restores_identity(monkeypatch):
    # A trl module that did `from .utils import selective_log_softmax, entropy_from_logits` before patching.
    consumer = types.ModuleType("trl._lacot_test_consumer")
    consumer.selective_log_softmax = ORIG_SLS
    consumer.entropy_from_logits = ORIG_ENT
    consumer.unrelated = len
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)

    lt.patch()
    assert lt.is_patched()
    assert trl_utils.selective_log_softmax is lt.selective_log_softmax
    assert trl_utils.entropy_from_logits is lt.entropy_from_logits
    assert trl_utils.selective_log_softmax_and_entropy is lt.selective_log_softmax_and_entropy
    assert trl_utils._ChunkedLogProbFunction is lt.FusedHeadLogProbs
    assert trl.kernels.ChunkedLogProbFunction is lt.FusedHeadLogProbs
    assert trl.kernels.chunked_logprob.ChunkedLogProbFunction is lt.FusedHeadLogProbs
    assert consumer.selective_log_softmax is lt.selective_log_softmax
    assert consumer.entropy_from_logits is lt.entropy_from_logits
    assert consumer.unrelated is len

    # Patching twice is a no-op: the recorded originals stay TRL's, so unpatch still restores them.
    replaced = list(lt._STATE.replaced)
    lt.patch()
    assert lt._STATE.replaced == replaced
    assert all(orig is not lt.selective_log_softmax for _, _, orig in replaced)

    # A module imported while patched binds the replacement; unpatch gives it the original too.
    late = types.ModuleType("trl._lacot_test_late")
    late.selective_log_softmax = trl_utils.selective_log_softmax
    monkeypatch.setitem(sys.modules, late.__name__, late)

    lt.unpatch()
    assert not lt.is_patched()
    _assert_originals()
    assert consumer.selective_log_softmax is ORIG_SLS
    assert consumer.entropy_from_logits is ORIG_ENT
    assert late.selective_log_softmax is ORIG_SLS
    lt.unpatch()  # unpatching twice does nothing
    _assert_originals()


def test_patched_context_manager():
    with lt.patched():
        assert trl_utils._ChunkedLogProbFunction is lt.FusedHeadLogProbs
        with lt.patched():  # nested: the inner block does not unpatch the outer one
            pass
        assert trl_utils._ChunkedLogProbFunction is lt.FusedHeadLogProbs
    _assert_originals()
    with pytest.raises(RuntimeError, match="boom"):
        with lt.patched():
            raise RuntimeError("boom")
    _assert_originals()


def test_patch_arguments_and_backend_conflict():
    with pytest.raises(ValueError, match="backend must be one of"):
        lt.patch("cudnn")
    with pytest.raises(TypeError, match="check_version must be a bool"):
        lt.patch(check_version="no")
    lt.patch("torch")
    with pytest.raises(ValueError, match="already patched with backend='torch'"):
        lt.patch("auto")
    lt.patch("torch")


@pytest.mark.parametrize("version", ["0.14.0", "0.9.1", "1.17.0", "2.0.0.dev0"])
def test_unsupported_versions_raise(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(lt.UnsupportedTRLVersionError, match=r"trl>=0\.15,<1\.17.*" + version.replace(".", r"\.")):
        lt.patch()
    _assert_originals()
    # Opting out of the range check patches what the release has.
    lt.patch(check_version=False)
    assert trl_utils._ChunkedLogProbFunction is lt.FusedHeadLogProbs


@pytest.mark.parametrize("version", ["0.15.0", "1.9.0", "1.16.0", "1.16.2.dev0"])
def test_supported_versions_pass(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    lt.patch()
    assert lt.is_patched()


def test_legacy_layout_is_detected(monkeypatch):
    # A pre-1.16 release: selective_log_softmax (+ entropy_from_logits), no fused LM head.
    for name in ("_ChunkedLogProbFunction", "add_fused_lm_head", "selective_log_softmax_and_entropy"):
        monkeypatch.delattr(trl_utils, name)
    lt.patch()
    assert trl_utils.selective_log_softmax is lt.selective_log_softmax
    assert trl.kernels.ChunkedLogProbFunction is ORIG_KERNELS_CHUNKED  # not a known binding in this layout
    lt.unpatch()
    assert trl_utils.selective_log_softmax is ORIG_SLS


def test_layout_without_known_functions_raises(monkeypatch):
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    monkeypatch.delattr(trl_utils, "selective_log_softmax")
    with pytest.raises(lt.UnsupportedTRLVersionError, match="neither"):
        lt.patch()
    assert not lt.is_patched()


# ----------------------------------------------------------------------------------------------------------------
# Function-level equality with TRL's originals
# ----------------------------------------------------------------------------------------------------------------
def _logits(B=3, T=7, V=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T + 1, V, generator=g) * 3
    x[0, 0, 5] = 40.0  # a confident row
    return x.to(dtype)[:, :-1]  # a non-contiguous slice, as trainers pass it


def test_selective_log_softmax_and_entropy_match_trl():
    logits = _logits()
    idx = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    row_mask = torch.ones_like(idx)
    row_mask[1, 2:] = 0
    with lt.patched():
        lp = trl_utils.selective_log_softmax(logits, idx)
        lp_t = trl_utils.selective_log_softmax(logits, idx, temperature=0.7, row_mask=row_mask)
        ent = trl_utils.entropy_from_logits(logits)
        lp2, ent2 = trl_utils.selective_log_softmax_and_entropy(logits, idx, temperature=0.7, row_mask=row_mask)
    ref_lp = ORIG_SLS(logits.double(), idx)
    ref_lp_t = ORIG_SLS(logits.double(), idx, temperature=0.7, row_mask=row_mask)
    ref_ent = ORIG_ENT(logits.double())
    ref_lp2, ref_ent2 = ORIG_SLSE(logits.double(), idx, temperature=0.7, row_mask=row_mask)
    for got, ref in ((lp, ref_lp), (lp_t, ref_lp_t), (ent, ref_ent), (lp2, ref_lp2), (ent2, ref_ent2)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert bool((lp_t[1, 2:] == 0).all()) and bool((ent2[1, 2:] == 0).all())


def test_selective_log_softmax_gradients_and_inplace_masking():
    logits = _logits(seed=2).requires_grad_(True)
    ref_in = logits.detach().double().requires_grad_(True)
    idx = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(3))
    mask = torch.rand(idx.shape, generator=torch.Generator().manual_seed(4)) > 0.3
    w = torch.randn(idx.shape, generator=torch.Generator().manual_seed(5))
    with lt.patched():
        lp = trl_utils.selective_log_softmax(logits, idx)
        ent = trl_utils.entropy_from_logits(logits)
    # Pre-1.16 DPO masks the output in place: that must keep the graph valid.
    lp[~mask] = 0.0
    (lp * w).sum().add(0.3 * ent.sum()).backward()
    ref_lp = ORIG_SLS(ref_in, idx)
    ref_lp = torch.where(mask, ref_lp, 0.0)
    (ref_lp * w.double()).sum().add(0.3 * ORIG_ENT(ref_in).sum()).backward()
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)


def test_fallbacks_keep_trl_semantics():
    logits = _logits()
    topk = torch.randint(0, logits.shape[-1], (*logits.shape[:-1], 4))
    lt._WARNED.clear()  # the warning is given once per reason and process
    with lt.patched(), pytest.warns(RuntimeWarning, match=r"top-K"):
        out = trl_utils.selective_log_softmax(logits, topk)
    assert torch.equal(out, ORIG_SLS(logits, topk))
    x64 = logits.double()
    with lt.patched(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert torch.equal(trl_utils.entropy_from_logits(x64), ORIG_ENT(x64))


def test_bf16_logits_give_fp32_closer_to_fp64():
    logits = _logits(seed=6, dtype=torch.bfloat16)
    idx = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(7))
    with lt.patched():
        lp = trl_utils.selective_log_softmax(logits, idx)
    ref = ORIG_SLS(logits.double(), idx)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, atol=1e-4, rtol=0)
    trl_err = (ORIG_SLS(logits, idx).double() - ref).abs().max()
    assert (lp.double() - ref).abs().max() <= trl_err


# ----------------------------------------------------------------------------------------------------------------
# FusedHeadLogProbs == ChunkedLogProbFunction (TRL >= 1.16's fused LM head)
# ----------------------------------------------------------------------------------------------------------------
def _head_case(N=40, D=24, V=333, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.2
    y = torch.randint(0, V, (N,), generator=g)
    # Ties on purpose: rows whose target's logit equals an earlier column's (is_top1 must be False there).
    w[7] = w[3]
    b[7] = b[3]
    y[:4] = 7
    h[:4] = w[3] * 10  # makes columns 3 and 7 the (tied) argmax of the first rows
    return h, w, b, y


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("temperature,logit_scale", [(1.0, 1.0), (0.7, 1.0), (0.9, 0.0625)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_matches_chunked_logprob_function(temperature, logit_scale, with_bias):
    h, w, b, y = _head_case(seed=1)
    b = b if with_bias else None
    ref_args = [t.detach().clone().requires_grad_(True) for t in (h, w)]
    our_args = [t.detach().clone().requires_grad_(True) for t in (h, w)]
    rb = b.clone().requires_grad_(True) if b is not None else None
    ob = b.clone().requires_grad_(True) if b is not None else None
    ref = ORIG_CHUNKED.apply(ref_args[0], ref_args[1], rb, y, temperature, 128, None, logit_scale, ALL_OUTPUTS)
    with lt.patched():
        ours = trl_utils._ChunkedLogProbFunction.apply(
            our_args[0], our_args[1], ob, y, temperature, 128, None, logit_scale, ALL_OUTPUTS
        )
    for name, o, r in zip(ALL_OUTPUTS, ours, ref, strict=True):
        if name == "is_top1":
            assert torch.equal(o, r)
            assert not bool(o[:4].any())  # the tie goes to the earlier column
        else:
            torch.testing.assert_close(o, r, atol=2e-5, rtol=0, msg=name)
    gl = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(9))
    (ref[0] * gl).sum().add(0.2 * ref[1].sum()).backward()
    (ours[0] * gl).sum().add(0.2 * ours[1].sum()).backward()
    torch.testing.assert_close(our_args[0].grad, ref_args[0].grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(our_args[1].grad, ref_args[1].grad, atol=2e-5, rtol=1e-4)
    if b is not None:
        torch.testing.assert_close(ob.grad, rb.grad, atol=2e-5, rtol=1e-4)
    for extra in ours[2:]:
        assert not extra.requires_grad


def test_fused_head_softcap_falls_back_to_trl():
    h, w, b, y = _head_case(seed=2)
    lt._WARNED.clear()
    with lt.patched(), pytest.warns(RuntimeWarning, match="soft-capping"):
        ours = trl_utils._ChunkedLogProbFunction.apply(h, w, b, y, 0.8, 128, 30.0, 1.0, ("log_probs", "entropy"))
    ref = ORIG_CHUNKED.apply(h, w, b, y, 0.8, 128, 30.0, 1.0, ("log_probs", "entropy"))
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


# ----------------------------------------------------------------------------------------------------------------
# Real TRL runs: patched vs unpatched
# ----------------------------------------------------------------------------------------------------------------
VOCAB = 384


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_qwen2(VOCAB).save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    return str(path)


class _GradRecorder:
    """TrainerCallback recording every parameter gradient right before each optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.grads: list[dict[str, torch.Tensor]] = []

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                self.grads.append(
                    {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                )

        return Recorder()


def _count_op_calls(monkeypatch) -> dict[str, int]:
    calls = {"fused": 0}
    real = lt.fused_linear_token_logprobs

    def counting(*args, **kwargs):
        calls["fused"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lt, "fused_linear_token_logprobs", counting)
    return calls


def _train(trainer, patched: bool):
    recorder = _GradRecorder()
    trainer.add_callback(recorder)
    if patched:
        with lt.patched(), warnings.catch_warnings():
            # A fallback to TRL's function would make the comparison vacuous.
            warnings.filterwarnings("error", message="lacot_kernels.integrations.trl")
            trainer.train()
    else:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, recorder.grads


def _assert_same_run(a, b, steps):
    losses_a, grads_a = a
    losses_b, grads_b = b
    assert len(losses_a) == len(losses_b) == steps and len(grads_a) == len(grads_b) == steps
    for la, lb in zip(losses_a, losses_b, strict=True):
        assert math.isfinite(la)
        assert abs(la - lb) <= 1e-5 * max(abs(la), 1e-3), (losses_a, losses_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert ga.keys() == gb.keys() and len(ga) > 0
        for name in ga:
            rel = float((ga[name] - gb[name]).norm() / ga[name].norm().clamp(min=1e-30))
            assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def _reward(completions, **kwargs):
    # Deterministic, varied: rewards depend on the sampled words.
    return [float(sum(int(w[1:]) % 7 for w in c.split() if w[1:].isdigit())) for c in completions]


def _grpo_trainer(model_dir, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = [{"prompt": " ".join(f"w{(i * 7 + j) % 300}" for j in range(5))} for i in range(12)]
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16 autocast; this comparison is in fp32
        beta=0.1,  # a reference model, so its log-probs go through the patched path too
        temperature=0.7,
        entropy_coef=0.01,  # the entropy carries a gradient
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    return GRPOTrainer(
        model=model_dir,
        reward_funcs=_reward,
        args=args,
        train_dataset=Dataset.from_list(prompts),
        processing_class=word_tokenizer(VOCAB),
    )


def _dpo_trainer(model_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [
        {
            "prompt": " ".join(f"w{(i * 5 + j) % 300}" for j in range(4)),
            "chosen": " " + " ".join(f"w{(i * 13 + 7 * j + 1) % 300}" for j in range(5)),
            "rejected": " " + " ".join(f"w{(i * 17 + 11 * j + 150) % 300}" for j in range(4)),
        }
        for i in range(12)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        beta=0.1,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    return DPOTrainer(
        model=model_dir, args=args, train_dataset=Dataset.from_list(rows), processing_class=word_tokenizer(VOCAB)
    )


@pytest.mark.parametrize("make", [_grpo_trainer, _dpo_trainer], ids=["grpo", "dpo"])
def test_trainer_patched_equals_unpatched(make, model_dir, tmp_path, monkeypatch):
    calls = _count_op_calls(monkeypatch)
    unpatched = _train(make(model_dir, tmp_path / "a"), patched=False)
    assert calls["fused"] == 0
    patched = _train(make(model_dir, tmp_path / "b"), patched=True)
    assert calls["fused"] > 0  # the patched run really went through our op
    _assert_same_run(unpatched, patched, steps=3)
    _assert_originals()


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of the log-prob path at a realistic vocabulary
# ----------------------------------------------------------------------------------------------------------------
def _peak_rss_mib(fn) -> float:
    """Peak resident memory of this process above its level before `fn` (Linux: VmHWM reset via clear_refs)."""

    def status_kib(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - base) / 1024


def test_logprob_path_peak_memory_lower_at_32k_vocab():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as exc:
        pytest.skip(f"no peak-RSS reset on this system: {exc}")
    vocab, B, T = 32768, 2, 256
    model = tiny_qwen2(vocab, seed=3)
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100  # prompt positions

    def step():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.01 * out.entropy.sum()).backward()
        return out.log_probs.detach()

    with torch.no_grad():  # first call: lazy initializations outside the measurement
        model(input_ids=ids[:, :8], labels=labels[:, :8], fused_lm_head=True)
    model.zero_grad(set_to_none=True)
    res = {}
    peaks = {}
    for name, ctx in (("unpatched", None), ("patched", lt.patched)):

        def run(ctx=ctx, name=name):
            if ctx is None:
                res[name] = step()
            else:
                with ctx():
                    res[name] = step()

        peaks[name] = _peak_rss_mib(run)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(res["patched"], res["unpatched"], atol=1e-4, rtol=0)
    # One fp32 tile of the logits of the scored rows: what the unpatched path holds several of at once.
    tile_mib = B * T * vocab * 4 / 2**20
    print(f"\nlog-prob path peak extra RSS at V={vocab}, N={B * T}: {peaks} (one logits tile {tile_mib:.0f} MiB)")
    assert peaks["patched"] < 0.75 * peaks["unpatched"], peaks


# ----------------------------------------------------------------------------------------------------------------
# The rollout sampler's truncation and TRL's importance-sampling settings (issue 14)
# ----------------------------------------------------------------------------------------------------------------
def _grpo_config(tmp_path, **kw):
    return trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **kw)


def test_sampler_settings_read_trl_conventions(tmp_path):
    assert lt.sampler_settings(_grpo_config(tmp_path)) == {}  # TRL's defaults: top_k 0, top_p 1, min_p None
    got = lt.sampler_settings(_grpo_config(tmp_path, top_k=20, top_p=0.9, min_p=0.05))
    assert got == {"top_k": 20, "top_p": 0.9, "min_p": 0.05, "sampler_order": "hf"}
    assert lt.sampler_settings({"top_p": 0.8, "use_vllm": True}) == {"top_p": 0.8, "sampler_order": "vllm"}


def test_patched_log_probs_follow_the_sampler_truncation(tmp_path):
    cfg = _grpo_config(tmp_path, top_k=12, top_p=0.85)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 97, generator=g) * 3
    x = logits[:, :-1]  # TRL's slice layout
    keep = reference.kept_mask(x, temperature=0.8, top_k=12, top_p=0.85, order="hf")
    z = torch.where(keep, x.double() / 0.8, float("-inf"))
    idx = torch.multinomial(torch.softmax(z, -1).view(-1, 97), 1, generator=g).view(3, 6)
    want, want_ent = reference.token_logprobs_truncated(x, idx, keep, temperature=0.8)
    with lt.patched(sampler=cfg):
        got = trl_utils.selective_log_softmax(x, idx, temperature=0.8)
        got2, ent = trl_utils.selective_log_softmax_and_entropy(x, idx, temperature=0.8)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got2.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-5, rtol=0)
    # Unpatched (or patched without a sampler) it is the untruncated log-prob again.
    with lt.patched():
        plain = trl_utils.selective_log_softmax(x, idx, temperature=0.8)
    assert (plain < got - 1e-3).all()


def test_fused_head_follows_the_sampler_truncation(tmp_path):
    h, w, b, y = _head_case(seed=2)
    logits = (h.double() @ w.double().T) + b.double()
    T, scale = 0.9, 0.5
    keep = reference.kept_mask(logits, temperature=T / scale, top_k=8, order="vllm")
    z = torch.where(keep, logits * scale / T, float("-inf"))
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    want, want_ent = reference.token_logprobs_truncated(logits, y, keep, temperature=T / scale)
    with lt.patched(sampler={"top_k": 8, "use_vllm": True}):
        lp, ent, *_ = trl_utils._ChunkedLogProbFunction.apply(h, w, b, y, T, 128, None, scale, ("log_probs", "entropy"))
    torch.testing.assert_close(lp.double(), want, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=2e-5, rtol=0)


def test_patch_with_other_sampler_settings_conflicts():
    lt.patch(sampler={"top_k": 5})
    lt.patch(sampler={"top_k": 5})  # the same: nothing to do
    with pytest.raises(ValueError, match="sampler settings"):
        lt.patch(sampler={"top_k": 6})
    lt.unpatch()
    with pytest.raises(ValueError, match="top_p"):
        lt.patch(sampler={"top_p": -0.5})
    assert not lt.is_patched()


@pytest.mark.parametrize(
    "mode,clip_min,want",
    [
        ("token_truncate", None, dict(is_correction="tis", is_cap=3.0, is_level="token")),
        ("token_mask", None, dict(is_correction="mis", is_cap=3.0, is_level="token")),
        ("sequence_mask", None, dict(is_correction="mis", is_cap=3.0, is_level="sequence")),
        ("sequence_truncate", None, dict(is_correction="tis", is_cap=3.0, is_level="sequence")),
        ("token_mask", 0.5, dict(is_correction="icepop", is_band=(0.5, 3.0), is_level="token")),
    ],
)
def test_grpo_loss_kwargs_map_trls_importance_sampling(tmp_path, mode, clip_min, want):
    cfg = _grpo_config(
        tmp_path, use_vllm=True, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
        epsilon=0.2, epsilon_high=0.28, importance_sampling_level="sequence", loss_type="grpo", top_p=0.9,
    )  # fmt: skip
    kw = lt.grpo_loss_kwargs(cfg)
    for k, v in want.items():
        assert kw[k] == v, (k, kw)
    assert kw["eps_low"] == 0.2 and kw["eps_high"] == 0.28 and kw["ratio_level"] == "sequence"
    assert kw["top_p"] == 0.9 and kw["sampler_order"] == "vllm"
    # The kwargs are accepted by the loss as they are.
    B, T = 2, 5
    lp = torch.randn(B, T) - 2
    lk.grpo_loss(lp, lp + 0.01, torch.randn(B), torch.ones(B, T), rollout_logp=lp - 0.05, **{
        k: v for k, v in kw.items() if k not in ("top_k", "top_p", "min_p", "sampler_order")
    })  # fmt: skip


def test_grpo_loss_kwargs_match_trls_ratio_on_its_formula():
    # TRL's token_mask: rho = exp((old - sampling) * mask), zeroed outside [clip_min, clip_max]; ours: icepop.
    g = torch.Generator().manual_seed(0)
    old, samp = torch.randn(3, 6, generator=g) - 2, torch.randn(3, 6, generator=g) - 2
    mask = (torch.rand(3, 6, generator=g) > 0.3).float()
    rho = torch.exp((old - samp) * mask)
    trl_w = rho.masked_fill((rho < 0.5) | (rho > 3.0), 0.0)
    ours, _ = lk.rollout_is_weights(old, samp, mask, mode="icepop", band=(0.5, 3.0))
    torch.testing.assert_close(ours * mask, trl_w * mask)


def test_grpo_loss_kwargs_refuse_what_has_no_equivalent():
    with pytest.raises(ValueError, match="loss_type"):
        lt.grpo_loss_kwargs({"loss_type": "cispo"})
    with pytest.raises(ValueError, match="two-sided"):
        lt.grpo_loss_kwargs(
            {"use_vllm": True, "vllm_importance_sampling_correction": True,
             "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_min": 0.5}
        )  # fmt: skip
    assert "is_correction" not in lt.grpo_loss_kwargs({"use_vllm": False, "vllm_importance_sampling_correction": True})
