"""lacot_kernels.compat.verl against verl's formulas (log_softmax + gather; logsumexp - sum(softmax * logits)) in
fp64, on every backend, with the sliced (B, L, V) logits verl's actor passes, gradients, and the errors."""

from __future__ import annotations

import inspect

import pytest
import torch

import lacot_kernels._dropin as dropin
from lacot_kernels import reference
from lacot_kernels.compat import verl

from .helpers import ALL_BACKENDS


def verl_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """verl's torch fallback: log_softmax, then gather (fp64 here, as the oracle)."""
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    return torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1)


def _actor_logits(B=3, L=6, V=257, seed=0, dtype=torch.float32):
    """What verl's actor scores: logits of the whole sequence, temperature-divided, sliced to the response."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, L + 5, V, generator=g) * 4
    full[0, 2, 9] = 60.0  # a confident row
    full.div_(0.7)
    responses = torch.randint(0, V, (B, L), generator=g)
    return full.to(dtype)[:, -L - 1 : -1], responses


@pytest.fixture(params=ALL_BACKENDS, ids=[f"{d}-{b}" for d, b in ALL_BACKENDS])
def device(request, monkeypatch):
    device, backend = request.param
    monkeypatch.setenv("LACOT_BACKEND", backend)  # the verl signatures have no backend argument
    return device


def test_signatures_match_verl():
    # verl.utils.torch_functional / verl.utils.kernel.linear_cross_entropy, by parameter names and defaults.
    sig = inspect.signature(verl.logprobs_from_logits)
    assert list(sig.parameters) == ["logits", "labels", "inplace_backward"]
    assert sig.parameters["inplace_backward"].default is True
    assert list(inspect.signature(verl.entropy_from_logits).parameters) == ["logits"]
    sig = inspect.signature(verl.entropy_from_logits_with_chunking)
    assert list(sig.parameters) == ["logits", "chunk_size"] and sig.parameters["chunk_size"].default == 2048
    sig = inspect.signature(verl.linear_cross_entropy)
    assert list(sig.parameters) == ["hidden", "weight", "labels", "temperature", "reduction", "dist_process_group"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy(device, dtype):
    logits, labels = _actor_logits(dtype=dtype)
    logits, labels = logits.to(device), labels.to(device)
    lp = verl.logprobs_from_logits(logits, labels)
    ent = verl.entropy_from_logits(logits)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    # Against the fp64 formulas on the same (possibly bf16-rounded) values.
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(lp.double(), verl_logprobs(logits, labels), atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), verl_entropy(logits), atol=tol, rtol=0)
    flat = logits.reshape(-1, logits.shape[-1])
    torch.testing.assert_close(
        verl.entropy_from_logits_with_chunking(flat, chunk_size=4).double(), verl_entropy(flat), atol=tol, rtol=0
    )


def test_gradients(device):
    logits, labels = _actor_logits(seed=1)
    base = logits.detach().clone().to(device).requires_grad_(True)
    ref_in = logits.detach().double().to(device).requires_grad_(True)
    labels = labels.to(device)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (verl.logprobs_from_logits(base, labels) * g).sum().add(0.05 * verl.entropy_from_logits(base).sum()).backward()
    (verl_logprobs(ref_in, labels) * g.double()).sum().add(0.05 * verl_entropy(ref_in).sum()).backward()
    torch.testing.assert_close(base.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)


def test_ignored_labels_give_zero():
    logits, labels = _actor_logits(seed=3)
    labels[1, 2:] = -100
    lp = verl.logprobs_from_logits(logits, labels)
    assert bool((lp[1, 2:] == 0).all())
    torch.testing.assert_close(lp[0].double(), verl_logprobs(logits[0], labels[0]), atol=1e-5, rtol=0)


def test_sliced_logits_are_not_copied(monkeypatch):
    """verl's actor scores logits[:, -L-1:-1]: each sequence is handed to the op as a free view of the storage."""
    logits, labels = _actor_logits(B=4, seed=4)
    seen = []
    real = dropin.token_logprobs

    def spy(x, *args, **kwargs):
        seen.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(dropin, "token_logprobs", spy)
    lp = verl.logprobs_from_logits(logits, labels)
    assert len(seen) == logits.shape[0]
    for x in seen:
        assert x.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        x.view(-1, x.shape[-1])  # flattens without a copy
    torch.testing.assert_close(lp.double(), verl_logprobs(logits, labels), atol=1e-5, rtol=0)


