"""Small drivers that launch every compiled (CUDA) kernel once, plus the fused LM-head Triton kernels, for
``compute-sanitizer --tool memcheck|racecheck`` (``make gpu-check`` runs it).

``python -m benchmarks.sanitize_driver [--device cuda|cpu] [NAME ...]``: runs the named drivers (default: all) and
prints one line per driver. Shapes are small but odd (partial blocks, masked rows) so bounds checks matter. On the
CPU (``--device cpu``) the same ops run their CPU twins / the Triton interpreter: that is the dry run of the logic.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _token_logprobs(dev):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1003, generator=g).to(dev)
    y = torch.randint(0, 1003, (37,), generator=g).to(dev)
    y[::5] = -100
    lp, ent, st = torch.ops.lacot.token_logprobs_fwd_native(x, y, 0.7, -100, True)
    gl, ge = torch.randn(37, generator=g).to(dev), torch.randn(37, generator=g).to(dev)
    torch.ops.lacot.token_logprobs_bwd_native(gl, ge, x, y, st, ent, 0.7, -100)
    torch.ops.lacot.token_logprobs_bwd_native(gl, None, x.bfloat16(), y, st, ent, 0.7, -100)


def _group_advantages(dev):
    r = torch.randn(6 * 7, generator=torch.Generator().manual_seed(1)).to(dev)
    for scale in (0, 1, 2):
        a = torch.ops.lacot.group_advantages_fwd_native(r, 7, scale, 1e-4, True)
        torch.ops.lacot.group_advantages_bwd_native(torch.ones_like(a), r, 7, scale, 1e-4, True)


def _interpolate_rewards(dev):
    g = torch.Generator().manual_seed(2)
    v = torch.randn(5, 131, generator=g).to(dev)
    m = (torch.rand(5, 131, generator=g) < 0.1).to(dev)
    m[:, 0] = True
    out = torch.ops.lacot.interpolate_rewards_fwd_native(v, m)
    torch.ops.lacot.interpolate_rewards_bwd_native(torch.ones_like(out), m)


def _subtb(dev):
    g = torch.Generator().manual_seed(3)
    B, T = 4, 77
    pf, term, rew = (
        torch.randn(B, T, generator=g),
        torch.randn(B, T + 1, generator=g),
        torch.randn(B, T + 1, generator=g),
    )
    lengths = torch.tensor([77, 0, 33, 76])
    args = [t.to(dev) for t in (pf, term, rew, lengths)]
    loss, _ = torch.ops.lacot.subtb_fwd_native(*args, 0.9)
    torch.ops.lacot.subtb_bwd_native(torch.ones_like(loss), *args, 0.9)


def _fused_lm_head_triton(dev):
    import lacot_kernels as lk

    g = torch.Generator().manual_seed(4)
    dt = torch.bfloat16
    h = torch.randn(45, 64, generator=g).to(dev, dt).requires_grad_(True)
    w = (torch.randn(1003, 64, generator=g) * 0.1).to(dev, dt).requires_grad_(True)
    y = torch.randint(0, 1003, (45,), generator=g).to(dev)
    y[::4] = -100
    for precision in ("default", "high"):
        lp, ent = lk.fused_linear_token_logprobs(
            h, w, y, return_entropy=True, backend="triton", precision=precision, temperature=0.8
        )
        torch.autograd.grad(lp.sum() + ent.sum(), (h, w))


DRIVERS = {
    "token_logprobs": _token_logprobs,
    "group_advantages": _group_advantages,
    "interpolate_rewards": _interpolate_rewards,
    "subtb": _subtb,
    "fused_lm_head_triton": _fused_lm_head_triton,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"drivers to run (default: all of {list(DRIVERS)})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    import lacot_kernels as lk

    dev = torch.device(a.device)
    failed = 0
    for name in a.names or list(DRIVERS):
        if name != "fused_lm_head_triton" and not lk.native_available(dev.type):
            print(f"SKIP {name}: lacot_kernels._C has no {dev.type} kernels", flush=True)
            continue
        if name == "fused_lm_head_triton" and not lk.triton_available(dev.type):
            print(f"SKIP {name}: Triton cannot run {dev.type} tensors here", flush=True)
            continue
        t0 = time.time()
        try:
            DRIVERS[name](dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"OK   {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # report every driver, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
