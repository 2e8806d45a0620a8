"""Random cases, fp64 oracles and error-model tolerances for every public op (the error model: README.md here).

Every op is an `Op` with
  * ``make(rng, dtype)``: a random case (a dict) drawn from a `random.Random` (hypothesis' `st.randoms()` in the
    pytest suite, a seeded `random.Random` in `run.py`): shapes with their edge cases, values rounded to `dtype`
    first, layouts (contiguous, strided, transposed, zero-stride), adversarial values;
  * ``run(case, backend)``: the op's outputs and input gradients, named;
  * ``oracle(case)``: for each name, (reference in fp64 from `lacot_kernels.reference` on the *same rounded
    inputs*, tolerance tensor, dtype the op stores that output in).
`check` compares them: the NaN pattern must match exactly, infinities must match (a finite reference beyond the
output dtype's range must come out as the same-signed inf or the largest finite value), and elsewhere
|out - ref| <= tol + u_out |ref| + tiny_out. It returns the worst ratio err / allowed (<= 1 passes).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

import lacot_kernels as lk
from lacot_kernels import reference as R

U32 = 2.0**-24  # unit roundoff of fp32 accumulation
FTZ = 2.0**-126  # smallest normal fp32: the absolute error of a result that underflows (flush-to-zero on GPUs)
C = 8.0  # the constant of every bound below (a few roundings per step, see README.md)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F64 = torch.float64


def unit(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, F64: 2.0**-53}[dtype]


def tiny(dtype: torch.dtype) -> float:
    # The smallest subnormal: one ulp of the subnormal range (what rounding or truncating to `dtype` may lose).
    return {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, F64: 0.0}[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    ratio: float  # worst err / allowed over every output (nan pattern or inf mismatch: inf)
    detail: str


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, out_dtype: torch.dtype) -> Verdict:
    if tuple(out.shape) != tuple(ref.shape):
        return Verdict(math.inf, f"{name}: shape {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    # A bound term 0 * inf (an input that does not reach this output) is 0.
    tol = torch.as_tensor(tol, dtype=F64).detach().expand(ref.shape).reshape(-1).nan_to_num(0.0)
    out = out.detach().to(F64).reshape(-1)
    ref = ref.detach().to(F64).reshape(-1)
    if ref.numel() == 0:
        return Verdict(0.0, "")
    nan_o, nan_r = torch.isnan(out), torch.isnan(ref)
    if not torch.equal(nan_o, nan_r):
        i = int((nan_o != nan_r).nonzero()[0])
        return Verdict(math.inf, f"{name}[{i}]: NaN pattern differs: out {out[i].item()} ref {ref[i].item()}")
    fmax = torch.finfo(out_dtype).max
    keep = ~nan_r
    o, r, t = out[keep], ref[keep], tol[keep]
    # Beyond the dtype's range (infinite references included), or within a factor 2 of it (an intermediate, e.g.
    # one term of a sum, may be larger than the result and overflow): inf is accepted there.
    big = r.abs() + t > fmax / 2
    if big.any():
        ok = (o[big] == r[big].sign() * math.inf) | (o[big] == r[big].sign() * fmax)
        ok |= (o[big] - r[big]).abs() <= t[big] + 2 * unit(out_dtype) * r[big].abs()  # or plainly close
        ok |= torch.isinf(r[big]) & (o[big] == r[big])
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            return Verdict(math.inf, f"{name}: out {o[big][i].item()} where the reference is {r[big][i].item()}")
    fin = ~big
    o, r, t = o[fin], r[fin], t[fin]
    if torch.isinf(o).any():
        i = int(torch.isinf(o).nonzero()[0])
        return Verdict(math.inf, f"{name}: out {o[i].item()} where the reference is finite {r[i].item()}")
    # One ulp of the output dtype (correct rounding needs half; the Triton interpreter truncates to bfloat16).
    # Plus C * 2**-126: a result that underflows fp32 may be flushed to zero (GPUs) or keep few bits.
    allowed = t + 2 * unit(out_dtype) * r.abs() + tiny(out_dtype) + C * FTZ
    err = (o - r).abs()
    ratios = torch.where(allowed > 0, err / allowed.clamp(min=1e-300), torch.where(err > 0, math.inf, 0.0))
    if ratios.numel() == 0:
        return Verdict(0.0, "")
    i = int(ratios.argmax())
    return Verdict(
        float(ratios[i]), f"{name}[{i}]: out {o[i].item():.9g} ref {r[i].item():.9g} allowed {allowed[i].item():.3g}"
    )


def check(op: Op, case: dict, backend: str) -> Verdict:
    got = op.run(case, backend)
    want = op.oracle(case)
    worst = Verdict(0.0, "")
    for name, (ref, tol, dt) in want.items():
        v = compare(name, got[name], ref, tol, dt)
        if not v.ratio <= worst.ratio:  # NaN ratio counts as worst
            worst = v
    return worst


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------
def tgen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(62))


def pick_len(rng: random.Random, options: tuple[int, ...], hi: int) -> int:
    """An edge value (0, 1, 2, a prime, ...) half the time, else uniform in [1, hi]."""
    return rng.choice(options) if rng.random() < 0.5 else rng.randint(1, hi)


def scale_of(rng: random.Random) -> float:
    return rng.choice((1e-3, 0.3, 1.0, 1.0, 3.0, 30.0, 1e3))


def temperature_of(rng: random.Random) -> float:
    r = rng.random()
    if r < 0.1:  # extreme: from the smallest accepted (2**-64) to huge
        return rng.choice((lk._checks.MIN_TEMPERATURE, 1e-12, 1e-6, 1e6, 1e30))
    if r < 0.4:
        return 1.0
    return math.exp(rng.uniform(math.log(0.05), math.log(20.0)))


def layout(rng: random.Random, x: torch.Tensor, *, allow_zero_stride: bool = True) -> torch.Tensor:
    """The same values in another memory layout: contiguous, strided last dim, transposed, or zero-stride."""
    k = rng.random()
    if x.dim() == 0:
        return x
    if k < 0.55:
        return x.clone()
    if k < 0.75:  # every other element of a wider buffer: stride 2 along the last dim
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        big[..., : 2 * x.shape[-1] : 2] = x
        return big[..., : 2 * x.shape[-1] : 2]
    if k < 0.9 and x.dim() >= 2:  # column-major storage of the last two dims
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if allow_zero_stride and x.dim() >= 2 and x.shape[0] > 0:  # one row repeated with stride 0
        return x[:1].expand(x.shape)
    return x.clone()


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def inject(rng: random.Random, g: torch.Generator, x: torch.Tensor, values=(math.nan, math.inf, -math.inf)):
    """Now and then, a few non-finite values (the ops define what they give: NaN or inf where torch does)."""
    if x.numel() == 0 or rng.random() > 0.08:
        return x
    x = x.clone()
    flat = x.view(-1)
    for _ in range(rng.randint(1, 2)):
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = rng.choice(values)
    return x


def logits_of(rng: random.Random, g: torch.Generator, N: int, V: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, V) logits rounded to `dtype`: a random scale, sometimes a confident token, a constant row or huge values."""
    x = torch.randn(N, V, generator=g, dtype=F64) * scale_of(rng)
    k = rng.random()
    if k < 0.15 and N > 0:  # confident: one token far above the rest (softmax -> 1)
        x[torch.arange(N), torch.randint(0, V, (N,), generator=g)] += rng.choice((20.0, 60.0, 1e3))
    elif k < 0.25:  # huge magnitudes, still finite in every dtype
        x = x.sign() * rng.choice((1e3, 1e4, 6e4 if dtype != torch.float16 else 6e4)) + x
    elif k < 0.3:  # constant rows (ties everywhere)
        x = x[:, :1].expand(N, V).clone()
    return inject(rng, g, x.to(dtype))


def targets_of(rng: random.Random, g: torch.Generator, shape, V: int, ignore_index: int) -> torch.Tensor:
    t = torch.randint(0, V, shape, generator=g)
    k = rng.random()
    if k < 0.3:
        t = torch.where(torch.rand(shape, generator=g) < 0.3, ignore_index, t)
    elif k < 0.4:
        t = torch.full(shape, ignore_index, dtype=torch.int64)  # fully ignored
    return t.to(rng.choice((torch.int64, torch.int32)))


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Op:
    name: str
    backends: tuple[str, ...]
    make: Callable[[random.Random, torch.dtype], dict]
    run: Callable[[dict, str], dict]
    oracle: Callable[[dict], dict]
    dtypes: tuple[torch.dtype, ...] = DTYPES


NATIVE = ("cuda", "triton", "torch")


# ---- token_logprobs ---------------------------------------------------------------------------------------------
def _tlp_make(rng, dtype):
    g = tgen(rng)
    N = pick_len(rng, (0, 1, 2, 3), 9)
    V = pick_len(rng, (1, 2, 3, 5, 31, 97, 257), 300)
    lead = rng.choice(((N,), (1, N), (N, 1)))
    ignore = rng.choice((-100, -1, V))
    x = logits_of(rng, g, N, V, dtype).reshape(*lead, V)
    return dict(
        logits=layout(rng, x),
        targets=layout(rng, targets_of(rng, g, lead, V, ignore)),
        temperature=temperature_of(rng),
        ignore_index=ignore,
        entropy=rng.random() < 0.6,
        g1=torch.randn(lead, generator=g, dtype=F64),
        g2=torch.randn(lead, generator=g, dtype=F64),
    )


def _tlp_run(c, backend):
    x = leaf(c["logits"])
    out = lk.token_logprobs(
        x,
        c["targets"],
        temperature=c["temperature"],
        ignore_index=c["ignore_index"],
        return_entropy=c["entropy"],
        backend=backend,
    )
    lp, ent = out if c["entropy"] else (out, None)
    loss = (lp * c["g1"].float()).sum() + ((ent * c["g2"].float()).sum() if ent is not None else 0)
    res = dict(logp=lp, grad=torch.autograd.grad(loss, x)[0] if x.numel() else x.detach().clone())
    if ent is not None:
        res["entropy"] = ent
    return res