def test_linear_cross_entropy(device):
    g = torch.Generator().manual_seed(5)
    B, T, D, V = 2, 5, 16, 300
    hidden = torch.randn(B, T, D, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.3).to(device).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    logp, ent = verl.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    assert logp.shape == ent.shape == (B * T,)  # flattened, as verl returns them
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref_lp, ref_ent = reference.fused_linear_token_logprobs(
        h64.reshape(-1, D), w64, labels.reshape(-1), temperature=0.8
    )
    torch.testing.assert_close(logp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    (logp.sum() - 0.1 * ent.sum()).backward()
    (ref_lp.sum() - 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=2e-5, rtol=1e-4)
    # None means the defaults, as in verl
    lp_none, _ = verl.linear_cross_entropy(hidden, weight, labels.reshape(-1), None, None)
    torch.testing.assert_close(lp_none, verl.linear_cross_entropy(hidden, weight, labels)[0])


def test_bad_arguments():
    logits, labels = _actor_logits(seed=6)
    with pytest.raises(ValueError, match=r"labels.shape must equal logits.shape\[:-1\] = \(3, 6\), got \(3, 5\)"):
        verl.logprobs_from_logits(logits, labels[:, 1:])
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        verl.logprobs_from_logits(logits, labels.tolist())
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        verl.logprobs_from_logits(logits, labels, inplace_backward="yes")
    with pytest.raises(TypeError, match="logits must have dtype float32/bfloat16/float16, got torch.float64"):
        verl.entropy_from_logits(logits.double())
    with pytest.raises(ValueError, match=r"logits must have shape \(N, V\), got \(3, 6, 257\)"):
        verl.entropy_from_logits_with_chunking(logits)
    with pytest.raises(ValueError, match="chunk_size must be > 0, got 0"):
        verl.entropy_from_logits_with_chunking(logits[0], chunk_size=0)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="reduction must be 'none', 'sum' or 'mean'"):
        verl.linear_cross_entropy(h, w, y, 1.0, "max")
    with pytest.raises(ValueError, match=r"labels must hold one id per token of hidden \(4 ="):
        verl.linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        verl.linear_cross_entropy(h, w, y, -1.0)


# ---- linear_cross_entropy reductions and a vocabulary-parallel group -------------------------------------------


def test_linear_cross_entropy_reductions():
    g = torch.Generator().manual_seed(21)
    h = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(41, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 41, (2, 5), generator=g)
    y[1, 4] = -100
    lp, ent = verl.linear_cross_entropy(h, w, y, 0.8, "none")
    ref_lp, ref_ent = reference.token_logprobs(h.double() @ w.double().T, y, temperature=0.8)
    torch.testing.assert_close(lp.double(), ref_lp.flatten(), atol=1e-5, rtol=0)
    s, ent_s = verl.linear_cross_entropy(h, w, y, 0.8, "sum")
    m, _ = verl.linear_cross_entropy(h, w, y, 0.8, "mean")
    assert s.shape == () and m.shape == () and ent_s.shape == (10,)
    torch.testing.assert_close(s.double(), ref_lp.sum(), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.double(), ref_lp.sum() / 10, atol=1e-5, rtol=0)  # verl divides by every token
    torch.testing.assert_close(ent_s, ent)
    (gh,) = torch.autograd.grad(m, h)
    (gh_ref,) = torch.autograd.grad(lp.sum() / 10, h)
    torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=0)


