# Every target sets itself up: a .venv is created (and the extension built) when absent or stale.
# `make demo` installs only what the demo needs (requirements-demo.txt) and compiles only what this machine can
# run (the CUDA kernels only when a GPU is visible); `make test` / `make build` add the test tools and peers
# (requirements-dev.txt) and compile every csrc/ kernel, CUDA included, as CI does.
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
DEMO_STAMP := .venv/.deps-demo
STAMP   := .venv/.deps-installed
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py

.PHONY: venv venv-demo build build-demo test test-gpu gpu-check fuzz demo demo-kernels bench lint fmt clean

$(DEMO_STAMP): requirements-demo.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	@echo "installing the demo's requirements (torch, transformers, ...: requirements-demo.txt)"
	$(PIP) install -q -r requirements-demo.txt
	touch $@

$(STAMP): $(DEMO_STAMP) requirements-dev.txt requirements-dev-nodeps.txt
	@echo "installing the test tools, peers and linters (requirements-dev.txt)"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-dev-nodeps.txt
	touch $@

venv-demo: $(DEMO_STAMP)
venv: $(STAMP)

# Compiles csrc/ into lacot_kernels/_C*.so (CUDA kernels + CPU twins) against the venv's torch.
.venv/.ext-built: $(STAMP) $(SOURCES)
	@echo "compiling lacot_kernels._C: CUDA kernels for TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) + CPU twins (a few minutes)"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: .venv/.ext-built

# The demo's build: reuses an up-to-date full build; otherwise compiles the CUDA kernels only when torch sees a
# GPU (a CUDA compile for a machine that cannot run it is minutes of nothing), else the CPU twins alone.
.venv/.ext-demo: $(DEMO_STAMP) $(SOURCES)
	@if [ -f .venv/.ext-built ] && [ -z "$$(find $(SOURCES) -newer .venv/.ext-built)" ]; then \
		echo "lacot_kernels._C is already built (make build)"; \
	elif [ "$$($(PY) -c 'import torch; print(int(torch.cuda.is_available()))')" = 1 ]; then \
		echo "compiling lacot_kernels._C: CUDA kernels for the visible GPU + CPU twins (a few minutes)"; \
		TORCH_CUDA_ARCH_LIST= $(PIP) install -q --no-build-isolation --no-deps -e . ; \
	else \
		echo "compiling lacot_kernels._C: CPU kernels only, no GPU visible (make build compiles the CUDA ones too)"; \
		LACOT_SKIP_CUDA_BUILD=1 $(PIP) install -q --no-build-isolation --no-deps -e . ; \
	fi
	touch $@

build-demo: .venv/.ext-demo

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

# The first minutes on an H100/H200 with nothing prepared (< 8 min): build, GPU tests, compute-sanitizer memcheck +
# racecheck, benchmarks against the peers at the headline shapes -> benchmarks/results/<gpu>-<date>*.json.
# `python3 -m benchmarks.gpu_check --dry-run` runs the same logic on a CPU at tiny sizes.
gpu-check:
	python3 -m benchmarks.gpu_check --python $(PY)

# The main job: the embedded trainer demo (tiny Qwen2-VL built in code: SFT -> GRPO / LaCoT -> BiN table).
demo: .venv/.ext-demo
	$(PY) -m lacot_kernels.trainer demo

# The kernels alone on a tiny built-in model: speed and memory against torch.
demo-kernels: .venv/.ext-demo
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
	rm -rf build *.egg-info lacot_kernels/_C*.so lacot_kernels/_build_info.json .venv/.ext-built .venv/.ext-demo .pytest_cache
