"""The README's Python examples run as written (a stale example is a bug)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# Blocks that only show how to wrap a user's own trainer object are not standalone programs.
RUNNABLE = [b for b in BLOCKS if "trainer.train()" not in b]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 4


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index):
    r = subprocess.run([sys.executable, "-c", RUNNABLE[index]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
