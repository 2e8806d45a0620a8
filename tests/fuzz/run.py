"""`make fuzz`: many random cases per op, backend and dtype against the fp64 references; prints the table.

    python tests/fuzz/run.py [--cases 10000] [--ops a,b] [--backends torch,cuda] [--seed 0] [--time-limit S]

`--cases` is the number of cases per (op, backend), split evenly over the op's dtypes. Each case is drawn from
`random.Random(f"{seed}/{op}/{backend}/{dtype}/{i}")`, so a mismatch is reproduced by its (seed, op, backend,
dtype, i), printed with it. Exit status 1 if any case mismatched or raised. The tolerances and their
derivation: tests/fuzz/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors when there is no GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.fuzz import cases  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases per (op, backend), split over dtypes")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--backends", default="", help="comma-separated backends (default: all of each op)")
    ap.add_argument("--seed", default="0")
    ap.add_argument(
        "--time-limit", type=float, default=0.0, help="time budget per (op, backend) in s, split over dtypes"
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # the Triton interpreter warns on masked-out lanes holding inf / NaN

    import lacot_kernels as lk

    ops = args.ops.split(",") if args.ops else list(cases.OPS)
    want_b = set(args.backends.split(",")) if args.backends else None
    avail = {"cuda": lk.native_available("cpu"), "triton": lk.triton_available("cpu"), "torch": True}
    rows, failures = [], []
    t_all = time.time()
    cols = ("cases", "mismatch", "errors", "worst err/tol", "s")
    header = f"{'op':29s} {'backend':7s} {'dtype':9s} " + " ".join(
        f"{c:>{w}s}" for c, w in zip(cols, (7, 8, 6, 13, 7), strict=True)
    )
    print(header)
    print("-" * len(header))
    for name in ops:
        op = cases.OPS[name]
        for backend in op.backends:
            if want_b is not None and backend not in want_b:
                continue
            if not avail[backend]:
                print(f"{name:29s} {backend:7s} {'-':9s} backend not available here: NOT RUN")
                continue
            per = math.ceil(args.cases / len(op.dtypes))
            for dtype in op.dtypes:
                t0 = time.time()
                dname = str(dtype).replace("torch.", "")
                n = bad = errs = 0
                worst = 0.0
                t1 = time.time()
                for i in range(per):
                    if args.time_limit and time.time() - t0 > args.time_limit / len(op.dtypes):
                        break
                    key = f"{args.seed}/{name}/{backend}/{dtype}/{i}"
                    try:
                        v, _ = cases.run_case(name, random.Random(key), dtype, backend)
                    except Exception as exc:  # a crash is a failure too
                        errs += 1
                        failures.append(f"{key}: {type(exc).__name__}: {exc}"[:400])
                        print("FAIL", failures[-1], flush=True)
                        n += 1
                        continue
                    n += 1
                    if not v.ratio <= 1.0:
                        bad += 1
                        failures.append(f"{key}: {v.detail}")
                        print("FAIL", failures[-1], flush=True)
                    if not v.ratio <= worst:
                        worst = v.ratio
                rows.append((name, backend, dname, n, bad, errs, worst))
                took = time.time() - t1
                print(
                    f"{name:29s} {backend:7s} {dname:9s} {n:7d} {bad:8d} {errs:6d} {worst:13.3g} {took:7.1f}",
                    flush=True,
                )
    total = sum(r[3] for r in rows)
    nbad = sum(r[4] + r[5] for r in rows)
    print("-" * len(header))
    print(f"{total} cases in {time.time() - t_all:.0f} s, {nbad} mismatches or errors (torch {torch.__version__})")
    for f in failures[:50]:
        print("FAILED", f)
    return 1 if nbad else 0


if __name__ == "__main__":
    sys.exit(main())