def _softmax_terms(z: torch.Tensor):
    """From fp64 scaled logits z (..., V): d = z - max, p, sum_v p|d|, sum_v p d^2 (0 * inf terms as 0)."""
    d = z - z.amax(-1, keepdim=True)
    p = torch.softmax(z, -1)
    pd = torch.where(p > 0, p * d.abs(), 0.0)
    return d, p, pd.sum(-1), torch.where(p > 0, pd * d.abs(), 0.0).sum(-1)


def _tlp_tols(z, targets, ignore_index, g1, g2, inv_t_err=0.0):
    """Tolerances of (logp, entropy, dlogits) from fp64 scaled logits z (N, V); `inv_t_err` adds an absolute error
    already present in every d_v (the fused op's GEMM error, divided by T)."""
    V = z.shape[-1]
    A = V + 1.0
    d, p, spd, spd2 = _softmax_terms(z)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    d_y = d.gather(-1, safe[..., None]).squeeze(-1)
    logs = torch.logsumexp(d, -1)
    e = 2 * inv_t_err  # the max and the chosen logit both carry it
    tol_lp = C * U32 * (A + d_y.abs() + (d_y - logs).abs()) + e
    tol_ent = C * U32 * (A * (1 + spd) + spd2) + e * (1 + spd)
    logp_all = torch.where(p > 0, d - logs[..., None], 0.0)
    ent = -(p * logp_all).sum(-1)
    eps_v = C * U32 * (A + d.abs()) + e
    tol_g = p * eps_v * (g1.abs()[..., None] + g2.abs()[..., None] * (1 + (logp_all + ent[..., None]).abs()))
    tol_g = tol_g + g2.abs()[..., None] * p * tol_ent[..., None] + C * U32 * (g1.abs() + g2.abs())[..., None] * p
    # The target's own term g1 / T (one rounding of 1 / T), which may cancel against g1 p_y / T.
    onehot = torch.zeros_like(p)
    if p.numel():
        onehot.scatter_(-1, safe[..., None], 1.0)
    tol_g = tol_g + C * U32 * g1.abs()[..., None] * onehot
    # Probabilities below the fp32 normal range (2**-126) may be flushed to zero (GPUs) or lose precision.
    tol_g = tol_g + C * FTZ * (g1.abs()[..., None] + g2.abs()[..., None] * (1 + (logp_all + ent[..., None]).abs()))
    zero = torch.zeros((), dtype=F64)
    return torch.where(valid, tol_lp, zero), torch.where(valid, tol_ent, zero), torch.where(valid[..., None], tol_g, 0)


def _tlp_oracle(c):
    T, ig = c["temperature"], c["ignore_index"]
    # Ignored rows are never read (their gradient is exactly 0 even if they hold NaN): the oracle sees zeros there.
    x = leaf(torch.where((c["targets"] != ig)[..., None], c["logits"].to(F64), 0.0))
    lp, ent = R.token_logprobs(x, c["targets"], temperature=T, ignore_index=ig)
    loss = (lp * c["g1"]).sum() + ((ent * c["g2"]).sum() if c["entropy"] else 0)
    grad = torch.autograd.grad(loss, x)[0] if x.numel() else x.detach().clone()
    with torch.no_grad():
        z = x.detach() / T
        g2 = c["g2"] if c["entropy"] else torch.zeros_like(c["g2"])
        t_lp, t_ent, t_g = _tlp_tols(z, c["targets"], ig, c["g1"], g2)
    res = dict(logp=(lp, t_lp, torch.float32), grad=(grad, t_g / T, c["logits"].dtype))
    if c["entropy"]:
        res["entropy"] = (ent, t_ent, torch.float32)
    return res


# ---- token_logprobs under the sampler's truncation (top_k / top_p / min_p) --------------------------------------
def _tlps_make(rng, dtype):
    c = _tlp_make(rng, dtype)
    x, t = c["logits"], c["targets"]
    V = x.shape[-1]
    # Half the time the sampled token is the row's argmax: kept by every filter (finite log-probs); else any id,
    # often outside the kept set (log-prob -inf, gradient 0).
    if rng.random() < 0.5 and x.numel():
        t = torch.where(t == c["ignore_index"], t, x.float().nan_to_num(0.0).argmax(-1).to(t.dtype))
    options = dict(
        top_k=(1, 2, rng.randint(1, V + 2)),
        top_p=(1.0, rng.uniform(0.01, 0.99), rng.uniform(0.9, 0.999)),
        min_p=(1.0, math.exp(rng.uniform(math.log(1e-4), math.log(0.9)))),
    )
    # One filter always set (hypothesis' minimal example then still truncates), the others half the time.
    always = rng.choice(tuple(options))
    kw = {k: rng.choice(v) if k == always or rng.random() < 0.5 else None for k, v in options.items()}
    return dict(c, targets=t, sampler=kw, order=rng.choice(("vllm", "hf")))


def _tlps_run(c, backend):
    x = leaf(c["logits"])
    lp, ent = lk.token_logprobs(
        x, c["targets"], temperature=c["temperature"], ignore_index=c["ignore_index"], return_entropy=True,
        backend=backend, sampler_order=c["order"], **c["sampler"],
    )  # fmt: skip
    # A target outside the kept set has log-prob -inf and no gradient: it enters the loss as 0.
    loss = (torch.where(lp == -math.inf, 0.0, lp) * c["g1"].float()).sum() + (ent * c["g2"].float()).sum()
    grad = torch.autograd.grad(loss, x)[0] if x.numel() else x.detach().clone()
    return dict(logp=lp, entropy=ent, grad=grad, kept=_tlps_kept(c).float())


def _tlps_kept(c):
    """The kept set the kernels use: every logit not below the row's threshold (NaN included), from the op's own
    ``kept_threshold`` (pure torch, shared by every backend)."""
    V = c["logits"].shape[-1]
    x = c["logits"].reshape(-1, V)
    tau = lk.kept_threshold(x, temperature=c["temperature"], order=c["order"], **c["sampler"])
    return ~(x.float() < tau[:, None])


def _tlps_ambiguous(x64, T, kw, order):
    """Tokens whose kept / dropped decision an fp32 evaluation may take either way (fp64 x64 (N, V) raw logits).

    top-k compares the logits themselves: exact. min-p compares (x - max) / T with log(min_p): within
    C u (|x - max| / T + |log min_p| + 1). top-p compares a cumulative sum of V rounded terms with 1 - top_p:
    within C u (V + 1 + |x - max| / T). A row where any earlier filter is ambiguous (or holding a non-finite
    logit) is ambiguous as a whole: the later filters see another distribution."""
    N, V = x64.shape
    amb = torch.zeros(N, V, dtype=torch.bool)
    bad_row = ~torch.isfinite(x64).all(-1)
    z = x64 / T
    d = (z - z.amax(-1, keepdim=True)).nan_to_num(0.0, 0.0, 0.0)
    if kw.get("min_p") is not None:
        lm = math.log(kw["min_p"])
        amb |= (d - lm).abs() <= C * U32 * (d.abs() + abs(lm) + 1)
    # The survivors top-p sees (in the order's sense), from the fp64 definition; then its cumulative masses.
    pre = {k: v for k, v in kw.items() if (k == "top_k" or (k == "min_p" and order == "vllm"))}
    if kw.get("top_p") is not None and kw["top_p"] < 1.0:
        keep_pre = R.kept_mask(x64, temperature=T, order=order, **pre) if pre else torch.ones_like(amb)
        zz = torch.where(keep_pre, z, -math.inf)
        zs, idx = torch.sort(zz, -1)
        cum = torch.softmax(zs, -1).cumsum(-1)
        near = (cum - (1 - kw["top_p"])).abs() <= C * U32 * (V + 1 + d.abs().amax(-1, keepdim=True))
        # The boundary may move to any neighbour of a near-threshold position: the whole row is ambiguous then.
        row_near = near.any(-1)
        if order == "vllm" and kw.get("min_p") is not None:
            row_near |= amb.any(-1)
        amb |= row_near[:, None]
    return amb | bad_row[:, None]


def _tlps_oracle(c):
    T, ig = c["temperature"], c["ignore_index"]
    V = c["logits"].shape[-1]
    lead = c["logits"].shape[:-1]
    valid = c["targets"] != ig
    x64 = torch.where(valid[..., None], c["logits"].to(F64), 0.0)
    keep = _tlps_kept(c).reshape(x64.shape)
    # The kept set, checked against the fp64 definition (exact except where fp32 may round the decision away).
    flat = c["logits"].reshape(-1, V).to(F64)
    if flat.numel():
        ref_keep = R.kept_mask(flat, temperature=T, order=c["order"], **c["sampler"])
        amb = _tlps_ambiguous(flat, T, c["sampler"], c["order"])
    else:
        ref_keep = amb = keep.reshape(-1, V)
    res = dict(kept=(ref_keep.to(F64).reshape(-1, V), 2.0 * amb.to(F64).reshape(-1, V), torch.float32))
    # The values, on the op's kept set: fp64 log-softmax over it (ignored rows are never read: zeros there).
    x = leaf(x64)
    lp, ent = R.token_logprobs_truncated(x, c["targets"], keep, temperature=T, ignore_index=ig)
    loss = (torch.where(lp == -math.inf, 0.0, lp) * c["g1"]).sum() + (ent * c["g2"]).sum()
    grad = torch.autograd.grad(loss, x)[0] if x.numel() else x.detach().clone()
    # A row whose softmax is NaN (a NaN or +inf logit it keeps) has a NaN gradient everywhere, dropped logits
    # included (the kernels form every entry from the row's statistics), as the plain op's NaN rows.
    nan_row = valid & (torch.isnan(lp.detach()) | torch.isnan(ent.detach()))
    grad = torch.where(nan_row[..., None], math.nan, grad)
    with torch.no_grad():
        z = torch.where(keep, x64 / T, -math.inf)
        tgt = c["targets"]
        g1 = torch.where(lp.detach() == -math.inf, 0.0, c["g1"])
        t_lp, t_ent, t_g = _tlp_tols(z, tgt, ig, g1, c["g2"])
    res["logp"] = (lp.reshape(lead), t_lp, torch.float32)
    res["entropy"] = (ent.reshape(lead), t_ent, torch.float32)
    res["grad"] = (grad, t_g / T, c["logits"].dtype)
    return res