def _tp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(22)
        h_full = torch.randn(6, 16, generator=g)
        w_full = torch.randn(4 * 13, 16, generator=g) * 2
        y = torch.randint(0, 4 * 13, (6,), generator=g)
        y[2] = -100
        v = w_full.shape[0] // world
        h = h_full.clone().requires_grad_()
        w = w_full[rank * v : (rank + 1) * v].clone().requires_grad_()
        lp, ent = verl.linear_cross_entropy(h, w, y, 0.7, "none", dist.group.WORLD)
        (lp * torch.arange(1.0, 7.0) + 0.3 * ent).sum().backward()
        torch.save({"lp": lp.detach(), "ent": ent.detach(), "gh": h.grad, "gw": w.grad}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_linear_cross_entropy_vocab_parallel(tmp_path, world):
    # Each rank holds a vocabulary shard of the head: every rank returns the full-vocabulary log-probs and entropy;
    # its weight gradient is its shard of the full one and the hidden gradients sum to the full one.
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(world, tmp_path / "init", tmp_path / "out"), nprocs=world, join=True)
    g = torch.Generator().manual_seed(22)
    h = torch.randn(6, 16, generator=g).requires_grad_()
    w = (torch.randn(4 * 13, 16, generator=g) * 2).requires_grad_()
    y = torch.randint(0, 4 * 13, (6,), generator=g)
    y[2] = -100
    lp, ent = verl.linear_cross_entropy(h, w, y, 0.7, "none")
    (lp * torch.arange(1.0, 7.0) + 0.3 * ent).sum().backward()
    outs = [torch.load(f"{tmp_path / 'out'}.{r}") for r in range(world)]
    v = w.shape[0] // world
    for r, out in enumerate(outs):
        torch.testing.assert_close(out["lp"], lp.detach(), atol=2e-5, rtol=0)
        torch.testing.assert_close(out["ent"], ent.detach(), atol=2e-5, rtol=0)
        torch.testing.assert_close(out["gw"], w.grad[r * v : (r + 1) * v], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sum(o["gh"] for o in outs), h.grad, atol=2e-5, rtol=1e-4)


# ---- core_algos: verl's own functions (read from the installed verl) against ours ------------------------------


