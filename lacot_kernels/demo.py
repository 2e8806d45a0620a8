"""The main job on an embedded default: ``python -m lacot_kernels.demo``.

A tiny causal LM (a transformers ``Qwen2ForCausalLM`` built from a config, random init, nothing downloaded;
a pure-torch stand-in when transformers is absent) scores a batch of sequences whose first half is prompt:
per-token log-probs and entropies of the next tokens, then the backward of ``-mean(logp)`` through the
model, once the naive way (materialized logits + fp32 log_softmax) and once with
``lacot_kernels.fused_linear_token_logprobs`` (auto backend). It prints how far apart the two are (log-probs,
entropies, LM-head and embedding gradients) and the time and peak extra memory of each, and exits non-zero
if they disagree.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time

import torch
from torch import nn

import lacot_kernels as lk

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """Causal token mixing (running mean over the prefix) + an MLP, both residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        x = x + self.mix(h.cumsum(1) / count)
        return x + self.mlp(self.norm2(x))


class _TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


def build_model(vocab: int, d: int, layers: int, seq: int):
    """(model, hidden(ids) -> (B, S, D), lm_head, embedding, description)."""
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError:
        model = _TinyLM(vocab, d, layers)
        return model, model.hidden, model.lm_head, model.embed, f"pure-torch tiny LM ({layers} blocks, d={d})"
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)

    def hidden(ids):
        return model.model(input_ids=ids, use_cache=False).last_hidden_state

    desc = f"transformers Qwen2ForCausalLM, random init ({layers} layers, d={d}, 4 heads)"
    return model, hidden, model.lm_head, model.get_input_embeddings(), desc


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of one step: the CUDA allocator's high-water mark, or the process's peak RSS on Linux
# ----------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


class PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def begin(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory glibc still holds would hide new allocations
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # restarts VmHWM from the current resident set
            self.base = _status_kib("VmRSS")
        except OSError:
            self.base = -1

    def end_mib(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self.base < 0:
            return None
        return max(0, _status_kib("VmHWM") - self.base) / 1024


# ----------------------------------------------------------------------------------------------------------------
# The two ways of scoring
# ----------------------------------------------------------------------------------------------------------------
def naive_logprobs(hidden, lm_head, targets):
    logits = lm_head(hidden)
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != IGNORE
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def fused_logprobs(hidden, lm_head, targets):
    return lk.fused_linear_token_logprobs(hidden, lm_head.weight, targets, bias=lm_head.bias, return_entropy=True)


def fused_backend(device: torch.device) -> str:
    try:  # the fused op's own choice (it prefers its Triton kernel on CUDA tensors)
        from .ops.fused_linear import _resolve

        return _resolve("auto", device)
    except (ImportError, AttributeError):
        return lk.resolve_backend("auto", device)


def step(score, model, hidden_fn, lm_head, embed, ids, targets, mem: PeakMemory):
    model.zero_grad(set_to_none=True)
    mem.begin()
    t0 = time.perf_counter()
    hidden = hidden_fn(ids)[:, :-1]
    logp, ent = score(hidden, lm_head, targets)
    loss = -logp.sum() / (targets != IGNORE).sum()
    loss.backward()
    if ids.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = mem.end_mib()
    out = (logp.detach(), ent.detach(), lm_head.weight.grad.clone(), embed.weight.grad.clone())
    return seconds, peak, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lacot_kernels.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, hidden_fn, lm_head, embed, desc = build_model(args.vocab, args.dim, args.layers, args.seq)
    model.to(device).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    targets = ids[:, 1:].clone()
    prompt = args.seq // 2
    targets[:, : prompt - 1] = IGNORE  # positions whose next token is still prompt are not scored
    n_scored = int((targets != IGNORE).sum())
    backend = fused_backend(device)
    if backend == "cuda" and device.type == "cpu":
        backend += " (the compiled C++ CPU twin)"
    where = f"{device.type}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    print(f"lacot_kernels demo: {desc}, vocab {args.vocab}")
    print(
        f"batch {args.batch}x{args.seq} token ids, first {prompt} of each row prompt: {n_scored} scored tokens; "
        f"device {where}; fused backend (auto): {backend}"
    )

    mem = PeakMemory(device)
    results = {}
    for name, score in (("naive", naive_logprobs), ("lacot", fused_logprobs)):
        step(score, model, hidden_fn, lm_head, embed, ids, targets, mem)  # warm-up (first-call costs)
        runs = [step(score, model, hidden_fn, lm_head, embed, ids, targets, mem) for _ in range(args.repeats)]
        peaks = [r[1] for r in runs if r[1] is not None]
        results[name] = (statistics.median(r[0] for r in runs), max(peaks) if peaks else None, runs[-1][2])

    (t_n, m_n, (lp_n, en_n, gw_n, ge_n)), (t_f, m_f, (lp_f, en_f, gw_f, ge_f)) = results["naive"], results["lacot"]

    def diff(a, b):
        return float((a.double() - b.double()).abs().max())

    d_lp, d_en, d_gw, d_ge = diff(lp_n, lp_f), diff(en_n, en_f), diff(gw_n, gw_f), diff(ge_n, ge_f)
    gw_scale = float(gw_n.abs().max())
    ge_scale = float(ge_n.abs().max())

    def mib(x):
        return "n/a" if x is None else f"{x:.0f} MiB"

    print()
    print("forward + backward of -mean(logp) through the model, per step (median of", args.repeats, "after warm-up):")
    print(f"  naive  (logits + fp32 log_softmax)      {t_n * 1e3:8.1f} ms   peak extra {mib(m_n)}")
    print(f"  lacot  fused_linear_token_logprobs      {t_f * 1e3:8.1f} ms   peak extra {mib(m_f)}")
    mem_ratio = m_f / m_n if m_n and m_f is not None else None
    print(
        f"  lacot / naive: time {t_f / t_n:.2f}x ({t_n / t_f:.2f}x the speed), "
        + (f"peak extra memory {mem_ratio:.2f}x" if mem_ratio is not None else "peak extra memory n/a")
    )
    print()
    print("lacot against the naive path:")
    print(f"  max |logp diff|            {d_lp:.2e}")
    print(f"  max |entropy diff|         {d_en:.2e}")
    print(f"  max |LM-head grad diff|    {d_gw:.2e}   (max |grad| {gw_scale:.2e})")
    print(f"  max |embedding grad diff|  {d_ge:.2e}   (max |grad| {ge_scale:.2e})")

    ok = d_lp < 1e-3 and d_en < 1e-3 and d_gw <= 1e-3 * gw_scale + 1e-7 and d_ge <= 1e-3 * ge_scale + 1e-7
    print()
    if ok:
        mem_txt = f", {mem_ratio:.2f}x its peak extra memory" if mem_ratio is not None else ""
        print(
            f"demo OK: lacot matches the naive path (log-probs within {d_lp:.1e}, gradients within "
            f"{d_gw / max(gw_scale, 1e-30):.1e} relative) at {t_n / t_f:.2f}x its speed{mem_txt}."
        )
        return 0
    print("demo FAILED: lacot and the naive path disagree beyond 1e-3 (see above).")
    return 1


if __name__ == "__main__":
    sys.exit(main())