# ---- fused_linear_token_logprobs --------------------------------------------------------------------------------
def _flt_make(rng, dtype):
    g = tgen(rng)
    N = pick_len(rng, (0, 1, 2, 5), 8)
    V = pick_len(rng, (1, 2, 3, 7, 31, 97), 130)
    D = pick_len(rng, (0, 1, 3, 16), 24)
    ignore = rng.choice((-100, -1))
    s = scale_of(rng) ** 0.5
    h = inject(rng, g, (torch.randn(N, D, generator=g, dtype=F64) * s).to(dtype))
    w = (torch.randn(V, D, generator=g, dtype=F64) * s / max(D, 1) ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=F64) * s).to(dtype) if rng.random() < 0.4 else None
    return dict(
        hidden=layout(rng, h),
        weight=layout(rng, w, allow_zero_stride=False),
        bias=b,
        targets=targets_of(rng, g, (N,), V, ignore),
        temperature=temperature_of(rng) if rng.random() < 0.5 else 1.0,
        ignore_index=ignore,
        entropy=rng.random() < 0.5,
        g1=torch.randn(N, generator=g, dtype=F64),
        g2=torch.randn(N, generator=g, dtype=F64),
    )


def _flt_run(c, backend):
    h, w = leaf(c["hidden"]), leaf(c["weight"])
    b = leaf(c["bias"]) if c["bias"] is not None else None
    out = lk.fused_linear_token_logprobs(
        h,
        w,
        c["targets"],
        bias=b,
        temperature=c["temperature"],
        ignore_index=c["ignore_index"],
        return_entropy=c["entropy"],
        backend=backend,
    )
    lp, ent = out if c["entropy"] else (out, None)
    loss = (lp * c["g1"].float()).sum() + ((ent * c["g2"].float()).sum() if ent is not None else 0)
    ins = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, ins, allow_unused=True) if loss.requires_grad else [None] * len(ins)
    res = dict(logp=lp)
    for name, x, gr in zip(("d_hidden", "d_weight", "d_bias"), ins, grads, strict=False):
        res[name] = gr if gr is not None else torch.zeros_like(x)
    if ent is not None:
        res["entropy"] = ent
    return res


def _flt_oracle(c):
    # Ignored rows are never read (exactly 0 gradient even if they hold NaN): the oracle sees zeros there.
    h = leaf(torch.where((c["targets"] != c["ignore_index"])[:, None], c["hidden"].to(F64), 0.0))
    w = leaf(c["weight"].to(F64))
    b = leaf(c["bias"].to(F64)) if c["bias"] is not None else None
    T, ig = c["temperature"], c["ignore_index"]
    lp, ent = R.fused_linear_token_logprobs(h, w, c["targets"], bias=b, temperature=T, ignore_index=ig)
    g2 = c["g2"] if c["entropy"] else torch.zeros_like(c["g2"])
    loss = (lp * c["g1"]).sum() + (ent * g2).sum()
    ins = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    grads = [gr if gr is not None else torch.zeros_like(x) for x, gr in zip(ins, grads, strict=False)]
    with torch.no_grad():
        N, D = h.shape
        V = w.shape[0]
        hd, wd = h.detach(), w.detach()
        logits = hd @ wd.T + (b.detach() if b is not None else 0.0)
        # fp32 GEMM of D products (exact for 16-bit inputs) + the bias: |err| <= C u (D + 1) (|h| |w| + |b|).
        absdot = hd.abs() @ wd.abs().T + (b.detach().abs() if b is not None else 0.0)
        logit_err = C * U32 * (D + 1) * absdot  # (N, V)
        e_row = logit_err.amax(-1) if V else torch.zeros(N, dtype=F64)
        t_lp, t_ent, t_G = _tlp_tols(logits / T, c["targets"], ig, c["g1"], g2, inv_t_err=0.0)
        t_lp = t_lp + 2 * e_row / T * (c["targets"] != ig)
        t_ent = t_ent + 2 * e_row / T * (1 + _softmax_terms(logits / T)[2]) * (c["targets"] != ig)
        # dlogits G (N, V) and its tolerance: the token tolerance plus the logits error moving p (p |de| / T).
        p = torch.softmax(logits / T, -1) if V else logits
        valid = c["targets"] != ig
        gl = torch.where(valid, c["g1"], 0.0)
    with torch.enable_grad():  # the full dlogits (log-prob and entropy terms) of the reference
        zl = leaf(logits)
        lp2, ent2 = R.token_logprobs(zl, c["targets"], temperature=T, ignore_index=ig)
        G = torch.autograd.grad((lp2 * c["g1"]).sum() + (ent2 * g2).sum(), zl)[0] if zl.numel() else zl.detach()
    with torch.no_grad():
        t_G = t_G / T + (gl.abs() + g2.abs() * 4)[:, None] * p * (2 * e_row[:, None] / T) / T
        # The dlogits tile is stored in the input dtype before its two GEMMs: one rounding of G (u_in |G|).
        # ... and each entry may be flushed below 2**-126 (FTZ) before the GEMMs.
        t_G = t_G + 2 * unit(c["hidden"].dtype) * G.abs() + tiny(c["hidden"].dtype) + C * FTZ
        res = dict(
            logp=(lp, t_lp, torch.float32),
            d_hidden=(grads[0], t_G @ wd.abs() + C * U32 * (V + 1) * (G.abs() @ wd.abs()), c["hidden"].dtype),
            d_weight=(grads[1], t_G.T @ hd.abs() + C * U32 * (N + 1) * (G.abs().T @ hd.abs()), c["weight"].dtype),
        )
        if b is not None:
            res["d_bias"] = (grads[2], t_G.sum(0) + C * U32 * (N + 1) * G.abs().sum(0), c["bias"].dtype)
        _drop_overflowing_grads(res, G, c["hidden"].dtype)
        if c["entropy"]:
            res["entropy"] = (ent, t_ent, torch.float32)
    return res


# ---- grpo_loss (and its fused form) ----------------------------------------------------------------------------
def _grpo_common(rng, g, B, T, dtype):
    s = rng.choice((0.01, 0.1, 0.5, 2.0))
    logp = -(torch.rand(B, T, generator=g, dtype=F64) * rng.choice((0.1, 3.0, 20.0)))
    old = logp + torch.randn(B, T, generator=g, dtype=F64) * s
    ref = logp + torch.randn(B, T, generator=g, dtype=F64) * s
    k = rng.random()
    if k < 0.4:
        mask = (torch.rand(B, T, generator=g) < 0.7).float()
    elif k < 0.6:
        mask = torch.rand(B, T, generator=g, dtype=F64).float()  # fractional weights
    elif k < 0.7:
        mask = torch.zeros(B, T)
    else:
        mask = torch.ones(B, T)
    mask = mask.to(rng.choice((torch.float32, torch.bool if k < 0.4 or k >= 0.6 else torch.float32)))
    adv = torch.randn(B, generator=g, dtype=F64) * rng.choice((0.1, 1.0, 10.0))
    if rng.random() < 0.2 and B:
        adv[0] = 0.0
    use_ref = rng.random() < 0.6
    beta = rng.choice((0.0, 0.04, 1.0)) if use_ref else 0.0
    eps_low = rng.choice((0.2, 0.1, 0.0))
    eps_high = rng.choice((None, 0.28))
    loss_type = rng.choice(("grpo", "bnpo", "dr_grpo", "dapo"))
    L = rng.choice((None, T + 3)) if loss_type == "dr_grpo" else None
    norm = rng.choice((None, 7.5)) if loss_type == "dapo" else None
    # Garbage under masked tokens is never read (NaN/inf allowed there).
    on = mask != 0
    junk = torch.full((B, T), math.nan, dtype=F64) if rng.random() < 0.3 else None
    if junk is not None:
        logp, old = torch.where(on, logp, junk), torch.where(on, old, -math.inf)
    return dict(
        logp=layout(rng, inject(rng, g, logp.to(dtype), (math.nan,))),
        old=inject(rng, g, old.to(dtype), (math.nan, -math.inf)),
        ref=ref.to(dtype) if use_ref else None,
        adv=adv.float(),
        mask=mask,
        kw=dict(
            beta=beta,
            eps_low=eps_low,
            eps_high=eps_high,
            loss_type=loss_type,
            max_completion_length=L,
            dapo_normalizer=norm,
        ),
    )


def _grpo_make(rng, dtype):
    g = tgen(rng)
    B = pick_len(rng, (0, 1, 2), 6)
    T = pick_len(rng, (0, 1, 2, 17), 40)
    return _grpo_common(rng, g, B, T, dtype)


def _grpo_run(c, backend):
    lp = leaf(c["logp"])
    loss, stats = lk.grpo_loss(lp, c["old"], c["adv"], c["mask"], ref_logp=c["ref"], backend=backend, **c["kw"])
    res = {"loss": loss, "grad": torch.autograd.grad(loss, lp)[0]}
    res.update({f"stat:{k}": v for k, v in stats.items()})
    return res


