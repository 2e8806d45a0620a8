"""Benchmarks: `pytest benchmarks --bench-size smoke|full` (the option is defined by the root conftest.py).

Each test is one (case, provider); at the end of the run one table per case is printed (time, peak extra
memory, ratios to the best peer, error against fp64; MISSING rows with their reasons) and the numbers are
written to a results file (see `_harness.write_results`). Shapes that need a GPU carry the `gpu` marker.
"""

from __future__ import annotations

import pytest

from . import _harness


@pytest.fixture
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _harness.ROWS:
        return
    terminalreporter.write_sep("=", "lacot_kernels benchmarks")
    for line in _harness.render():
        terminalreporter.write_line(line)
    size = config.getoption("--bench-size")
    try:
        paths = _harness.write_results(size, config.getoption("benchmark_json", None))
    except OSError as exc:
        terminalreporter.write_line(f"results file not written: {exc}")
        return
    for p in paths:
        terminalreporter.write_line(f"results written to {p}")
