"""Measurement kit of the benchmarks: timers, peak-memory probes, the results collector, tables and files.

Every benchmark module describes its cases (one table each: op, mode, shape, dtype, ignored fraction) and
providers, and hands each (case, provider) to :func:`bench`, which

* times the call: on a GPU with ``triton.testing.do_bench`` (median, after warm-up); on the CPU with
  ``time.perf_counter`` around each round of ``benchmark.pedantic`` (median), so that pytest-benchmark's
  ``--benchmark-json`` holds the same rounds;
* measures the peak extra memory of one call: GPU, the allocator's high-water mark above what was allocated
  before the call; CPU, the process's peak resident set (``VmHWM``, reset by writing 5 to
  ``/proc/self/clear_refs``) above its resident set before the call, with glibc's free lists trimmed first
  so that memory it still holds from earlier calls does not hide new allocations;
* compares the provider's outputs with the fp64 reference (a ``check`` function given by the module);
* records a :class:`Row` (or a MISSING row with its reason) for the tables and the results file.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
REPO = Path(__file__).resolve().parents[1]
MIB = float(1 << 20)
# A CPU call slower than this is reported as too slow and not repeated.
MAX_CALL_S = float(os.environ.get("LACOT_BENCH_MAX_CALL_S", "60"))
# Rounds at full size on the CPU are cut so that one measurement stays within about this many seconds.
ROUND_BUDGET_S = 20.0
# At full size on the CPU, a provider whose calls took longer than this (in an earlier mode) gets no warm-up.
WARMUP_UNDER_S = 5.0
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


# ----------------------------------------------------------------------------------------------------------------
# Cases and result rows
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One table: every provider of a case runs on the same inputs."""

    op: str
    mode: str  # "fwd" | "fwd_nograd" | "fwd_bwd" (the results file's names)
    entropy: bool  # the entropy is computed too (and is an output of the call)
    shape: tuple[tuple[str, int], ...]
    dtype: str  # "fp32" | "bf16" | "fp16"
    ignored_frac: float
    size: str  # "smoke" | "full"

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mode_label(self) -> str:
        return self.mode + ("+entropy" if self.entropy else "")

    @property
    def shape_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape)

    def param_id(self) -> str:
        dims = "x".join(str(v) for _, v in self.shape)
        ign = f"-ign{int(round(self.ignored_frac * 100))}" if self.ignored_frac else ""
        return f"{self.mode_label}-{dims}-{self.dtype}{ign}"

    def title(self) -> str:
        return (
            f"{self.op}  {self.mode_label}  {self.shape_label}  {self.dtype}  "
            f"ignored={self.ignored_frac:.0%}  [{self.size}, {device_name()}]"
        )


@dataclass
class Row:
    case: Case
    provider: str
    ms: float | None = None
    peak_extra_mib: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    err_logp: float | None = None
    err_entropy: float | None = None
    err_grad: float | None = None
    rounds: int = 0
    first_call_s: float | None = None
    missing: str | None = None
    note: str = ""

    @property
    def is_ours(self) -> bool:
        return self.provider.startswith("lacot")


ROWS: list[Row] = []
# Extra summary lines per op (targets of the issue), registered by the benchmark modules.
SUMMARIES: dict[str, Callable[[list[Row]], list[str]]] = {}


def register_summary(op: str, fn: Callable[[list[Row]], list[str]]) -> None:
    SUMMARIES[op] = fn


# ----------------------------------------------------------------------------------------------------------------
# Memory probes
# ----------------------------------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} is not in /proc/self/status")


class _CpuPeak:
    """Peak resident set of this process above its resident set at `begin` (Linux only)."""

    def __init__(self) -> None:
        self.reason = self._probe()
        self._base = 0

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def _probe(self) -> str | None:
        try:
            big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched, then freed
            del big
            _malloc_trim()
            self._reset()
            rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
        except OSError as exc:
            return f"n/a (no /proc peak-RSS reset here: {exc})"
        if hwm > rss + 32 * 1024:
            return "n/a (VmHWM is not reset by /proc/self/clear_refs on this kernel)"
        return None

    def begin(self) -> None:
        gc.collect()
        _malloc_trim()
        if self.reason is None:
            self._reset()
            self._base = _status_kib("VmRSS")

    def end(self) -> float | None:
        if self.reason is not None:
            return None
        return max(0, _status_kib("VmHWM") - self._base) * 1024 / MIB