def _grpo_tols(lp, old, ref, adv, m, kw, dtype_out):
    """Tolerances of (loss, stats, dloss/dlogp) of TRL's GRPO in fp64 values (see README.md: GRPO)."""
    B, T = lp.shape
    on = m != 0
    lo, hi = 1 - kw["eps_low"], 1 + (kw["eps_low"] if kw["eps_high"] is None else kw["eps_high"])
    z = torch.zeros((), dtype=F64)
    lp0, old0 = torch.where(on, lp, z), torch.where(on, old, z)
    dr = lp0 - old0
    r = torch.exp(dr)
    a = adv[:, None]
    t_ratio = C * U32 * (dr.abs() + 2) * r  # |err r|
    amb = torch.isfinite(r) & (((r - lo).abs() <= t_ratio) | ((r - hi).abs() <= t_ratio))  # flags may flip here
    clipped = ((r < lo) & (a < 0)) | ((r > hi) & (a > 0))
    rc = r.clamp(lo, hi)
    # The chosen branch of the min: clip(r) A (error of one product) or r A (r's error times |A|).
    t_tok = torch.where(clipped, C * U32 * (rc * a).abs(), t_ratio * a.abs() + C * U32 * (r * a).abs())
    dl_scale = torch.where(clipped, z, (r * a).abs())
    surr = torch.where(clipped, (rc * a).abs(), (r * a).abs())
    if ref is not None:
        d = torch.where(on, ref, z) - lp0
        ek = torch.exp(d)
        t_kl = C * U32 * (ek + d.abs() + 1) * (d.abs() + 2)
        if kw["beta"] != 0:  # (the op adds no KL term at beta = 0, so an overflowing kl costs nothing there)
            t_tok = t_tok + kw["beta"] * t_kl
            t_dl = C * U32 * kw["beta"] * (ek * (d.abs() + 2) + (1 - ek).abs())
        else:
            t_dl = torch.zeros_like(lp)
    else:
        t_kl = torch.zeros_like(lp)
        t_dl = torch.zeros_like(lp)
    n = m.sum(1)
    lt = kw["loss_type"]
    if lt == "grpo":
        cb = 1.0 / (B * n.clamp(min=1.0))
    elif lt == "dr_grpo":
        cb = torch.full((B,), 1.0 / max(B * (kw["max_completion_length"] or T), 1), dtype=F64)
    elif lt == "dapo" and kw["dapo_normalizer"] is not None:
        cb = torch.full((B,), 1.0 / kw["dapo_normalizer"], dtype=F64)
    else:
        cb = (1.0 / n.sum().clamp(min=1.0)).expand(B)
    w = cb[:, None] * m.abs()
    # Sums of B*T terms in fp32: relative C u (B + T) of the sum of magnitudes, on top of each term's own error.
    sum_err = C * U32 * (B + T + 2)
    mag_tok = surr + (kw["beta"] * (t_kl / (C * U32)) if kw["beta"] != 0 else 0.0)
    tol_loss = torch.where(on, w * (t_tok + sum_err * mag_tok), z).sum()
    denom = m.sum().clamp(min=1.0)
    tol_kl = torch.where(on, m.abs() * (t_kl + sum_err * t_kl / (C * U32)), z).sum() / denom
    tol_clip = torch.where(on & amb, m.abs(), z).sum() / denom + sum_err
    # Sums whose terms add up beyond the fp32 range may overflow (inf) even when the result would fit.
    fmax = torch.finfo(torch.float32).max / 4
    if float(torch.where(on, m.abs() * mag_tok, z).sum()) > fmax or float(torch.where(on, w * mag_tok, z).sum()) > fmax:
        tol_loss = torch.tensor(math.inf, dtype=F64)
    if ref is not None and float(torch.where(on, m.abs() * t_kl / (C * U32), z).sum()) > fmax:
        tol_kl = torch.tensor(math.inf, dtype=F64)
    t_r = torch.where(clipped, z, C * U32 * (dl_scale * (dr.abs() + 3)))  # (not 0 * inf where r = inf is clipped)
    t_g = w * (t_r + t_dl + torch.where(amb, (r * a).abs(), z))
    return tol_loss, tol_kl, tol_clip, torch.where(on, t_g, z)


def _grpo_oracle(c):
    if c["kw"]["loss_type"] == "dr_grpo" and c["kw"]["max_completion_length"] is None:
        c = dict(c, kw=dict(c["kw"], max_completion_length=max(c["logp"].shape[1], 1)))  # the op's default L
    lp = leaf(c["logp"].to(F64))
    old, adv, m = c["old"].to(F64), c["adv"].to(F64), c["mask"].to(F64)
    ref = c["ref"].to(F64) if c["ref"] is not None else None
    on = m != 0
    # TRL multiplies masked tokens by 0: the oracle sees zeros there (the op's contract: they are never read).
    z = torch.zeros((), dtype=F64)
    lp_in = torch.where(on, lp, z)
    loss, stats = R.grpo_loss(
        lp_in, torch.where(on, old, z), adv, m, ref_logp=torch.where(on, ref, z) if ref is not None else None,
        **c["kw"],
    )  # fmt: skip
    if lp.shape[0] == 0:  # an empty batch: loss 0 (TRL's mean over no sequence would be NaN)
        loss = (lp * 0).sum()
    grad = _clipped_grad_fix(torch.autograd.grad(loss, lp)[0], lp.detach(), old, ref, adv, m, c)
    with torch.no_grad():
        tol_loss, tol_kl, tol_clip, t_g = _grpo_tols(lp.detach(), old, ref, adv, m, c["kw"], c["logp"].dtype)
    res = dict(loss=(loss, tol_loss, torch.float32), grad=(grad, t_g, c["logp"].dtype))
    for k, v in stats.items():
        res[f"stat:{k}"] = (v, tol_kl if k == "kl" else tol_clip, torch.float32)
    return res


# ---- grpo_loss with rollout correction, GSPO ratios, batch invariance -------------------------------------------
def _grpo_rl_make(rng, dtype):
    g = tgen(rng)
    B = pick_len(rng, (0, 1, 2), 6)
    T = pick_len(rng, (0, 1, 2, 17), 40)
    c = _grpo_common(rng, g, B, T, dtype)
    # Finite values at the active tokens (NaN / inf there are the contract tests' business); padding may hold
    # anything (never read).
    on = c["mask"] != 0
    lp = c["logp"].float()
    lp = torch.where(on, lp.nan_to_num(-1.0, -1.0, -1.0), lp).to(dtype)
    old = torch.where(on, c["old"].float().nan_to_num(-1.0, -1.0, -1.0), c["old"].float()).to(dtype)
    spread = rng.choice((0.0, 0.01, 0.3, 2.0))  # rollout engine vs trainer: identical, close, far
    roll = old.to(F64) + torch.randn(B, T, generator=g, dtype=F64) * spread
    roll = torch.where(on, roll, torch.full_like(roll, math.nan)).to(dtype)
    mode = rng.choice(("none", "tis", "mis", "icepop"))
    level = "token" if mode == "icepop" else rng.choice(("token", "sequence"))
    ratio_level = rng.choice(("token", "sequence"))
    lo = rng.choice((0.0, 0.5, 0.9))
    rl = dict(
        is_correction=mode,
        is_cap=rng.choice((0.5, 1.0, 2.0, 5.0)),
        is_band=(lo, lo + rng.choice((0.2, 1.0, 4.5))),
        is_level=level,
        ratio_level=ratio_level,
        deterministic=rng.random() < 0.3,
    )
    if ratio_level == "sequence":  # GSPO's clip range is tiny; keep TRL's sometimes
        c["kw"] = dict(c["kw"], eps_low=rng.choice((3e-4, 0.2)), eps_high=rng.choice((4e-4, None)))
    return dict(c, logp=layout(rng, lp), old=old, roll=roll, rl=rl)


def _grpo_rl_run(c, backend):
    lp = leaf(c["logp"])
    loss, stats = lk.grpo_loss(
        lp, c["old"], c["adv"], c["mask"], ref_logp=c["ref"], backend=backend, rollout_logp=c["roll"], **c["kw"],
        **c["rl"],
    )  # fmt: skip
    res = {"loss": loss, "grad": torch.autograd.grad(loss, lp)[0]}
    res.update({f"stat:{k}": v for k, v in stats.items()})
    return res


