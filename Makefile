# Every target sets itself up: a .venv is created (and the extension built) when absent or stale.
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.deps-installed
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py

.PHONY: venv build test test-gpu gpu-check demo demo-kernels bench lint fmt clean

$(STAMP): requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(STAMP)

# Compiles csrc/ into lacot_kernels/_C*.so (CUDA kernels + CPU twins) against the venv's torch.
.venv/.ext-built: $(STAMP) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: .venv/.ext-built

# The full suite (CPU: Triton through the interpreter) + every benchmark once at smoke size.
test: build
	$(PY) -m pytest -q tests benchmarks --benchmark-disable --bench-size=smoke

test-gpu: build
	$(PY) -m pytest -q -m gpu tests benchmarks --benchmark-disable

# The first minutes on an H100/H200 with nothing prepared (< 8 min): build, GPU tests, compute-sanitizer memcheck +
# racecheck, benchmarks against the peers at the headline shapes -> benchmarks/results/<gpu>-<date>*.json.
# `python3 -m benchmarks.gpu_check --dry-run` runs the same logic on a CPU at tiny sizes.
gpu-check:
	python3 -m benchmarks.gpu_check --python $(PY)

# The main job: the embedded trainer demo (tiny Qwen2-VL built in code: SFT -> GRPO / LaCoT -> BiN table).
demo: build
	$(PY) -m lacot_kernels.trainer demo

# The kernels alone on a tiny built-in model: speed and memory against torch.
demo-kernels: build
	$(PY) -m lacot_kernels.demo

# The side-by-side benchmark tables at the issue's CPU shapes (GPU shapes when a GPU is visible).
bench: build
	$(PY) -m pytest -q benchmarks --bench-size=full --benchmark-json=.benchmarks/last.json -s

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf build *.egg-info lacot_kernels/_C*.so .venv/.ext-built .pytest_cache