class _CudaPeak:
    """Peak bytes allocated by the caching allocator above what was allocated at `begin`."""

    reason = None

    def __init__(self) -> None:
        self._base = 0

    def begin(self) -> None:
        torch.cuda.synchronize()
        gc.collect()
        self._base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def end(self) -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self._base) / MIB


PEAK = _CudaPeak() if ON_GPU else _CpuPeak()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
class TooSlow(Exception):
    def __init__(self, seconds: float, what: str) -> None:
        super().__init__(f"{what} took {seconds:.1f} s")
        self.seconds = seconds
        self.what = what


@dataclass
class Measured:
    ms: float
    peak_extra_mib: float | None
    errors: dict[str, float | None]
    rounds: int
    first_call_s: float | None


def _measure_cpu(benchmark, run, prepare, check, *, warmup: bool, rounds: int) -> Measured:
    errors: dict[str, float | None] | None = None
    first_s = None
    if warmup:
        arg = prepare()
        t0 = time.perf_counter()
        out = run(arg)
        first_s = time.perf_counter() - t0
        del arg
        if first_s > MAX_CALL_S:
            raise TooSlow(first_s, "the first call")
        errors = check(out)
        del out
        rounds = max(1, min(rounds, int(ROUND_BUDGET_S // max(first_s, 1e-9))))

    samples: list[tuple[float, float | None]] = []
    state: dict[str, Any] = {}

    def setup():
        state["arg"] = prepare()
        PEAK.begin()

    def target():
        arg = state.pop("arg")
        t0 = time.perf_counter()
        state["out"] = run(arg)
        state["dt"] = time.perf_counter() - t0

    def teardown():
        nonlocal errors
        peak = PEAK.end()
        samples.append((state.pop("dt"), peak))
        if errors is None:
            errors = check(state["out"])
        state.pop("out", None)

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, iterations=1, warmup_rounds=0)
    if "dt" in state:  # with --benchmark-disable pedantic calls the target once and skips the teardown
        teardown()
    times = [t for t, _ in samples]
    if first_s is None and times[0] > MAX_CALL_S:
        raise TooSlow(times[0], "one call")
    peaks = [p for _, p in samples if p is not None]
    return Measured(
        ms=statistics.median(times) * 1e3,
        peak_extra_mib=max(peaks) if peaks else None,
        errors=errors or {},
        rounds=len(samples),
        first_call_s=first_s,
    )


def _measure_gpu(benchmark, run, prepare, check) -> Measured:
    from triton.testing import do_bench

    arg = prepare()
    t0 = time.perf_counter()
    run(arg)
    sync()
    first_s = time.perf_counter() - t0
    del arg
    arg = prepare()
    PEAK.begin()
    out = run(arg)
    peak = PEAK.end()
    errors = check(out)
    del out
    ms = do_bench(lambda: run(arg), return_mode="median")

    def target():
        run(arg)
        torch.cuda.synchronize()

    benchmark.pedantic(target, rounds=3, iterations=1, warmup_rounds=1)
    return Measured(ms=float(ms), peak_extra_mib=peak, errors=errors, rounds=3, first_call_s=first_s)


_JIT_SEEN: set[tuple] = set()
_SECONDS: dict[tuple, float] = {}


def bench(
    benchmark,
    case: Case,
    provider: str,
    *,
    missing: str | None,
    run: Callable[[Any], Any],
    prepare: Callable[[], Any],
    check: Callable[[Any], dict[str, float | None]],
    jit: bool = False,
    full_rounds: int = 3,
    warmup_always: bool = True,
    flops: float | None = None,
    bytes_moved: float | None = None,
    note: str = "",
) -> Row:
    """Measure one provider on one case and record its row; MISSING providers are recorded, then skipped.

    `prepare()` builds the call's argument outside the timed and measured region (e.g. a copy of an input
    that the provider overwrites); `run(arg)` is the call; `check(out)` -> {"logp"|"entropy"|"grad": err}.
    `jit`: the first call compiles (torch.compile): it is never timed.
    """
    row = Row(case, provider, note=note)
    benchmark.group = case.title()
    benchmark.extra_info.update(
        op=case.op,
        mode=case.mode,
        entropy=case.entropy,
        provider=provider,
        shape=case.dims,
        dtype=case.dtype,
        ignored_frac=case.ignored_frac,
    )
    if missing is not None:
        row.missing = missing
        ROWS.append(row)
        benchmark.extra_info["missing"] = missing
        pytest.skip(f"{provider} MISSING: {missing}")

    key = (provider, case.op, case.mode, case.entropy, case.shape, case.dtype)
    hkey = (provider, case.op, case.shape, case.dtype)
    needs_compile = jit and key not in _JIT_SEEN
    est = _SECONDS.get(hkey)  # the slowest call of this provider at this shape so far (earlier modes)
    if case.size == "smoke":
        warmup, rounds = needs_compile, 1
    elif est is None or needs_compile:
        # Without a warm-up nothing tells how long a call takes before the first one: one round then.
        warmup = needs_compile or warmup_always
        rounds = full_rounds if warmup else 1
    else:
        warmup = warmup_always and est < WARMUP_UNDER_S
        rounds = max(1, min(full_rounds, int(ROUND_BUDGET_S // max(est, 1e-9))))
    rounds = int(os.environ.get("LACOT_BENCH_ROUNDS", rounds))
    if not ON_GPU and est is not None and est > MAX_CALL_S:
        row.missing = f"too slow on CPU: {est:.1f} s per call in an earlier mode"
        ROWS.append(row)
        benchmark.extra_info["missing"] = row.missing
        pytest.skip(f"{provider} MISSING: {row.missing}")
    try:
        if ON_GPU:
            m = _measure_gpu(benchmark, run, prepare, check)
        else:
            m = _measure_cpu(benchmark, run, prepare, check, warmup=warmup, rounds=rounds)
    except TooSlow as exc:
        _SECONDS[hkey] = max(exc.seconds, est or 0.0)
        row.missing = f"too slow on {DEVICE.type.upper()}: {exc.seconds:.1f} s ({exc.what})"
        ROWS.append(row)
        benchmark.extra_info["missing"] = row.missing
        pytest.skip(f"{provider} MISSING: {row.missing}")
    except Exception as exc:
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        row.missing = ("ERROR: " if row.is_ours else "failed: ") + msg
        ROWS.append(row)
        if row.is_ours:
            raise
        pytest.skip(f"{provider} MISSING: {row.missing}")
    if jit:
        _JIT_SEEN.add(key)
    _SECONDS[hkey] = max(m.ms * 1e-3, est or 0.0)

    row.ms, row.peak_extra_mib, row.rounds = m.ms, m.peak_extra_mib, m.rounds
    row.first_call_s = m.first_call_s
    row.err_logp = m.errors.get("logp")
    row.err_entropy = m.errors.get("entropy")
    row.err_grad = m.errors.get("grad")
    if jit and m.first_call_s is not None:
        row.note = ", ".join(filter(None, [row.note, f"first call (compile) {m.first_call_s:.1f} s"]))
    if PEAK.reason is not None:
        row.note = ", ".join(filter(None, [row.note, f"peak memory {PEAK.reason}"]))
    secs = m.ms * 1e-3
    if flops:
        row.tflops = flops / secs / 1e12
    if bytes_moved:
        row.gbps = bytes_moved / secs / 1e9
    ROWS.append(row)
    benchmark.extra_info.update(
        ms=row.ms,
        peak_extra_mib=row.peak_extra_mib,
        tflops=row.tflops,
        gbps=row.gbps,
        max_abs_err_vs_fp64=row.err_logp,
        max_abs_err_entropy_vs_fp64=row.err_entropy,
        max_abs_err_grad_vs_fp64=row.err_grad,
        rounds=row.rounds,
        timer="do_bench" if ON_GPU else "perf_counter",
    )
    return row


def cached_inputs(store: dict, key: Any, build: Callable[[], dict]) -> dict:
    """Keep one set of inputs at a time in `store` (the full shapes do not fit twice): rebuilt on a new key."""
    if store.get("key") != key:
        store.clear()
        gc.collect()
        store.update(build(), key=key)
    return store


def installed(module: str) -> bool:
    """True when a peer package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def lacot_missing(provider: str, case: Case, native_op: str = "token_logprobs_fwd_native") -> str | None:
    """Why one of our own providers (`lacot-cuda`, `lacot-triton`) cannot be timed here, or None."""
    import lacot_kernels as lk

    dev = DEVICE.type
    if provider == "lacot-cuda" and not lk.native_available(dev, native_op):
        return f"lacot_kernels._C has no {dev} kernels (extension not built: `make build`)"
    if provider == "lacot-triton":
        if not lk.triton_available(dev):
            return f"Triton cannot run {dev} tensors here (no GPU, TRITON_INTERPRET unset)"
        if dev == "cpu" and case.size == "full":
            return "interpreter only (no GPU): the Triton interpreter is not a performance provider"
    return None


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref.double()).abs().max()) if x.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------
def _fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_mib(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}"


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def best_peer(rows: list[Row], attr: str) -> Row | None:
    peers = [r for r in rows if not r.is_ours and r.missing is None and getattr(r, attr) is not None]
    return min(peers, key=lambda r: getattr(r, attr)) if peers else None


def groups(rows: list[Row]) -> dict[Case, list[Row]]:
    out: dict[Case, list[Row]] = {}
    for r in rows:
        out.setdefault(r.case, []).append(r)
    return out


def render_table(case: Case, rows: list[Row]) -> list[str]:
    bt, bm = best_peer(rows, "ms"), best_peer(rows, "peak_extra_mib")
    ran = [r for r in rows if r.missing is None]
    cols: list[tuple[str, Callable[[Row], str]]] = [
        ("provider", lambda r: r.provider),
        ("ms", lambda r: _fmt_ms(r.ms)),
        ("runs", lambda r: "do_bench" if ON_GPU else str(r.rounds)),
        ("peak extra MiB", lambda r: _fmt_mib(r.peak_extra_mib)),
        ("time/best peer", lambda r: _fmt_ratio(r.ms / bt.ms if bt else None)),
        (
            "mem/best peer",
            lambda r: _fmt_ratio(
                r.peak_extra_mib / bm.peak_extra_mib
                if bm and r.peak_extra_mib is not None and bm.peak_extra_mib > 0
                else None
            ),
        ),
    ]
    if any(r.gbps is not None for r in ran):
        cols.append(("GB/s", lambda r: "-" if r.gbps is None else f"{r.gbps:.1f}"))
    if any(r.tflops is not None for r in ran):
        cols.append(("TFLOP/s", lambda r: "-" if r.tflops is None else f"{r.tflops:.2f}"))
    cols.append(("max|err| logp", lambda r: _fmt_err(r.err_logp)))
    if any(r.err_entropy is not None for r in ran):
        cols.append(("max|err| H", lambda r: _fmt_err(r.err_entropy)))
    if any(r.err_grad is not None for r in ran):
        cols.append(("max|err| grad", lambda r: _fmt_err(r.err_grad)))
    cols.append(("note", lambda r: r.note))

    cells = [[f(r) for _, f in cols] for r in ran]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(cols)]
    lines = ["", case.title()]
    lines.append("  ".join(h.ljust(w) for (h, _), w in zip(cols, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
    for r in rows:
        if r.missing is not None:
            prefix = "" if r.missing.startswith("ERROR") else "MISSING: "
            lines.append(f"{r.provider.ljust(widths[0])}  {prefix}{r.missing}")
    if bt or bm:
        parts = []
        if bt:
            parts.append(f"time {bt.provider} ({_fmt_ms(bt.ms)} ms)")
        if bm:
            parts.append(f"memory {bm.provider} ({_fmt_mib(bm.peak_extra_mib)} MiB)")
        lines.append("best peer: " + ", ".join(parts) + "  (peer = any non-lacot provider)")
    else:
        lines.append("best peer: none ran")
    return lines


def render(rows: list[Row] | None = None) -> list[str]:
    rows = ROWS if rows is None else rows
    lines: list[str] = []
    for case, rs in groups(rows).items():
        lines += render_table(case, rs)
    for op, fn in SUMMARIES.items():
        op_rows = [r for r in rows if r.case.op == op and r.case.size != "smoke"]
        if op_rows:
            extra = fn(op_rows)
            if extra:
                lines += ["", f"{op}: issue targets (reported, not asserted)"] + ["  " + x for x in extra]
    if rows and rows[0].case.size == "smoke":
        lines += ["", "smoke size: every provider ran once on tiny shapes; the timings mean nothing."]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------------------------------------------
def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def results_document(rows: list[Row]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results = []
    for r in rows:
        c = r.case
        item = {
            "op": c.op,
            "mode": c.mode,
            "entropy": c.entropy,
            "provider": r.provider,
            "shape": c.dims,
            "dtype": c.dtype,
            "ignored_frac": c.ignored_frac,
            "ms": r.ms,
            "peak_extra_mib": r.peak_extra_mib,
            "tflops": r.tflops,
            "max_abs_err_vs_fp64": r.err_logp,
        }
        if r.gbps is not None:
            item["gbps"] = r.gbps
        if r.err_entropy is not None:
            item["max_abs_err_entropy_vs_fp64"] = r.err_entropy
        if r.err_grad is not None:
            item["max_abs_err_grad_vs_fp64"] = r.err_grad
        if r.missing is not None:
            item["missing"] = r.missing
        if r.note:
            item["note"] = r.note
        results.append(item)
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.date.today().isoformat(),
        "size": rows[0].case.size if rows else None,
        "timer": "triton.testing.do_bench median" if ON_GPU else "time.perf_counter median",
        "results": results,
    }


def _result_key(item: dict) -> tuple:
    return tuple(
        json.dumps(item.get(k), sort_keys=True)
        for k in ("op", "mode", "entropy", "provider", "shape", "dtype", "ignored_frac")
    )


def _merge_earlier(doc: dict, path: Path) -> None:
    """Keep the results of earlier runs of the same day (e.g. one benchmark file at a time) that this run did
    not redo; each kept entry names the commit it was measured at."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if old.get("device") != doc["device"]:
        return
    redone = {_result_key(r) for r in doc["results"]}
    kept = []
    for item in old.get("results", []):
        if _result_key(item) not in redone:
            item.setdefault("commit", old.get("commit"))
            kept.append(item)
    doc["results"] = kept + doc["results"]


def write_results(size: str, benchmark_json: str | os.PathLike | None = None) -> list[Path]:
    """GPU at full size: benchmarks/results/<gpu>-<yyyymmdd>.json (+ the raw pytest-benchmark file beside it,
    same stem); otherwise .benchmarks/<device>[-smoke]-<yyyymmdd>.json (git-ignored, for inspection)."""
    if not ROWS:
        return []
    day = datetime.date.today().strftime("%Y%m%d")
    stem = slug(torch.cuda.get_device_name(DEVICE)) if ON_GPU else "cpu"
    if size == "smoke":
        stem += "-smoke"
    folder = REPO / ("benchmarks/results" if ON_GPU and size == "full" else ".benchmarks")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{day}.json"
    doc = results_document(ROWS)
    _merge_earlier(doc, path)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    written = [path]
    if ON_GPU and size == "full" and benchmark_json and Path(benchmark_json).is_file():
        raw = folder / f"{stem}-{day}.pytest-benchmark.json"
        raw.write_bytes(Path(benchmark_json).read_bytes())
        written.append(raw)
    return written