def _grpo_rl_oracle(c):
    """fp64 reference (``reference.grpo_loss_rl`` + ``rollout_is_weights``) with a magnitude error bound.

    Each token term ``c_b M (w pg + beta kl)`` and its gradient carry a relative error
    ``e = C u (|log r| + |log rho| + n + 8) + sum_err``: the ratio (token or sequence mean over n terms), the IS
    weight (token or a sum of n terms), and the B*T-term sums. Decisions that may flip under that error are
    *ambiguous* and allowed either way: a clip flag (token or sequence; the loss is continuous there, the
    gradient jumps by ``c_b M w |q A|`` per token), and a MIS / IcePop mask flag (the term is ``w pg`` or 0)."""
    kw, rl = c["kw"], c["rl"]
    if kw["loss_type"] == "dr_grpo" and kw["max_completion_length"] is None:
        kw = dict(kw, max_completion_length=max(c["logp"].shape[1], 1))
    lp = leaf(c["logp"].to(F64))
    old, adv, m = c["old"].to(F64), c["adv"].to(F64), c["mask"].to(F64)
    roll = c["roll"].to(F64)
    ref = c["ref"].to(F64) if c["ref"] is not None else None
    B, T = m.shape
    on = m != 0
    z = torch.zeros((), dtype=F64)
    lp_in, old_in, roll_in = (torch.where(on, x, z) for x in (lp, old, roll))
    ref_in = torch.where(on, ref, z) if ref is not None else None
    mode, level = rl["is_correction"], rl["is_level"]
    isw = None
    if mode != "none":
        isw = R.rollout_is_weights(old_in, roll_in, m, mode=mode, cap=rl["is_cap"], band=rl["is_band"], level=level)
    loss, stats = R.grpo_loss_rl(
        lp_in, old_in, adv, m, ref_logp=ref_in, is_weight=isw, ratio_level=rl["ratio_level"], **kw
    )
    if B == 0:
        loss = (lp * 0).sum()
    grad = torch.autograd.grad(loss, lp)[0]
    with torch.no_grad():
        lpd = lp.detach()
        n = on.sum(1, keepdim=True).to(F64)
        lo = 1 - kw["eps_low"]
        hi = 1 + (kw["eps_low"] if kw["eps_high"] is None else kw["eps_high"])
        a = adv[:, None]
        lr = torch.where(on, lpd - old, z)
        if rl["ratio_level"] == "sequence":
            mr = (lr * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
            q = torch.exp(mr).expand(B, T)
            e_q = C * U32 * ((lr.abs() * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0) + n + 4)
        else:
            q = torch.exp(lr)
            e_q = C * U32 * (lr.abs() + 4)
        e_q = e_q.expand(B, T)
        lrho = torch.where(on, old - roll, z)
        if level == "sequence":
            lrho = lrho.sum(1, keepdim=True).expand(B, T)
            e_w = C * U32 * (torch.where(on, (old - roll).abs(), z).sum(1, keepdim=True) + n + 4).expand(B, T)
        else:
            e_w = C * U32 * (lrho.abs() + 4)
        rho = torch.exp(lrho)
        w = isw if isw is not None else torch.ones_like(q)
        clipped = ((q < lo) & (a < 0)) | ((q > hi) & (a > 0))
        pg = (-torch.minimum(q * a, q.clamp(lo, hi) * a)).abs()
        dpg = torch.where(clipped, z, (q * a).abs())
        amb_clip = ((q - lo).abs() <= 2 * e_q * q) | ((q - hi).abs() <= 2 * e_q * q)
        amb_w = torch.zeros_like(amb_clip)
        if mode == "mis":
            amb_w = (rho - rl["is_cap"]).abs() <= 2 * e_w * rho
        elif mode == "icepop":
            band_lo, band_hi = rl["is_band"]
            amb_w = ((rho - band_lo).abs() <= 2 * e_w * rho) | ((rho - band_hi).abs() <= 2 * e_w * rho)
        wmax = torch.maximum(w.abs(), torch.where(amb_w, rho, z))
        if ref is not None and kw["beta"] != 0:
            d = torch.where(on, ref, z) - lpd
            kl_mag = kw["beta"] * (torch.exp(d) + d.abs() + 1)
            dkl_mag = kw["beta"] * (torch.exp(d) + 1)
            e_kl = C * U32 * (d.abs() + 4)
        else:
            kl_mag = dkl_mag = e_kl = torch.zeros_like(q)
        cbm = _grpo_weights(dict(c, kw=kw), m)  # c_b |M| per token
        sum_err = C * U32 * (B + T + 4)
        tok = wmax * pg * (e_q + e_w + sum_err) + kl_mag * (e_kl + sum_err) + torch.where(amb_w, rho * pg, z)
        tol_loss = torch.where(on, cbm * tok, z).sum()
        # Gradient of token t: token level c_b M (w dpg + beta (1 - e^d)); sequence level the row's
        # (sum_t' M w) / n_M times c_b M |s A| (every token shares it).
        if rl["ratio_level"] == "sequence":
            sw = torch.where(on, m * wmax, z).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
            g_mag = sw * (q * a).abs()
            g_amb = torch.where(amb_clip.any(1, keepdim=True) & on, sw * (q * a).abs(), z)
        else:
            g_mag = wmax * dpg
            g_amb = torch.where(amb_clip, wmax * (q * a).abs(), z)
        g_amb = g_amb + torch.where(amb_w, rho * dpg, z)
        t_g = cbm * (g_mag * (e_q + e_w + sum_err) + g_amb + dkl_mag * (e_kl + sum_err))
        denom = m.sum().clamp(min=1.0)
        tol_clip = torch.where(on & amb_clip, m.abs(), z).sum() / denom + sum_err

        def mean(x):
            return torch.where(on, m.abs() * x, z).sum() / denom

        amb_cap = (rho - rl["is_cap"]).abs() <= 2 * e_w * rho  # tis' truncated flag
        tol_is = {
            "is/ratio_mean": mean(rho * (e_w + sum_err)),
            "is/weight_mean": mean(wmax * (e_w + sum_err) + torch.where(amb_w, rho, z)),
            "is/truncated_frac": mean(amb_cap.to(F64)) + sum_err,
            "is/masked_frac": mean(amb_w.to(F64)) + sum_err,
        }
        want_is = _is_stats(rho, w, on, m, mode, rl)
    res = dict(loss=(loss, tol_loss, torch.float32), grad=(grad, t_g, c["logp"].dtype))
    for k, v in stats.items():
        if k == "kl":
            continue  # checked by the plain grpo_loss fuzz (the same kernels' KL); here its bound is loose
        res[f"stat:{k}"] = (v, tol_clip, torch.float32)
    for k, v in want_is.items():
        res[f"stat:{k}"] = (v, tol_is[k], torch.float32)
    return res


def _is_stats(rho, w, on, m, mode, rl):
    """The rollout-correction statistics from their definitions (masked means over the completion tokens)."""
    z = torch.zeros((), dtype=F64)
    denom = m.sum().clamp(min=1.0)

    def mean(x):
        return torch.where(on, m * x, z).sum() / denom

    out = {"is/ratio_mean": mean(rho)}
    if mode == "none":
        return out
    out["is/weight_mean"] = mean(w)
    if mode == "tis":
        out["is/truncated_frac"] = mean((rho > rl["is_cap"]).to(F64))
    elif mode == "mis":
        out["is/masked_frac"] = mean((rho > rl["is_cap"]).to(F64))
    else:
        lo, hi = rl["is_band"]
        out["is/masked_frac"] = mean(((rho < lo) | (rho > hi)).to(F64))
    return out


def _fgrpo_make(rng, dtype):
    g = tgen(rng)
    B = pick_len(rng, (0, 1, 2), 3)
    T = pick_len(rng, (0, 1, 2, 5), 6)
    V = pick_len(rng, (1, 2, 3, 7, 31, 97), 100)
    D = pick_len(rng, (0, 1, 3, 16), 16)
    c = _grpo_common(rng, g, B, T, dtype)
    s = scale_of(rng) ** 0.5
    c["hidden"] = (torch.randn(B, T, D, generator=g, dtype=F64) * s).to(dtype)
    c["weight"] = (torch.randn(V, D, generator=g, dtype=F64) * s / max(D, 1) ** 0.5).to(dtype)
    c["bias"] = (torch.randn(V, generator=g, dtype=F64) * s).to(dtype) if rng.random() < 0.3 else None
    c["targets"] = torch.where(c["mask"] != 0, torch.randint(0, V, (B, T), generator=g), rng.choice((-1, -100, V)))
    c["temperature"] = temperature_of(rng) if rng.random() < 0.3 else rng.choice((1.0, 0.7))
    c["logp"] = None
    return c


def _fgrpo_run(c, backend):
    h, w = leaf(c["hidden"]), leaf(c["weight"])
    b = leaf(c["bias"]) if c["bias"] is not None else None
    loss, stats = lk.fused_linear_grpo_loss(
        h, w, c["targets"], c["old"], c["adv"], c["mask"], bias=b, temperature=c["temperature"], ref_logp=c["ref"],
        backend=backend, **c["kw"],
    )  # fmt: skip
    ins = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, ins, allow_unused=True) if loss.requires_grad else [None] * len(ins)
    res = {"loss": loss}
    for name, x, gr in zip(("d_hidden", "d_weight", "d_bias"), ins, grads, strict=False):
        res[name] = gr if gr is not None else torch.zeros_like(x)
    res.update({f"stat:{k}": v for k, v in stats.items()})
    return res


