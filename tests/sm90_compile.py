"""Compile every Triton kernel of lacot_kernels for sm_90 (H100 / H200) at its launcher's real config, no GPU needed.

Run as ``python -m tests.sm90_compile [--json PATH]`` from the project root (``tests/test_sm90_compile.py`` does,
in a subprocess: the launchers must be imported with ``TRITON_INTERPRET`` unset to pick their GPU configs).

How: each launcher is called on ``meta`` tensors at the headline shapes (N=8192, D=4096, V=152064 and a small-N
case) with ``JITFunction.run`` replaced by a recorder, so block sizes, warps, stages and grids are the ones the
launchers compute (the SM count is mirrored as 132, H100 SXM / H200). Each distinct launch is bound by Triton's own
binder and compiled with ``triton.compile(..., GPUTarget("cuda", 90, 32))`` down to a cubin with the bundled ptxas,
whose ``-v`` log gives registers and spills. Places that size a loop with a host sync (``nonzero``) are mirrored:
all rows are taken as valid there.

Fails (exit 1) on a compile error, shared memory over 227 KB, more than 64K registers per CTA, a grid over CUDA's
limits, register spills in a 16-bit (bf16/fp16) variant, or a 2-D pointer offset narrower than 64 bits in an
LM-head kernel (rows x D and V x D pass 2^31 elements at LM-head sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # GPU configs, not the interpreter's
os.environ.setdefault("LACOT_FUSED_WORKSPACE_MB", "2048")  # the CUDA default of the tile engine (meta is no GPU)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

SMEM_LIMIT = 227 * 1024
REGS_PER_SM = 65536
SMS = 132
LM_HEAD_KERNELS = ("_fused_linear_fwd_kernel", "_fused_linear_dlogits_kernel")
N, D, V = 8192, 4096, 152064
M = "meta"
bf16, f16, f32, i64 = torch.bfloat16, torch.float16, torch.float32, torch.int64

_launches: list[tuple[str, JITFunction, tuple, dict, tuple]] = []
_case = ["?"]


def _record(self, *args, grid, warmup, **kwargs):
    g = grid(dict(zip(self.arg_names, args, strict=False))) if callable(grid) else grid
    _launches.append((_case[0], self, args, kwargs, tuple(g)))


class _H100:
    multi_processor_count = SMS
    name = "NVIDIA H100 (mirrored)"
    major, minor = 9, 0


def E(*shape, dtype=f32):
    return torch.empty(*shape, dtype=dtype, device=M)


def record_all() -> list[str]:
    """Call every launcher on meta tensors; returns the names of launchers that raised."""
    JITFunction.run = _record
    torch.cuda.get_device_properties = lambda *a, **k: _H100()
    from lacot_kernels.ops import _triton_utils, grpo, subtb
    from lacot_kernels.ops import fused_linear as fl
    from lacot_kernels.ops import rewards as rw
    from lacot_kernels.ops import token_logprobs as tlp

    assert not _triton_utils.INTERPRET, "TRITON_INTERPRET leaked in: the GPU configs would not be used"
    errors = []

    def case(name, fn):
        _case[0] = name
        try:
            fn()
        except Exception as e:  # a launcher failing on meta tensors is itself a finding
            print(f"LAUNCHER-ERROR {name}: {type(e).__name__}: {e}")
            errors.append(name)

    # fused LM-head forward through its launcher (config from _fwd_config)
    for n, dt, ent, bias in (
        (N, bf16, False, False),
        (N, bf16, True, False),
        (N, bf16, True, True),
        (1024, bf16, True, False),
        (N, f16, True, False),
        (N, f32, True, False),
    ):
        case(
            f"fused_fwd N={n} {dt} ent={ent} bias={bias}",
            lambda n=n, dt=dt, ent=ent, bias=bias: fl._fused_fwd_triton(
                E(n, D, dtype=dt), E(V, D, dtype=dt), E(V, dtype=dt) if bias else None, E(n, dtype=i64), 1.0, -100, ent
            ),
        )
    # fused backward through the tile engine (mirrored: all rows valid)
    fl._valid_rows = lambda targets, ignore_index: torch.arange(targets.numel(), device=targets.device)
    for dt, ent, prec in (
        (bf16, False, "default"),
        (bf16, True, "default"),
        (bf16, True, "high"),
        (f32, True, "default"),
    ):
        case(
            f"fused_bwd N={N} {dt} ent={ent} precision={prec}",
            lambda dt=dt, ent=ent, prec=prec: fl._fused_bwd_vocab_blocked(
                E(N),
                E(N) if ent else None,
                E(N, D, dtype=dt),
                E(V, D, dtype=dt),
                None,
                E(N, dtype=i64),
                E(N, 2),
                E(N) if ent else None,
                1.0,
                -100,
                [True, True, False],
                "triton",
                prec,
            ),
        )
    # fused GRPO tile kernel at the engine's chunk size (mirrored: the chunk's rows)
    from lacot_kernels.ops import _lm_head as lm

    for dt in (bf16, f32):
        per_elem = 4 if dt == f32 else 4 + 2
        rows = min(lm.rows_per_chunk(V, per_elem, torch.device("cuda")), N)
        case(
            f"fused_grpo_tile rows={rows} grad={dt}",
            lambda dt=dt, rows=rows: grpo._tile_triton(
                E(rows, V),
                E(rows, V) if dt == f32 else E(rows, V, dtype=dt),
                E(rows, dtype=i64),
                E(N, dtype=i64),
                E(N),
                E(N),
                E(4),
                E(N),
                E(4),
                N // 4,
                1.0,
                0.04,
                0.8,
                1.28,
                1.0,
            ),
        )
    # the other kernels, once each at a realistic shape
    case(
        "token_logprobs_fwd bf16 ent",
        lambda: tlp._token_logprobs_fwd_triton(E(N, V, dtype=bf16), E(N, dtype=i64), 1.0, -100, True),
    )
    case(
        "token_logprobs_bwd bf16 ent",
        lambda: tlp._token_logprobs_bwd_triton(
            E(N), E(N), E(N, V, dtype=bf16), E(N, dtype=i64), E(N, 2), E(N), 1.0, -100
        ),
    )
    B, T = 64, 2048
    case("grpo_parts ref", lambda: grpo._grpo_parts_triton(E(B, T), E(B, T), E(B), E(B, T), E(B, T), 0.04, 0.8, 1.28))
    case(
        "grpo_bwd ref",
        lambda: grpo._grpo_bwd_triton(E(()), E(B, T), E(B, T), E(B), E(B, T), E(B, T), E(B), 0.04, 0.8, 1.28),
    )
    case("group_adv_fwd 64x16", lambda: rw._group_adv_fwd_triton(E(1024), 16, "group", 1e-4, True))
    case("group_adv_bwd 64x16", lambda: rw._group_adv_bwd_triton(E(1024), E(1024), 16, "group", 1e-4, True))
    case("interp_fwd 64x2049", lambda: rw._interp_fwd_triton(E(64, 2049), E(64, 2049, dtype=torch.bool)))
    case("interp_bwd 64x2049", lambda: rw._interp_bwd_triton(E(64, 2049), E(64, 2049, dtype=torch.bool)))
    st = lambda: (E(64, 2048), E(64, 2049), E(64, 2049), E(64, dtype=i64))  # noqa: E731
    case("subtb_fwd 64x2048", lambda: subtb._subtb_fwd_triton(*st(), 0.95))
    case("subtb_bwd 64x2048", lambda: subtb._subtb_bwd_triton(E(64), *st(), 0.95))
    return errors


def _narrow_2d_offsets(ttir: str) -> list[str]:
    """tt.addptr lines on 2-D pointer tensors whose offsets are not i64."""
    bad = []
    for line in ttir.splitlines():
        m = re.search(r"tt\.addptr .*: tensor<\d+x\d+x!tt\.ptr<[^>]+>>, tensor<\d+x\d+x(i\d+)>", line)
        if m and m.group(1) != "i64":
            bad.append(line.strip())
    return bad


def compile_all() -> tuple[list[dict], list[str]]:
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    knobs.nvidia.dump_ptxas_log = True
    rows, failures, seen = [], [], set()
    for case, fn, args, kwargs, grid in _launches:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        key = (fn.__name__, str(signature), str(sorted(constexprs.items())), str(sorted(attrs.items())), options.hash())
        if len(grid) > 3 or grid[0] > 2**31 - 1 or any(g > 65535 for g in grid[1:]):
            failures.append(f"{fn.__name__} grid {grid} over CUDA limits [{case}]")
        if key in seen:
            continue
        seen.add(key)
        cx = {fn.arg_names[k[0]]: v for k, v in constexprs.items()}
        cfg = (
            " ".join(f"{k}={v}" for k, v in cx.items() if k.isupper())
            + f" w={options.num_warps} s={options.num_stages}"
        )
        buf, t0 = io.StringIO(), time.time()
        try:
            with contextlib.redirect_stdout(buf):
                k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            failures.append(f"{fn.__name__} ({cfg}) compile error: {first[:300]} [{case}]")
            continue
        log = buf.getvalue()
        regs = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", log)) else -1
        sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        spill_st = int(sp.group(1)) if sp else 0
        smem, warps = k.metadata.shared, k.metadata.num_warps
        ttgir = k.asm["ttgir"]
        tc = (
            "wgmma"
            if "warp_group_dot" in ttgir
            else "mma"
            if "#ttg.nvidia_mma" in ttgir
            else "FMA"
            if "tt.dot" in ttgir
            else "-"
        )
        regs_warp = -(-max(regs, 1) * 32 // 256) * 256
        occ = min(REGS_PER_SM // (regs_warp * warps), (228 * 1024) // (smem + 1024), 2048 // (32 * warps), 32)
        sixteen = any(s in case for s in ("bfloat16", "float16", "bf16", "f16")) and "grad=torch.float32" not in case
        bad = []
        if smem > SMEM_LIMIT:
            bad.append(f"shared memory {smem} B > {SMEM_LIMIT} B")
        if regs * 32 * warps > REGS_PER_SM:
            bad.append(f"{regs} registers x {32 * warps} threads > 64K")
        if spill_st > 0 and sixteen:
            bad.append(f"{spill_st} B of register spills in a 16-bit variant")
        narrow = _narrow_2d_offsets(k.asm["ttir"]) if fn.__name__ in LM_HEAD_KERNELS else []
        if narrow:
            bad.append(f"{len(narrow)} 2-D pointer offsets narrower than i64, e.g. {narrow[0][:160]}")
        row = dict(
            kernel=fn.__name__, case=case, config=cfg, smem=smem, regs=regs, spill_stores=spill_st,
            spill_loads=int(sp.group(2)) if sp else 0, tensor_cores=tc, ctas_per_sm=occ, grid=list(grid),
            compile_s=round(time.time() - t0, 1), ok=not bad,
        )  # fmt: skip
        rows.append(row)
        tag = "FAIL" if bad else ("WARN" if spill_st else "OK  ")
        print(
            f"{tag} {fn.__name__:<30} {cfg:<62} smem {smem:>6} regs {regs:>3} "
            f"spill {spill_st:>4}/{row['spill_loads']:<4} "
            f"{tc:<5} {occ:>2}/SM grid {str(tuple(grid)):<14} [{case}]" + (f"  <-- {'; '.join(bad)}" if bad else ""),
            flush=True,
        )
        failures += [f"{fn.__name__} ({cfg}): {b} [{case}]" for b in bad]
    return rows, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the per-kernel rows here")
    a = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="lacot_sm90_")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant really compiles (ptxas log available)
    knobs.cache.dir = cache
    t0 = time.time()
    try:
        errors = record_all()
        rows, failures = compile_all()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    failures += [f"launcher error: {e}" for e in errors]
    print(f"# sm_90: {len(rows)} kernel variants from {len(_launches)} launches in {time.time() - t0:.1f}s, triton "
          f"{triton.__version__}; {len(failures)} failure(s)")  # fmt: skip
    for f in failures:
        print("FAILURE:", f)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {"target": "sm_90", "triton": triton.__version__, "kernels": rows, "failures": failures}, fh, indent=1
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
