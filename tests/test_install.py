"""setup.py's build decision (plan_build) and the packaging metadata: a build either compiles the kernels it should
or stops with one line saying why and what to type; nothing installs without kernels unless asked to."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("lacot_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() is not called
    return mod


setup_py = _load_setup()


def _fake_torch(cuda: str | None, cuda_home: str | None, gpu: bool = False):
    return SimpleNamespace(
        __version__="2.99.0",
        version=SimpleNamespace(cuda=cuda),
        utils=SimpleNamespace(cpp_extension=SimpleNamespace(CUDA_HOME=cuda_home)),
        cuda=SimpleNamespace(is_available=lambda: gpu),
    )


def _plan(env, torch=None, compiler=True):
    def import_torch():
        if torch is None:
            raise ImportError("No module named 'torch'")
        return torch

    return setup_py.plan_build(env, import_torch=import_torch, compiler_usable=lambda env: compiler)


def test_torch_hidden_stops_with_one_line_naming_the_fix():
    with pytest.raises(setup_py.BuildStop) as info:
        _plan({})
    msg = str(info.value)
    assert "\n" not in msg
    assert "torch is not importable" in msg
    assert "pip install --no-build-isolation ." in msg
    assert "LACOT_SKIP_EXT=1" in msg


def test_no_compiler_stops_with_one_line():
    with pytest.raises(setup_py.BuildStop) as info:
        _plan({}, torch=_fake_torch(None, None), compiler=False)
    msg = str(info.value)
    assert "\n" not in msg and "no C++ compiler" in msg and "LACOT_SKIP_EXT=1" in msg


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_skip_ext_is_the_explicit_pure_python_install(value):
    # Neither torch nor a compiler is needed then.
    plan = _plan({"LACOT_SKIP_EXT": value}, torch=None, compiler=False)
    assert plan.kind == "none" and "LACOT_SKIP_EXT" in plan.reason


def test_cpu_torch_builds_the_cpu_extension():
    plan = _plan({}, torch=_fake_torch(None, "/usr/local/cuda"))
    assert plan.kind == "cpu" and plan.cuda_arch_list is None


def test_cuda_torch_without_nvcc_builds_the_cpu_extension():
    plan = _plan({}, torch=_fake_torch("13.0", None))
    assert plan.kind == "cpu" and "CUDA_HOME=None" in plan.reason


def test_cuda_build_defaults_to_sm90_without_a_visible_gpu():
    plan = _plan({}, torch=_fake_torch("13.0", "/usr/local/cuda", gpu=False))
    assert plan.kind == "cuda" and plan.cuda_arch_list == "9.0"
    plan = _plan({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, torch=_fake_torch("13.0", "/usr/local/cuda"))
    assert plan.cuda_arch_list == "8.0;9.0"
    # A visible GPU: the arch list is left to the GPUs that are there.
    plan = _plan({}, torch=_fake_torch("13.0", "/usr/local/cuda", gpu=True))
    assert plan.kind == "cuda" and plan.cuda_arch_list is None


def test_skip_and_force_cuda_build():
    assert _plan({"LACOT_SKIP_CUDA_BUILD": "1"}, torch=_fake_torch("13.0", "/usr/local/cuda")).kind == "cpu"
    assert _plan({"LACOT_FORCE_CUDA_BUILD": "1"}, torch=_fake_torch(None, None)).kind == "cuda"


def test_setup_py_exits_nonzero_with_the_line_when_torch_is_hidden(tmp_path):
    # What pip's isolated "Getting requirements to build wheel" step runs, with torch made unimportable.
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        f"runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "LACOT_SKIP_EXT"}
    env["CXX"] = sys.executable  # any existing program passes the compiler check, which comes first
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lacot_kernels: torch is not importable"), lines[0]


def test_every_package_directory_is_declared():
    # An undeclared directory of package data (trainer/configs) makes setuptools print a 40-line warning.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    dirs = {"lacot_kernels": ROOT / "lacot_kernels", "lacot_kernels.trainer": ROOT / "trainer"}
    found = set()
    for name, root in dirs.items():
        for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            if "__pycache__" in d.parts or not any(f.suffix in (".py", ".yaml") for f in d.iterdir() if f.is_file()):
                continue
            found.add(".".join([name, *d.relative_to(root).parts]))
    assert found <= declared, f"packages missing from pyproject.toml: {sorted(found - declared)}"


def test_requirements_split():
    # The demo venv gets no test tools, peers or linters; the dev set includes the demo's.
    demo = (ROOT / "requirements-demo.txt").read_text().lower()
    dev = (ROOT / "requirements-dev.txt").read_text().lower()
    names = lambda text: {
        l.split("=")[0].split(">")[0].split("<")[0].strip() for l in text.splitlines() if l and l[0].isalpha()
    }  # noqa: E501
    for peer in ("pytest", "ruff", "liger-kernel", "cut-cross-entropy", "trl", "verl"):
        assert peer not in names(demo)
    assert "-r requirements-demo.txt" in dev
    assert {"torch", "transformers", "matplotlib"} <= names(demo)


def test_temporary_files_of_the_run_go_to_one_removable_directory(tmp_path):
    # The root conftest points TMPDIR (inherited by subprocesses such as torchrun) and tempfile at one directory
    # per run, removed when the run ends; pytest's own tmp_path lives there too.
    import tempfile

    run_tmp = Path(tempfile.gettempdir())
    assert run_tmp.name.startswith("lacot-tests-") and os.environ["TMPDIR"] == str(run_tmp)
    assert run_tmp in tmp_path.parents
    probe = tempfile.mkdtemp()
    assert Path(probe).parent == run_tmp
