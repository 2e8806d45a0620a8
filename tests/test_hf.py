"""lacot_kernels.hf.token_logprobs_from_model against the model's own logits: tiny Qwen2 (tied and untied), Llama,
Qwen2.5-VL with an image, a head with a bias, logit-scaled heads (Cohere, Granite), LoRA adapters (peft),
autograd against an fp64 copy of the model, no_grad, bf16 autocast and bf16 weights, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed (pip install -r requirements-dev.txt)")

import lacot_kernels as lk  # noqa: E402
from lacot_kernels import reference  # noqa: E402
from lacot_kernels.hf import token_logprobs_from_model  # noqa: E402

from .helpers import ALL_BACKENDS  # noqa: E402
from .hf_tiny import tiny_llama, tiny_qwen2, tiny_qwen25_vl, vl_inputs  # noqa: E402

V = 512


def _text_inputs(B=2, T=11, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of the second sequence
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]  # next-token scoring: inputs shifted left by one
    targets[0, :2] = -100  # prompt positions
    targets[1, :3] = -100  # padding
    return ids, mask, targets


def _reference(model, ids, targets, temperature=1.0, **inputs):
    """log_softmax(model(...).logits / T).gather(...) in fp64, 0 where targets == -100, and the entropy."""
    logits = model(input_ids=ids, **inputs).logits
    return reference.token_logprobs(logits, targets, temperature=temperature)


MODELS = {
    "qwen2": lambda: tiny_qwen2(V),
    "qwen2-tied": lambda: tiny_qwen2(V, tie=True),
    "llama": lambda: tiny_llama(V),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_equals_model_logits(name, temperature):
    model = MODELS[name]()
    ids, mask, targets = _text_inputs()
    with torch.no_grad():
        ref_lp, ref_ent = _reference(model, ids, targets, temperature, attention_mask=mask)
        lp, ent = token_logprobs_from_model(
            model, ids, targets, attention_mask=mask, temperature=temperature, return_entropy=True
        )
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ids.shape
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    assert bool((lp[targets == -100] == 0).all()) and bool((ent[targets == -100] == 0).all())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_every_backend(device, backend):
    model = tiny_qwen2(V).to(device)
    ids, mask, targets = (t.to(device) for t in _text_inputs(seed=1))
    with torch.no_grad():
        ref_lp, _ = _reference(model, ids, targets, 0.8, attention_mask=mask)
        lp = token_logprobs_from_model(model, ids, targets, attention_mask=mask, temperature=0.8, backend=backend)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)


def test_qwen25_vl_with_image():
    model = tiny_qwen25_vl(V)
    inputs = vl_inputs(batch=2, vocab_size=V)
    ids = inputs.pop("input_ids")
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[ids == 5] = -100  # image pad positions are not scored
    with torch.no_grad():
        ref_lp, ref_ent = _reference(model, ids, targets, 0.9, **inputs)
        lp, ent = token_logprobs_from_model(model, ids, targets, temperature=0.9, return_entropy=True, **inputs)
        # The image changes the text positions' log-probs (the vision tower really ran).
        blank = dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))
        lp_blank = token_logprobs_from_model(model, ids, targets, temperature=0.9, **blank)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    assert (lp - lp_blank).abs().max() > 1e-4


def _grad_check(model, ids, targets, temperature, mask=None, params=None, **inputs):
    """Gradients of (w * logp).sum() + 0.1 * entropy.sum() through our path (fp32) and through the model's own
    logits on an fp64 copy of the model; compared per parameter, relative to each gradient's size."""
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(ids.shape, generator=g)
    lp, ent = token_logprobs_from_model(
        model, ids, targets, attention_mask=mask, temperature=temperature, return_entropy=True, **inputs
    )
    ((w * lp).sum() + 0.1 * ent.sum()).backward()
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref_lp, ref_ent = _reference(model64, ids, targets, temperature, attention_mask=mask, **inputs64)
    ((w.double() * ref_lp).sum() + 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(lp.detach().double(), ref_lp.detach(), atol=1e-5, rtol=0)
    n_checked = 0
    for (name, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters(), strict=True):
        if params is not None and not any(s in name for s in params):
            continue
        if p64.grad is None:
            assert p.grad is None or not bool(p.grad.any()), name
            continue
        assert p.grad is not None, name
        scale = float(p64.grad.abs().max()) + 1e-12
        err = float((p.grad.double() - p64.grad).abs().max())
        assert err <= 2e-4 * scale + 1e-7, f"{name}: max err {err:.2e} (grad scale {scale:.2e})"
        n_checked += 1
    assert n_checked > 0


@pytest.mark.parametrize("name", ["qwen2", "qwen2-tied"])
def test_gradients_against_fp64_model(name):
    model = MODELS[name]()
    ids, mask, targets = _text_inputs(seed=2)
    _grad_check(model, ids, targets, 0.7, mask=mask)
    if name == "qwen2-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_head_with_bias():
    model = tiny_qwen2(V)
    head = torch.nn.Linear(model.config.hidden_size, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.randn(V, generator=torch.Generator().manual_seed(3)))
    model.set_output_embeddings(head)
    ids, mask, targets = _text_inputs(seed=3)
    _grad_check(model, ids, targets, 1.0, mask=mask, params=["lm_head"])
    assert model.lm_head.bias.grad is not None and bool(model.lm_head.bias.grad.any())


def test_qwen25_vl_gradients_reach_the_vision_tower():
    model = tiny_qwen25_vl(V)
    inputs = vl_inputs(batch=1, text_len=4, vocab_size=V, seed=4)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[ids == 5] = -100
    _grad_check(model, ids, targets, 1.0, mask=mask, params=["visual.merger", "lm_head", "layers.1.mlp"], **inputs)


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_logit_scale_semantics(family):
    import transformers as tf

    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    if family == "cohere":
        model = tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.25, tie_word_embeddings=False, **kw)).eval()
        assert lk.hf.lm_head_logit_scale(model.config) == 0.25
    else:
        model = tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=4.0, **kw)).eval()
        assert lk.hf.lm_head_logit_scale(model.config) == 0.25
    ids, mask, targets = _text_inputs(seed=5)
    with torch.no_grad():
        ref_lp, ref_ent = _reference(model, ids, targets, 0.5, attention_mask=mask)
        lp, ent = token_logprobs_from_model(
            model, ids, targets, attention_mask=mask, temperature=0.5, return_entropy=True
        )
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)


