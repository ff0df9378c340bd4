# The two quickstart commands (README): `make bench` and `make test`. Both set up a virtualenv in
# $(VENV), install what is missing, build mmkern._C, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILT := $(VENV)/.mmkern-built
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f)
BENCH_ARGS ?=

.PHONY: setup lint test test-cpu test-interpreter fuzz bench bench-models kernel-audit sanitize wheel test-wheel clean

setup: $(BUILT)

# --system-site-packages: a machine that already has torch (GPU machines, often offline) uses it.
$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(BUILT): $(PY) $(BUILD_INPUTS) scripts/ensure_requirements.py
	$(PY) scripts/ensure_requirements.py
	$(PY) -m pip install --quiet --no-build-isolation -e .
	$(PY) -c "import mmkern; print('mmkern', mmkern.__version__, mmkern.build_info())"
	touch $@

test: test-cpu test-interpreter

# ruff's checks and formatter (configured in pyproject.toml; .pre-commit-config.yaml runs the same
# pinned ruff before each commit). CI runs it.
lint: $(BUILT)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The C++ CPU kernels, autograd, compile tracing, modules and harness (and CUDA tests where a GPU is).
test-cpu: $(BUILT)
	$(PY) -m pytest -q tests

# The Triton kernels' logic on CPU tensors, in Triton's interpreter; larger shapes are left out.
test-interpreter: $(BUILT)
	MMKERN_TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests

# The property tests' long run: 1000 draws per op on the C++ kernels, then through the interpreter
# (hours there). A failing draw is kept in .hypothesis/ and replayed first next time.
fuzz: $(BUILT)
	MMKERN_HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_properties.py --hypothesis-show-statistics
	MMKERN_HYPOTHESIS_PROFILE=long MMKERN_TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_properties.py

# mmkern bench's quick preset (a few minutes on a 2-core CPU): a folder per run under $(BENCH_OUT).
# A GPU run to keep: make bench BENCH_OUT=benchmarks/results, then mmkern bench --update-readme.
BENCH_OUT ?= mmkern-bench

bench: $(BUILT)
	$(PY) -m mmkern.bench --out $(BENCH_OUT) $(BENCH_ARGS)

# Training steps of the complete models (minutes even on CPU).
bench-models: $(BUILT)
	$(PY) -m mmkern.bench --preset models --out $(BENCH_OUT) $(BENCH_ARGS)

# Every production Triton launch of the benchmark's cases compiled for sm_90 and sm_80 without a GPU:
# registers, spills, shared memory, CTAs per SM, waves, MMA path and TMA, under benchmarks/audit/.
kernel-audit: $(BUILT)
	$(PY) -m mmkern.bench.audit --out benchmarks/audit

# compute-sanitizer's memcheck, racecheck and initcheck over every GPU kernel (needs a GPU); the run's
# logs and summary.md go to $(SANITIZE_OUT), by default benchmarks/sanitizer/<time>-<GPU>/.
SANITIZE_OUT ?=

sanitize: $(BUILT)
	PYTHON=$(PY) scripts/sanitize.sh $(SANITIZE_OUT)

# A wheel for this machine's torch and CUDA toolkit, in dist/ (knobs: MMKERN_CUDA_ARCH_LIST, MAX_JOBS, ...).
wheel: $(BUILT)
	PYTHON=$(PY) scripts/build_wheel.sh dist

# CI's check of the distributions: the wheel in a fresh virtualenv (import check, env, CPU tests), the sdist.
test-wheel: $(BUILT)
	PYTHON=$(PYTHON) BUILD_PYTHON=$(PY) scripts/test_wheel.sh

clean:
	rm -rf build dist *.egg-info mmkern/_C*.so mmkern/_build_config.py $(BUILT)
