# Every target sets itself up: a .venv is created (and the extension built) when absent or stale.
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.deps-installed
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py

.PHONY: venv build test test-gpu fuzz demo demo-kernels bench lint fmt clean

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

# Fuzzing (tests/fuzz): FUZZ_CASES random cases per op and backend against the fp64 references, split over the
# dtypes; prints the table (cases, mismatches, worst error / tolerance). `make test` runs a small fixed budget.
FUZZ_CASES ?= 10000
FUZZ_SEED  ?= 0
fuzz: build
	$(PY) tests/fuzz/run.py --cases $(FUZZ_CASES) --seed $(FUZZ_SEED)

test-gpu: build
	$(PY) -m pytest -q -m gpu tests benchmarks --benchmark-disable

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