def _fgrpo_oracle(c):
    if c["kw"]["loss_type"] == "dr_grpo" and c["kw"]["max_completion_length"] is None:
        c = dict(c, kw=dict(c["kw"], max_completion_length=max(c["hidden"].shape[1], 1)))  # the op's default L
    h = leaf(torch.where((c["mask"] != 0)[..., None], c["hidden"].to(F64), 0.0))
    w = leaf(c["weight"].to(F64))
    b = leaf(c["bias"].to(F64)) if c["bias"] is not None else None
    old, adv, m = c["old"].to(F64), c["adv"].to(F64), c["mask"].to(F64)
    ref = c["ref"].to(F64) if c["ref"] is not None else None
    on = m != 0
    z = torch.zeros((), dtype=F64)
    T_ = c["temperature"]
    B, T, D = h.shape
    V = w.shape[0]
    safe = torch.where(on, c["targets"], 0)
    lp, _ = R.fused_linear_token_logprobs(h, w, safe, bias=b, temperature=T_)
    lp_in = torch.where(on, lp, z)
    loss, stats = R.grpo_loss(
        lp_in, torch.where(on, old, z), adv, m, ref_logp=torch.where(on, ref, z) if ref is not None else None,
        **c["kw"],
    )  # fmt: skip
    if B == 0:  # an empty batch: loss 0 (TRL's mean over no sequence would be NaN)
        loss = (h * 0).sum()
    ins = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    grads = [gr if gr is not None else torch.zeros_like(x) for x, gr in zip(ins, grads, strict=False)]
    with torch.no_grad():
        lpd = lp.detach()
        hd, wd = h.detach().reshape(B * T, D), w.detach()
        logits = hd @ wd.T + (b.detach() if b is not None else 0.0)
        absdot = hd.abs() @ wd.abs().T + (b.detach().abs() if b is not None else 0.0)
        e_row = (C * U32 * (D + 1) * absdot).amax(-1) / T_ if V else torch.zeros(B * T, dtype=F64)
        zt = logits / T_
        tgt = safe.reshape(-1)
        t_lp, _, _ = _tlp_tols(zt, tgt, -(1 << 62), torch.ones(B * T, dtype=F64), torch.zeros(B * T, dtype=F64))
        t_lp = (t_lp + 2 * e_row).reshape(B, T)
        tol_loss, tol_kl, tol_clip, t_g = _grpo_tols(lpd, old, ref, adv, m, c["kw"], torch.float32)
        # A log-prob error e moves the token loss by |dl/dlogp| e and every statistic through r = exp(lp - old).
        lt_grad = torch.autograd.functional.jacobian(
            lambda x: R.grpo_loss(
                torch.where(on, x, z), torch.where(on, old, z), adv, m,
                ref_logp=torch.where(on, ref, z) if ref is not None else None, **c["kw"],
            )[0],
            torch.where(on, lpd, z),
        )  # fmt: skip
        lt_grad = _clipped_grad_fix(lt_grad, lpd, old, ref, adv, m, c)
        tol_loss = tol_loss + (lt_grad.abs() * t_lp).sum()
        r = torch.exp(torch.where(on, lpd - old, z))
        lo = 1 - c["kw"]["eps_low"]
        hi = 1 + (c["kw"]["eps_low"] if c["kw"]["eps_high"] is None else c["kw"]["eps_high"])
        amb = on & (((r - lo).abs() <= r * (t_lp + 1e-30) * 2) | ((r - hi).abs() <= r * (t_lp + 1e-30) * 2))
        denom = m.sum().clamp(min=1.0)
        tol_clip = tol_clip + torch.where(amb, m.abs(), z).sum() / denom
        if ref is not None:
            d = torch.where(on, ref - lpd, z)
            tol_kl = tol_kl + torch.where(on, m.abs() * (torch.exp(d) + 1) * t_lp, z).sum() / denom
        # dlogits G = g_t (onehot - p) / T with g_t = dloss/dlogp_t: its error from g_t's and from p's.
        gt = lt_grad.reshape(-1)
        p = torch.softmax(zt, -1) if V else zt
        # A token whose clip flag may flip (amb) may take either branch: 0 or c_b M |r A|.
        t_gt = (t_g + torch.where(amb, _grpo_weights(c, m) * (r * adv[:, None]).abs(), z)).reshape(-1)
        # d(dl/dlogp)/dlogp is about |r A| + beta e^d: a logp error moves g_t by that much.
        curv = (r * adv[:, None]).abs()
        if ref is not None and c["kw"]["beta"] != 0:  # (no KL term at beta = 0: 0 * an overflowing e^d is not a bound)
            curv = curv + c["kw"]["beta"] * torch.exp(d)
        t_gt = t_gt + (_grpo_weights(c, m) * curv * t_lp).reshape(-1)
        onehot = torch.zeros_like(p)
        if V:
            onehot[torch.arange(B * T), tgt.long()] = 1.0
        Gabs = (gt.abs()[:, None] * (onehot + p)) / T_
        t_p = p * (C * U32 * (V + 1 + (zt - zt.amax(-1, keepdim=True)).abs()) + 2 * e_row[:, None]) if V else p
        # p below the fp32 range is flushed (absolute error 2**-126 before the scaling by g / T).
        t_G = (t_gt[:, None] * (onehot + p) + gt.abs()[:, None] * (t_p + C * FTZ)) / T_
        t_G = t_G + 2 * unit(c["hidden"].dtype) * Gabs + tiny(c["hidden"].dtype) + C * FTZ
        # The input gradients from the (fixed, see _clipped_grad_fix) dloss/dlogp in closed form: dlogits
        # G = g (onehot - p) / T, dX = G W, dW = G^T X, db = sum G (autograd would give 0 * inf = NaN there).
        Gx = gt[:, None] * (onehot - p) / T_
        grads = [(Gx @ wd).reshape(B, T, D), Gx.T @ hd] + ([Gx.sum(0)] if b is not None else [])
        res = dict(
            loss=(loss, tol_loss, torch.float32),
            d_hidden=(
                grads[0],
                (t_G @ wd.abs() + C * U32 * (V + 1) * (Gabs @ wd.abs())).reshape(B, T, D),
                c["hidden"].dtype,
            ),
            d_weight=(grads[1], t_G.T @ hd.abs() + C * U32 * (B * T + 1) * (Gabs.T @ hd.abs()), c["weight"].dtype),
        )
        if b is not None:
            res["d_bias"] = (grads[2], t_G.sum(0) + C * U32 * (B * T + 1) * Gabs.sum(0), c["bias"].dtype)
        for k, v in stats.items():
            res[f"stat:{k}"] = (v, tol_kl if k == "kl" else tol_clip, torch.float32)
        _drop_overflowing_grads(res, Gabs, c["hidden"].dtype)
        # The per-token coefficient before the aggregation weights, |r A| + beta e^(ref - logp), must fit fp32:
        # the kernels form it, then scale it by c_b M / T. Beyond (probability ratios beyond e^88) the input
        # gradients are inf / NaN on every backend (README: bad-input contract); the forward is still checked.
        coef = (r * adv[:, None]).abs()
        if ref is not None and c["kw"]["beta"] != 0:
            coef = coef + c["kw"]["beta"] * torch.exp(d)
        if bool((torch.where(on, coef, z) > torch.finfo(torch.float32).max / 2).any()):
            for k in ("d_hidden", "d_weight", "d_bias"):
                res.pop(k, None)
    return res


def _drop_overflowing_grads(res: dict, G: torch.Tensor, dtype: torch.dtype) -> None:
    """Outside the checked domain: 16-bit inputs whose dlogits tile (stored in that dtype) overflows it (extreme
    temperatures): the input gradients are then inf / NaN (README: bad-input contract). The forward is checked."""
    if G.numel() and bool((G.abs().nan_to_num(0.0) > torch.finfo(dtype).max / 2).any()):
        for k in ("d_hidden", "d_weight", "d_bias"):
            res.pop(k, None)


def _clipped_grad_fix(grad, lp, old, ref, adv, m, c):
    """Autograd of the reference gives 0 * inf = NaN for a clipped token whose ratio is inf (old_logp = -inf); the
    derivative there is 0 (clip() is flat): use the closed form where autograd's NaN is that artifact."""
    on = m != 0
    z = torch.zeros((), dtype=F64)
    kw = c["kw"]
    lo, hi = 1 - kw["eps_low"], 1 + (kw["eps_low"] if kw["eps_high"] is None else kw["eps_high"])
    r = torch.exp(torch.where(on, lp - old, z))
    a = adv[:, None]
    clipped = ((r < lo) & (a < 0)) | ((r > hi) & (a > 0))
    dl = torch.where(clipped, z, -r * a)
    if ref is not None and kw["beta"] != 0:
        dl = dl + kw["beta"] * (1 - torch.exp(torch.where(on, ref - lp, z)))
    closed = torch.where(on, _grpo_weights(c, m) * dl, z)
    fix = torch.isnan(grad) & ~torch.isnan(closed)
    return torch.where(fix, closed, grad)


def _grpo_weights(c, m):
    B, T = m.shape
    n = m.sum(1)
    lt = c["kw"]["loss_type"]
    if lt == "grpo":
        cb = 1.0 / (B * n.clamp(min=1.0))
    elif lt == "dr_grpo":
        cb = torch.full((B,), 1.0 / max(B * (c["kw"]["max_completion_length"] or T), 1), dtype=F64)
    elif lt == "dapo" and c["kw"]["dapo_normalizer"] is not None:
        cb = torch.full((B,), 1.0 / c["kw"]["dapo_normalizer"], dtype=F64)
    else:
        cb = (1.0 / n.sum().clamp(min=1.0)).expand(B)
    return cb[:, None] * m.abs()