def _verl_core_algos():
    """verl 0.9's agg_loss / compute_policy_loss / compute_policy_loss_vanilla / compute_grpo_outcome_advantage,
    executed from the installed verl's source. Importing verl itself pulls ray, omegaconf, tensordict, ...; so
    only these functions (and the two masked helpers they call) are compiled, in a namespace with torch / numpy.
    Install it with `pip install --no-deps -r requirements-dev-nodeps.txt` (make venv does)."""
    import ast
    import importlib.metadata
    import importlib.util
    from collections import defaultdict
    from pathlib import Path
    from types import SimpleNamespace
    from typing import Any, Optional

    import numpy as np

    spec = importlib.util.find_spec("verl")  # finds the package without executing verl/__init__.py
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("verl is not installed: pip install --no-deps -r requirements-dev-nodeps.txt")
    root = Path(spec.submodule_search_locations[0])

    def functions(path, names):
        tree = ast.parse((root / path).read_text())
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        for n in nodes:
            n.decorator_list = []  # @deprecated / @register_* need verl's registries
        assert {n.name for n in nodes} == set(names), f"verl {path} lacks {set(names) - {n.name for n in nodes}}"
        return ast.Module(body=nodes, type_ignores=[])

    helpers: dict = {"torch": torch}
    exec(compile(functions("utils/torch_functional.py", ["masked_sum", "masked_mean"]), "verl_F", "exec"), helpers)

    class AlgoConfig:  # only used in an isinstance check
        pass

    ns = {
        "torch": torch,
        "np": np,
        "defaultdict": defaultdict,
        "Optional": Optional,
        "Any": Any,
        "verl_F": SimpleNamespace(**{k: helpers[k] for k in ("masked_sum", "masked_mean")}),
        "AlgoConfig": AlgoConfig,
        "ActorConfig": object,
    }
    names = ["agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "compute_grpo_outcome_advantage"]
    exec(compile(functions("trainer/ppo/core_algos.py", names), "verl_core_algos", "exec"), ns)
    ns["version"] = importlib.metadata.version("verl")
    return SimpleNamespace(**{k: ns[k] for k in [*names, "version"]})


@pytest.fixture(scope="module")
def verl_ref():
    return _verl_core_algos()


def test_core_algos_signatures_match_verl(verl_ref):
    for name in ("agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "compute_grpo_outcome_advantage"):
        theirs = inspect.signature(getattr(verl_ref, name)).parameters
        ours = inspect.signature(getattr(verl, name)).parameters
        assert list(ours) == list(theirs), name
        for p in theirs:
            assert ours[p].default == theirs[p].default, (name, p)


def _ppo_batch(seed=23, B=5, L=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g) * 3
    logp = old + torch.randn(B, L, generator=g) * 0.8
    logp[0, 0] = old[0, 0] + 2.0  # ratio 7.4 ...
    adv = torch.randn(B, L, generator=g)
    adv[0, 0] = -1.0  # ... with a negative advantage: the dual clip binds
    logp[1, 1] = old[1, 1] + 30.0  # beyond verl's log-ratio clamp
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    mask[2] = 0.0  # an empty response
    mask[3, :] = 1.0
    return old, logp, adv, mask


@pytest.mark.parametrize("mode", verl.LOSS_AGG_MODES)
@pytest.mark.parametrize("clip", [(0.2, None, None, 3.0), (0.2, 0.1, 0.28, 2.0)])
def test_compute_policy_loss_equals_verl(verl_ref, mode, clip):
    old, logp, adv, mask = _ppo_batch()
    cliprange, low, high, c = clip
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    ours = verl.compute_policy_loss(old, a, adv, mask, cliprange, low, high, c, mode)
    theirs = verl_ref.compute_policy_loss(old, b, adv, mask, cliprange, low, high, c, mode)
    assert len(ours) == len(theirs) == 4
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    (ga,) = torch.autograd.grad(ours[0], a)
    (gb,) = torch.autograd.grad(theirs[0], b)
    torch.testing.assert_close(ga, gb, atol=1e-7, rtol=0)
    assert float(ours[3]) > 0  # the dual clip bound some token


def test_dual_clip_value(verl_ref):
    # One token at ratio e^2 = 7.39 with A = -1: clipped at c = 3 (grpo-style clipping alone would give 7.39).
    old, logp, adv, mask = (torch.zeros(1, 1), torch.full((1, 1), 2.0), -torch.ones(1, 1), torch.ones(1, 1))
    ours = verl.compute_policy_loss(old, logp, adv, mask, 0.2)[0]
    assert float(ours) == pytest.approx(3.0, abs=1e-6)
    assert float(verl_ref.compute_policy_loss(old, logp, adv, mask, 0.2)[0]) == pytest.approx(3.0, abs=1e-6)


@pytest.mark.parametrize("mode", verl.LOSS_AGG_MODES)
def test_policy_loss_vanilla_and_agg_loss_equal_verl(verl_ref, mode):
    old, logp, adv, mask = _ppo_batch(seed=24)
    weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3)) + 0.5

    class Cfg:  # what verl's ActorConfig offers these functions
        clip_ratio, clip_ratio_low, clip_ratio_high = 0.2, None, 0.3
        global_batch_info = {"loss_scale_factor": 4.0} if mode == "seq-mean-token-sum-norm" else {}

        def get(self, key, default=None):
            return {"clip_ratio_c": 2.5}.get(key, default)

    ours = verl.compute_policy_loss_vanilla(old, logp, adv, mask, mode, Cfg(), weights)
    theirs = verl_ref.compute_policy_loss_vanilla(old, logp, adv, mask, mode, Cfg(), weights)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-6)
    assert ours[1].keys() == theirs[1].keys()
    for k in ours[1]:
        assert ours[1][k] == pytest.approx(theirs[1][k], abs=1e-6), k
    # agg_loss with data-parallel arguments.
    loss_mat = torch.randn(logp.shape, generator=torch.Generator().manual_seed(4))
    kwargs = {"dp_size": 4, "batch_num_tokens": 37, "global_batch_size": 11}
    torch.testing.assert_close(
        verl.agg_loss(loss_mat, mask, mode, **kwargs),
        verl_ref.agg_loss(loss_mat, mask, mode, **kwargs),
        atol=1e-6,
        rtol=1e-6,
    )
    if mode != "token-sum":  # the mean modes need the global count under data parallelism, as in verl
        with pytest.raises(ValueError, match="required when dp_size > 1"):
            verl.agg_loss(loss_mat, mask, mode, dp_size=2)