def test_softcapping_raises():
    import transformers as tf

    config = tf.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=30.0,
    )
    model = tf.Gemma2ForCausalLM(config).eval()
    ids, mask, targets = _text_inputs(seed=6)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
        token_logprobs_from_model(model, ids, targets)


def test_no_grad_and_grad_modes():
    model = tiny_qwen2(V)
    ids, mask, targets = _text_inputs(seed=7)
    with torch.no_grad():
        a = token_logprobs_from_model(model, ids, targets, attention_mask=mask)
    b = token_logprobs_from_model(model, ids, targets, attention_mask=mask)
    assert not a.requires_grad and b.requires_grad
    torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


def _lora_model(target_modules):
    peft = pytest.importorskip("peft", reason="peft not installed (pip install -r requirements-dev.txt)")
    base = tiny_qwen2(V)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, init_lora_weights=False
    )
    return peft.get_peft_model(base, config)


def test_lora_adapters():
    model = _lora_model(["q_proj", "v_proj"])
    ids, mask, targets = _text_inputs(seed=8)
    with torch.no_grad():
        ref_lp, _ = _reference(model, ids, targets, 0.9, attention_mask=mask)
        with model.disable_adapter():
            base_lp = token_logprobs_from_model(model, ids, targets, attention_mask=mask, temperature=0.9)
    lp = token_logprobs_from_model(model, ids, targets, attention_mask=mask, temperature=0.9)
    torch.testing.assert_close(lp.detach().double(), ref_lp, atol=1e-5, rtol=0)
    assert (lp.detach() - base_lp).abs().max() > 1e-4  # the adapters are active
    lp.sum().backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and bool(p.grad.any()) for _, p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # and the LoRA gradients are right
    model.zero_grad(set_to_none=True)
    _grad_check(model, ids, targets, 0.9, mask=mask, params=["lora_"])