# ---- group_advantages -------------------------------------------------------------------------------------------
def _adv_make(rng, dtype):
    g = tgen(rng)
    G = pick_len(rng, (1, 2, 3, 8, 13), 16)
    n_groups = pick_len(rng, (0, 1, 2), 6)
    r = torch.randn(n_groups, G, generator=g, dtype=F64) * scale_of(rng) + rng.choice((0.0, 0.0, 1.0, 1e3))
    k = rng.random()
    if k < 0.25 and n_groups:  # equal groups
        r[: max(1, n_groups // 2)] = r[: max(1, n_groups // 2), :1]
    elif k < 0.35:  # binary rewards
        r = (r > 0).to(F64)
    r = r.to(dtype)
    if rng.random() < 0.25 and r.numel():  # missing rewards
        r = torch.where(torch.rand(r.shape, generator=g) < 0.25, math.nan, r)
    r = inject(rng, g, r, (math.inf, -math.inf))  # an infinite reward: NaN for its group (batch: for all)
    flat = rng.random() < 0.5
    return dict(
        rewards=layout(rng, r.reshape(-1) if flat else r),
        G=G,
        scale=rng.choice(("group", "batch", "none")),
        eps=rng.choice((1e-4, 1e-6, 0.0)),
        unbiased=rng.random() < 0.8,
        g=torch.randn(r.shape, generator=g, dtype=F64).reshape(-1 if flat else r.shape),
    )


def _adv_run(c, backend):
    x = leaf(c["rewards"])
    a = lk.group_advantages(x, c["G"], scale=c["scale"], eps=c["eps"], unbiased=c["unbiased"], backend=backend)
    loss = (a * c["g"].to(a.dtype)).sum()
    return dict(adv=a, grad=torch.autograd.grad(loss, x)[0] if x.numel() else x.detach().clone())


def _adv_oracle(c):
    x = leaf(c["rewards"].to(F64))
    kw = dict(scale=c["scale"], eps=c["eps"], unbiased=c["unbiased"])
    a = R.group_advantages(x, c["G"], **kw)
    grad = torch.autograd.grad((a * c["g"]).sum(), x)[0] if x.numel() else x.detach().clone()
    with torch.no_grad():
        r = x.detach().reshape(-1, c["G"])
        ok = ~torch.isnan(r)
        z = torch.zeros((), dtype=F64)
        n = ok.sum(1, keepdim=True).to(F64)
        if c["scale"] == "batch":
            M = torch.where(ok, r, z).abs().amax() if r.numel() else z
            M = M.expand(r.shape[0], 1)
            nn = n.sum().expand(r.shape[0], 1)
        else:
            M = torch.where(ok, r, z).abs().amax(1, keepdim=True)
            nn = n
        mean = torch.where(ok, r, z).sum(1, keepdim=True) / n.clamp(min=1)
        k = (nn - 1 if c["unbiased"] else nn).clamp(min=1)
        if c["scale"] == "batch":
            cb = torch.where(ok, r - (torch.where(ok, r, z).sum() / nn.clamp(min=1)), z)
            std = ((cb * cb).sum() / k).sqrt().expand(r.shape[0], 1)
        else:
            cc = torch.where(ok, r - mean, z)
            std = ((cc * cc).sum(1, keepdim=True) / k).sqrt()
        d = std + c["eps"] if c["scale"] != "none" else torch.ones_like(std)
        # Centring costs C u (n + 1) M (M: the largest |reward| summed); the std inherits it relatively.
        e_c = C * U32 * (nn + 2) * M
        a_abs = torch.where(ok, R.group_advantages(x.detach(), c["G"], **kw).reshape(r.shape).abs(), z)
        if c["scale"] == "none":
            tol = e_c + z * a_abs
        else:
            tol = torch.where(d > 0, e_c / d.clamp(min=1e-300) * (1 + a_abs) + C * U32 * a_abs, math.inf)
        gg = c["g"].reshape(r.shape).abs()
        gsum = torch.where(ok, gg, z).sum(1, keepdim=True)
        if c["scale"] == "batch":
            gsum = gsum.sum().expand_as(gsum)
        # dA/dr = (g - g_bar) / d - P c / (d^2 k std): relative error of the same order times its magnitude.
        t_g = torch.where(
            d > 0, (gg + gsum / n.clamp(min=1)) / d.clamp(min=1e-300) * (e_c / d.clamp(min=1e-300) + C * U32), z
        )
        t_g = t_g * (1 + (nn + 2) * (1 + a_abs.amax(1, keepdim=True) ** 2)) + torch.where(ok, 0 * gg, z)
        tol = torch.where(ok, tol, z).reshape(c["rewards"].shape)
        t_g = torch.where(ok, t_g, z).reshape(c["rewards"].shape)
    acc = F64 if c["rewards"].dtype == F64 else torch.float32
    with torch.no_grad():  # the gradient of a poisoned group is NaN too (the reference's where() would give 0)
        grad = torch.where(torch.isnan(a.detach()), math.nan, grad)
    return dict(adv=(a, tol, acc), grad=(grad, t_g, c["rewards"].dtype))


# ---- interpolate_rewards ----------------------------------------------------------------------------------------
def _interp_make(rng, dtype):
    g = tgen(rng)
    B = pick_len(rng, (0, 1, 2), 4)
    S = pick_len(rng, (0, 1, 2, 9), 40)
    v = (torch.randn(B, S, generator=g, dtype=F64) * scale_of(rng)).to(dtype)
    k = rng.random()
    mask = torch.rand(B, S, generator=g) < rng.choice((0.05, 0.2, 0.6))
    if k < 0.15:
        mask[:] = False
    elif k < 0.3:
        mask[:] = True
    # Non-anchor values are never read: put garbage there sometimes.
    if rng.random() < 0.3:
        v = torch.where(mask, v, torch.tensor(math.nan, dtype=dtype))
    return dict(
        values=layout(rng, v), mask=layout(rng, mask), g=torch.randn(B, S, generator=g, dtype=F64).float().double()
    )


def _interp_run(c, backend):
    x = leaf(c["values"])
    out = lk.interpolate_rewards(x, c["mask"], backend=backend)
    loss = (out * c["g"].to(out.dtype)).sum()
    return dict(out=out, grad=torch.autograd.grad(loss, x)[0] if x.numel() else x.detach().clone())


def _interp_oracle(c):
    x = leaf(c["values"].to(F64))
    out = R.interpolate_rewards(x, c["mask"])
    grad = torch.autograd.grad((out * c["g"]).sum(), x)[0] if x.numel() else x.detach().clone()
    with torch.no_grad():
        v = torch.where(c["mask"], x.detach(), 0.0)
        tol = C * U32 * 2 * R.interpolate_rewards(v.abs(), c["mask"])
        Mt = R.interpolation_matrix(c["mask"]).transpose(1, 2)
        t_g = C * U32 * 2 * (Mt @ c["g"].abs().unsqueeze(-1)).squeeze(-1) if x.numel() else x.detach()
    return dict(out=(out, tol, torch.float32), grad=(grad, t_g, c["values"].dtype))


# ---- subtb_loss -------------------------------------------------------------------------------------------------
def _subtb_make(rng, dtype):
    g = tgen(rng)
    B = pick_len(rng, (0, 1, 2), 4)
    T = pick_len(rng, (0, 1, 2, 7), 24)
    s = rng.choice((0.1, 1.0, 5.0))
    log_pf = (-torch.rand(B, T, generator=g, dtype=F64) * s).to(dtype)
    log_term = (torch.randn(B, T + 1, generator=g, dtype=F64) * s - 2).to(dtype)
    log_reward = (torch.randn(B, T + 1, generator=g, dtype=F64) * s).to(dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    if rng.random() < 0.3 and B:
        lengths[0] = rng.choice((0, T))
    if rng.random() < 0.3 and T:  # garbage past each row's length is never read
        pos = torch.arange(T + 1)
        log_term = torch.where(pos[None] > lengths[:, None], torch.tensor(math.nan, dtype=dtype), log_term)
    return dict(
        log_pf=layout(rng, log_pf),
        log_term=layout(rng, log_term),
        log_reward=layout(rng, log_reward),
        lengths=lengths.to(rng.choice((torch.int64, torch.int32))),
        decay=rng.choice((1.0, 1.0, 0.9, 0.5, 0.0)),
        g=torch.randn(B, generator=g, dtype=F64),
    )


def _subtb_run(c, backend):
    ins = [leaf(c[k]) for k in ("log_pf", "log_term", "log_reward")]
    loss = lk.subtb_loss(*ins, c["lengths"], decay=c["decay"], reduction="none", backend=backend)
    tot = (loss * c["g"].to(loss.dtype)).sum()
    grads = torch.autograd.grad(tot, ins) if tot.requires_grad else [x.detach() * 0 for x in ins]
    return dict(loss=loss, d_pf=grads[0], d_term=grads[1], d_reward=grads[2])


def _subtb_oracle(c):
    ins = [leaf(c[k].to(F64)) for k in ("log_pf", "log_term", "log_reward")]
    loss = R.subtb_loss(*ins, c["lengths"], decay=c["decay"], reduction="none")
    tot = (loss * c["g"]).sum()
    grads = torch.autograd.grad(tot, ins, allow_unused=True) if tot.requires_grad else [None] * 3
    grads = [gr if gr is not None else torch.zeros_like(x) for x, gr in zip(ins, grads, strict=False)]
    with torch.no_grad():
        B, T = ins[0].shape
        tol_l, tol_g = [], []
        for b in range(B):
            n = int(c["lengths"][b])
            pf, lt, lr = (x.detach()[b] for x in ins)
            A = (
                (pf[:n].abs().sum() + 2 * (lt[: n + 1].abs() + lr[: n + 1].abs()).sum())
                if n
                else torch.zeros((), dtype=F64)
            )
            gap = torch.arange(n + 1)[None, :] - torch.arange(n + 1)[:, None]
            W = torch.where(gap >= 1, c["decay"] ** (gap - 1).clamp(min=0).double(), 0.0).sum()
            lb = loss.detach()[b]
            e = C * U32 * (n + 2)
            tol_l.append(e * (2 * A * (lb * W).sqrt() + W * A * A * e + lb))
            tol_g.append(e * (2 * W * A + 2 * (lb * W).sqrt()) * c["g"][b].abs())
        tl_ = torch.stack(tol_l) if B else torch.zeros(0, dtype=F64)
        tg = torch.stack(tol_g) if B else torch.zeros(0, dtype=F64)
    dt = c["log_pf"].dtype
    return dict(
        loss=(loss, tl_, torch.float32),
        d_pf=(grads[0], tg[:, None].expand_as(grads[0]), dt),
        d_term=(grads[1], tg[:, None].expand_as(grads[1]), dt),
        d_reward=(grads[2], tg[:, None].expand_as(grads[2]), dt),
    )


# ---- composites without backends: sequence_logprobs, dpo_loss, bin_rank -----------------------------------------
def _seq_make(rng, dtype):
    g = tgen(rng)
    B, T = pick_len(rng, (0, 1, 3), 5), pick_len(rng, (0, 1, 2), 30)
    lp = inject(rng, g, (-torch.rand(B, T, generator=g, dtype=F64) * scale_of(rng)).to(dtype), (math.nan,))
    mask = torch.rand(B, T, generator=g) < rng.choice((0.0, 0.5, 1.0))
    return dict(lp=layout(rng, lp), mask=mask, normalize=rng.random() < 0.5, g=torch.randn(B, generator=g, dtype=F64))


def _seq_run(c, backend):
    x = leaf(c["lp"])
    s = lk.sequence_logprobs(x, c["mask"], normalize=c["normalize"])
    return dict(out=s, grad=torch.autograd.grad((s * c["g"].to(s.dtype)).sum(), x)[0] if x.numel() else x * 0)


def _seq_oracle(c):
    # Masked tokens are never read (NaN there is fine): the oracle sees zeros there.
    x = leaf(torch.where(c["mask"], c["lp"].to(F64), 0.0))
    s = R.sequence_logprobs(x, c["mask"], normalize=c["normalize"])
    grad = torch.autograd.grad((s * c["g"]).sum(), x)[0] if x.numel() else x.detach() * 0
    T = x.shape[-1]
    with torch.no_grad():
        tol = C * U32 * (T + 2) * R.sequence_logprobs(x.detach().abs(), c["mask"], normalize=c["normalize"])
        tol = torch.nan_to_num(tol, nan=0.0)
    return dict(out=(s, tol, torch.float32), grad=(grad, C * U32 * grad.abs().nan_to_num(0.0), c["lp"].dtype))


def _dpo_make(rng, dtype):
    g = tgen(rng)
    B = pick_len(rng, (0, 1, 2), 6)
    s = rng.choice((1.0, 30.0, 300.0))
    xs = [inject(rng, g, (-torch.rand(B, generator=g, dtype=F64) * s).to(dtype), (math.nan,)) for _ in range(4)]
    lt = rng.choice(("sigmoid", "hinge", "ipo", "robust"))
    ls = rng.choice((0.0, 0.1)) if lt in ("sigmoid", "robust") else 0.0
    lengths = None
    if lt == "ipo" and rng.random() < 0.5:
        lengths = [torch.randint(0, 50, (B,), generator=g), torch.randint(0, 50, (B,), generator=g)]
    return dict(xs=xs, kw=dict(beta=rng.choice((0.1, 0.5, 2.0)), loss_type=lt, label_smoothing=ls), lengths=lengths)


def _dpo_kw(c):
    kw = dict(c["kw"])
    if c["lengths"] is not None:
        kw.update(chosen_lengths=c["lengths"][0], rejected_lengths=c["lengths"][1])
    return kw


def _dpo_run(c, backend):
    xs = [leaf(x) for x in c["xs"]]
    loss, cr, rr = lk.dpo_loss(*xs, **_dpo_kw(c))
    grads = torch.autograd.grad(loss, xs[:2]) if xs[0].numel() else [x.detach() * 0 for x in xs[:2]]
    return dict(loss=loss, chosen=cr, rejected=rr, d_chosen=grads[0], d_rejected=grads[1])


def _dpo_oracle(c):
    xs = [leaf(x.to(F64)) for x in c["xs"]]
    loss, cr, rr = R.dpo_loss(*xs, **_dpo_kw(c))
    if xs[0].numel() == 0:  # an empty batch: loss 0 (the mean of no pair)
        loss = (xs[0] * 0).sum()
    grads = torch.autograd.grad(loss, xs[:2]) if xs[0].numel() else [x.detach() * 0 for x in xs[:2]]
    beta = c["kw"]["beta"]
    mag = sum(x.detach().abs() for x in xs) if xs[0].numel() else xs[0].detach()
    B = max(xs[0].numel(), 1)
    # The margin beta (sum of 4 differences) carries C u beta sum|x|; the loss moves by its slope (<= 1 / (1 - 2 ls),
    # or |2 (d - 1/(2 beta))| for ipo) times that, averaged over the batch.
    e = C * U32 * beta * mag
    d_ipo = (grads[0].detach().abs() * B / beta + 1) if c["kw"]["loss_type"] == "ipo" else 1.0
    slope = 2.0 * d_ipo
    tol_loss = (slope * e).sum() / B + C * U32 * loss.detach().abs() * 4
    dt = c["xs"][0].dtype
    tol_g = (C * U32 * (4 + slope * beta * beta * mag) * (1 + grads[0].detach().abs())) * (
        1 + (d_ipo if isinstance(d_ipo, float) else 0)
    )
    tol_r = C * U32 * beta * (c["xs"][0].double().abs() + c["xs"][2].double().abs())
    tol_rr = C * U32 * beta * (c["xs"][1].double().abs() + c["xs"][3].double().abs())
    return dict(
        loss=(loss, tol_loss, torch.float32 if dt != F64 else F64),
        chosen=(cr, tol_r, torch.float32),
        rejected=(rr, tol_rr, torch.float32),
        d_chosen=(grads[0], tol_g, dt),
        d_rejected=(grads[1], tol_g, dt),
    )


def _bin_make(rng, dtype):
    g = tgen(rng)
    Q, A, N = pick_len(rng, (0, 1, 2), 4), pick_len(rng, (1, 2, 5), 6), pick_len(rng, (1, 2, 7), 9)
    s = torch.randn(Q, A, N, generator=g, dtype=F64) * scale_of(rng)
    if rng.random() < 0.2 and Q:  # ties
        s[:, 1:] = s[:, :1]
    valid = torch.rand(Q, A, generator=g) < 0.7 if rng.random() < 0.5 else None
    return dict(scores=layout(rng, inject(rng, g, s.to(dtype), (math.nan, -math.inf))), valid=valid,
                reduce=rng.choice(("mean", "logmeanexp")))  # fmt: skip


def _bin_run(c, backend):
    best, marg = lk.bin_rank(c["scores"], valid=c["valid"], reduce=c["reduce"])
    return dict(marginal=marg, best=best)


def _bin_oracle(c):
    s = c["scores"]
    best, marg = R.bin_rank(s, valid=c["valid"], reduce=c["reduce"])
    N = s.shape[-1]
    tol = C * U32 * (N + 2) * s.double().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).amax(-1)
    if c["reduce"] == "logmeanexp":  # logsumexp - log N: two terms of size log N cancel
        tol = tol + C * U32 * (math.log(N) + 1)
    # The chosen index must be best up to the marginal's tolerance: a near-tie may go either way.
    return dict(marginal=(marg, tol, torch.float32), best=(best, None, None))


def _bin_check(c, backend):
    got = _bin_run(c, backend)
    want = _bin_oracle(c)
    ref, tol, _ = want["marginal"]
    v = compare("marginal", got["marginal"], ref, tol, torch.float32 if c["scores"].dtype != F64 else F64)
    bb, rb = got["best"], want["best"][0]
    for q in range(bb.shape[0]):
        if int(bb[q]) == int(rb[q]):
            continue
        if int(bb[q]) < 0 or int(rb[q]) < 0:
            return Verdict(math.inf, f"best[{q}] = {int(bb[q])}, reference {int(rb[q])}")
        gap = float(ref[q, rb[q]] - ref[q, bb[q]])
        if not gap <= 2 * float(tol[q, rb[q]] + tol[q, bb[q]]):
            return Verdict(math.inf, f"best[{q}] = {int(bb[q])}, reference {int(rb[q])}, marginal gap {gap}")
    return v


def _anchors_make(rng, dtype):
    g = tgen(rng)
    B, max_len = pick_len(rng, (0, 1, 3), 5), pick_len(rng, (0, 1, 8), 40)
    return dict(
        lengths=torch.randint(0, max_len + 1, (B,), generator=g),
        stride=pick_len(rng, (1, 2, 8), 10),
        min_len=rng.choice((0, 0, 1, 3, 9)),
        max_len=max_len,
    )


def _anchors_check(c, backend):
    kw = dict(min_len=c["min_len"], max_len=c["max_len"])
    got = lk.reward_anchors(c["lengths"], c["stride"], **kw)
    want = R.reward_anchors(c["lengths"], c["stride"], **kw)
    return Verdict(0.0, "") if torch.equal(got, want) else Verdict(math.inf, "anchor masks differ")


OPS: dict[str, Op] = {
    "token_logprobs": Op("token_logprobs", NATIVE, _tlp_make, _tlp_run, _tlp_oracle),
    "token_logprobs_sampled": Op("token_logprobs_sampled", NATIVE, _tlps_make, _tlps_run, _tlps_oracle),
    "fused_linear_token_logprobs": Op("fused_linear_token_logprobs", NATIVE, _flt_make, _flt_run, _flt_oracle),
    "grpo_loss": Op("grpo_loss", ("triton", "torch"), _grpo_make, _grpo_run, _grpo_oracle),
    "grpo_loss_rl": Op("grpo_loss_rl", ("triton", "torch"), _grpo_rl_make, _grpo_rl_run, _grpo_rl_oracle),
    "fused_linear_grpo_loss": Op("fused_linear_grpo_loss", NATIVE, _fgrpo_make, _fgrpo_run, _fgrpo_oracle),
    "group_advantages": Op("group_advantages", NATIVE, _adv_make, _adv_run, _adv_oracle, DTYPES + (F64,)),
    "interpolate_rewards": Op(
        "interpolate_rewards", NATIVE, _interp_make, _interp_run, _interp_oracle, DTYPES + (F64,)
    ),
    "subtb_loss": Op("subtb_loss", NATIVE, _subtb_make, _subtb_run, _subtb_oracle),
    "sequence_logprobs": Op("sequence_logprobs", ("torch",), _seq_make, _seq_run, _seq_oracle),
    "dpo_loss": Op("dpo_loss", ("torch",), _dpo_make, _dpo_run, _dpo_oracle),
    "bin_rank": Op("bin_rank", ("torch",), _bin_make, _bin_run, _bin_oracle),
    "reward_anchors": Op("reward_anchors", ("torch",), _anchors_make, None, None, (torch.float32,)),
}
CUSTOM_CHECK = {"bin_rank": _bin_check, "reward_anchors": _anchors_check}


def run_case(op_name: str, rng: random.Random, dtype: torch.dtype, backend: str) -> tuple[Verdict, dict]:
    op = OPS[op_name]
    case = op.make(rng, dtype)
    if op_name in CUSTOM_CHECK:
        return CUSTOM_CHECK[op_name](case, backend), case
    return check(op, case, backend), case