def test_agg_loss_all_masked_is_zero_not_nan(verl_ref):
    loss_mat, mask = torch.randn(2, 3), torch.zeros(2, 3)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        assert float(verl.agg_loss(loss_mat, mask, mode)) == 0.0
        assert torch.isnan(verl_ref.agg_loss(loss_mat, mask, mode))  # the documented difference


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_outcome_advantage_equals_verl(verl_ref, norm):
    import numpy as np

    g = torch.Generator().manual_seed(25)
    B, L = 11, 6
    rewards = torch.zeros(B, L)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    scores = torch.randn(B, generator=g)
    for i in range(B):
        rewards[i, lengths[i] - 1] = scores[i]  # outcome reward on the last response token
    rewards[3, 0] = 0.5  # a second token reward: the score is the sum
    mask = (torch.arange(L) < lengths[:, None]).float()
    # Non-contiguous, unequal groups: sizes 4, 3, 2 interleaved, one all-equal group, one singleton.
    index = np.array(["a", "b", "a", "c", "b", "a", "d", "c", "b", "a", "e"], dtype=object)
    for i in (1, 4, 8):
        rewards[i] = 0.0
        rewards[i, 0] = 1.0  # group "b": all equal -> advantage 0
    ours, ours_ret = verl.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    theirs, _ = verl_ref.compute_grpo_outcome_advantage(rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-6)
    assert ours_ret is ours and ours.dtype == theirs.dtype
    assert float(ours[6].abs().max()) > 0  # the singleton keeps its raw score (verl: mean 0, std 1)
    torch.testing.assert_close(
        ours[6, : lengths[6]], torch.full((int(lengths[6]),), float(scores[6]) / (1 + 1e-6 if norm else 1))
    )
    assert not ours[[1, 4, 8]].any()
    # Integer ids (verl's uid arrays can be either).
    ids = np.array([0, 1, 0, 2, 1, 0, 3, 2, 1, 0, 4])
    torch.testing.assert_close(
        verl.compute_grpo_outcome_advantage(rewards, mask, ids)[0],
        verl_ref.compute_grpo_outcome_advantage(rewards.clone(), mask, ids)[0],
        atol=2e-6,
        rtol=1e-6,
    )


def test_core_algos_errors():
    old, logp, adv, mask = _ppo_batch()
    with pytest.raises(ValueError, match="clip_ratio_c .* must be > 1.0, got 1.0"):
        verl.compute_policy_loss(old, logp, adv, mask, 0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="cliprange"):
        verl.compute_policy_loss(old, logp, adv, mask)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        verl.compute_policy_loss(old, logp, adv, mask, 0.2, loss_agg_mode="token-median")
    with pytest.raises(ValueError, match="advantages must have the shape of log_prob"):
        verl.compute_policy_loss(old, logp, adv[:, :3], mask, 0.2)
    with pytest.raises(ValueError, match=r"index must hold one group id per response \(5\), got 4"):
        verl.compute_grpo_outcome_advantage(adv, mask, ["a"] * 4)
    with pytest.raises(ValueError, match="config"):
        verl.compute_policy_loss_vanilla(old, logp, adv, mask)