def test_lora_on_the_head_is_refused():
    model = _lora_model(["q_proj", "lm_head"])
    ids, mask, targets = _text_inputs(seed=9)
    with pytest.raises(NotImplementedError, match="LM head is wrapped by an adapter"):
        token_logprobs_from_model(model, ids, targets)


def test_bf16_autocast_and_bf16_weights():
    model = tiny_qwen2(V)
    ids, mask, targets = _text_inputs(seed=10)
    head = model.lm_head.weight
    # Under autocast the head runs on bf16 values (as nn.Linear would), accumulated in fp32: the oracle is the
    # fp64 head applied to the same bf16 hidden states and bf16 weight.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lp, ent = token_logprobs_from_model(model, ids, targets, attention_mask=mask, return_entropy=True)
    assert lp.dtype == torch.float32
    ref_lp, ref_ent = reference.fused_linear_token_logprobs(hidden.bfloat16(), head.bfloat16(), targets)
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=0)

    model_bf16 = tiny_qwen2(V).to(torch.bfloat16)
    lp16 = token_logprobs_from_model(model_bf16, ids, targets, attention_mask=mask)
    with torch.no_grad():
        hidden16 = model_bf16.model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref16, _ = reference.fused_linear_token_logprobs(hidden16, model_bf16.lm_head.weight, targets)
    torch.testing.assert_close(lp16.detach().double(), ref16, atol=2e-5, rtol=0)
    lp16.sum().backward()
    assert model_bf16.lm_head.weight.grad.dtype == torch.bfloat16


def test_bad_arguments():
    model = tiny_qwen2(V)
    ids, mask, targets = _text_inputs(seed=11)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        token_logprobs_from_model("qwen", ids, targets)
    with pytest.raises(TypeError, match="input_ids must have dtype int32/int64, got torch.float32"):
        token_logprobs_from_model(model, ids.float(), targets)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\), got \(22,\)"):
        token_logprobs_from_model(model, ids.flatten(), targets.flatten())
    with pytest.raises(ValueError, match=r"targets must have the shape of input_ids \(2, 11\).*got \(2, 10\)"):
        token_logprobs_from_model(model, ids, targets[:, :-1])
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        token_logprobs_from_model(model, ids, targets, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got 0"):
        token_logprobs_from_model(model, ids, targets, temperature=0)
    with pytest.raises(TypeError, match="does not take 'labels'"):
        token_logprobs_from_model(model, ids, targets, labels=targets)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        token_logprobs_from_model(model, ids, targets, return_entropy=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs_from_model(model, ids, targets, backend="cublas")
    with pytest.raises(ValueError, match=r"targets must be in \[0, 512\)"):
        token_logprobs_from_model(model, ids, targets.masked_fill(targets == -100, 600))
    with pytest.raises(ValueError, match="has no output embeddings"):
        token_logprobs_from_model(torch.nn.Linear(3, 3), ids, targets)


# ---- patch_model: the model's own forward returns log-probs of its labels, without logits ----------------------


class _LogitsWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor an aten op produces (forward and backward) whose last dim is the vocabulary and that
    holds at least `rows` rows of it: any materialized (B, T, V) / (B*T, V) logits or logits gradient."""

    def __init__(self, vocab: int, rows: int):
        super().__init__()
        self.vocab, self.rows, self.seen = vocab, rows, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                if t.numel() // self.vocab >= self.rows:
                    self.seen.append((str(func), tuple(t.shape)))
        return out


def _hf_labels(ids, mask):
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # prompt tokens are not scored
    return labels


def test_patch_model_returns_logprobs_loss_and_entropy_of_labels():
    model = tiny_qwen2(V)
    ids, mask, _ = _text_inputs(seed=12)
    labels = _hf_labels(ids, mask)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        lk.hf.patch_model(model, temperature=1.0)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.logprobs.shape == ids.shape and out.entropy.shape == ids.shape
    # The unpatched model's log_softmax-gathered log-probs of the shifted labels, in fp64.
    shifted = labels[:, 1:]
    ref_lp, ref_ent = reference.token_logprobs(plain.logits[:, :-1], shifted)
    torch.testing.assert_close(out.logprobs[:, :-1].double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy[:, :-1].double(), ref_ent, atol=1e-5, rtol=0)
    assert not out.logprobs[:, -1].any()
    # loss is the model's own causal-LM loss (mean NLL of the scored tokens); out[0] / out["loss"] as trainers read.
    torch.testing.assert_close(out.loss, plain.loss, atol=1e-5, rtol=1e-5)
    assert out[0] is out.loss and out["loss"] is out.loss
    lk.hf.unpatch_model(model)


def test_patch_model_allocates_no_vocab_sized_tensor():
    model = tiny_qwen2(V).train()
    ids, mask, _ = _text_inputs(seed=13)
    labels = _hf_labels(ids, mask)
    scored = int((labels[:, 1:] != -100).sum())
    # The detector does fire on the unpatched model (its B x T x V logits)...
    with _LogitsWatch(V, scored) as watch:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert watch.seen
    model.zero_grad()
    # ...and nothing vocabulary-sized is produced or saved for backward by the patched one, forward + backward.
    saved = []

    def pack(t):
        if t.dim() >= 1 and t.shape[-1] == V and t.numel() // V >= scored:
            saved.append(tuple(t.shape))
        return t

    with lk.hf.patched(model), _LogitsWatch(V, scored) as watch:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        (out.loss + 0.1 * out.entropy.sum()).backward()
    assert watch.seen == [] and saved == [], (watch.seen, saved)
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_patch_model_is_reversible_and_instance_local():
    model, other = tiny_qwen2(V), tiny_qwen2(V)
    ids, mask, targets = _text_inputs(seed=14)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    assert "forward" not in model.__dict__
    with lk.hf.patched(model, return_entropy=False) as m:
        assert m is model and "forward" in model.__dict__
        with torch.no_grad():
            # Without labels (generate, plain scoring) the original forward runs: logits as before.
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)
            out = model(ids, attention_mask=mask, targets=targets)  # already-shifted targets, positional ids
        assert out.entropy is None
        ref = token_logprobs_from_model(model, ids, targets, attention_mask=mask)
        torch.testing.assert_close(out.logprobs, ref, atol=0, rtol=0)
        assert "forward" not in other.__dict__  # other instances and the class are untouched
        with pytest.raises(ValueError, match="already patched"):
            lk.hf.patch_model(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_lacot_patch")
    with pytest.raises(ValueError, match="not patched"):
        lk.hf.unpatch_model(model)
    # The context manager unpatches on an exception too.
    with pytest.raises(RuntimeError, match="boom"), lk.hf.patched(model):
        raise RuntimeError("boom")
    assert "forward" not in model.__dict__
    # An instance-level forward that was there before (accelerate hooks put one) is what comes back.
    hooked = model.forward
    model.forward = hooked
    lk.hf.patch_model(model)
    lk.hf.unpatch_model(model)
    assert model.__dict__["forward"] is hooked


def test_patch_model_qwen25_vl_with_image():
    model = tiny_qwen25_vl(V)
    inputs = vl_inputs(batch=2, vocab_size=V)
    labels = inputs["input_ids"].clone()
    labels[labels == 5] = -100  # image pad tokens
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        with lk.hf.patched(model, temperature=0.8):
            out = model(**inputs, labels=labels)
    ref_lp, ref_ent = reference.token_logprobs(plain.logits[:, :-1], labels[:, 1:], temperature=0.8)
    torch.testing.assert_close(out.logprobs[:, :-1].double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy[:, :-1].double(), ref_ent, atol=1e-5, rtol=0)


def test_patch_model_errors():
    model = tiny_qwen2(V)
    ids, mask, targets = _text_inputs(seed=15)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lk.hf.patch_model("qwen")
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        lk.hf.patch_model(model, temperature=-1.0)
    assert "forward" not in model.__dict__
    with lk.hf.patched(model):
        with pytest.raises(TypeError, match="either labels .* or targets"):
            model(ids, labels=ids, targets=targets)
        with pytest.raises(TypeError, match="needs input_ids"):
            model(inputs_embeds=torch.zeros(2, 11, 64), labels=ids)
