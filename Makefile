# Every target sets up .venv itself on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
OUT     ?= runs/speedrun

.PHONY: run test test-slow test-gpu bench bench-gpu gpu-check browser toolchain clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[serve,dev]"
	touch $(STAMP)

# The end-to-end main job on the built-in default data.
run: $(STAMP)
	$(BIN)/nanoseek speedrun --out $(OUT)

# What some tests need beyond Python packages: headless Chromium (tests/test_web.py; Debian's package,
# or NANOSEEK_CHROMIUM=/path/to/chromium) and a C++ compiler (the decode kernels, tests/test_kernels.py).
# Installed with apt-get when missing. Without them those tests skip, unless NANOSEEK_STRICT=1 (.ci/run):
# then a missing one stops here with an error, and the tests would fail anyway.
STRICT_MISSING = if [ "$${NANOSEEK_STRICT:-0}" != 0 ]; then echo "make $@: $$what is missing and could not be installed (NANOSEEK_STRICT=1 needs it)" >&2; exit 1; fi; echo "make $@: $$what is missing: $$why will be skipped"

browser:
	@chromium="$${NANOSEEK_CHROMIUM:-/usr/bin/chromium}"; test -x "$$chromium" && exit 0; \
	command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	test -x "$$chromium" && exit 0; what="Chromium ($$chromium)"; why="the web-chat test"; $(STRICT_MISSING)

toolchain:
	@command -v c++ >/dev/null && exit 0; \
	command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; \
	command -v c++ >/dev/null && exit 0; what="a C++ compiler (c++)"; why="the C++ decode kernel tests"; $(STRICT_MISSING)

# The suite in parallel processes, one per core (at most 4), each test file whole in one process (its
# module fixtures are built once); `pytest -q` alone runs it serially.
TEST_JOBS ?= -n auto --maxprocesses 4 --dist loadfile
test: $(STAMP) browser toolchain
	$(BIN)/python -m pytest -q $(TEST_JOBS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The benchmarks' references (TRL for bench_grpo_trl) on top of the dev install; torch stays the pinned build.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e ".[serve,dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run_all

# GPU targets install nothing: a GPU image brings its own CUDA torch (a venv here would pull the CPU build).
# They use .venv's Python when there is one, else python3 (see scripts/gpu_check.sh for a bare GPU machine).
GPU_PY ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
test-gpu:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench-gpu:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m benchmarks.bench_gpu

# The whole GPU check (tests, benchmarks, FP8 loss gap) with logs and JSON under $$OUT, in under 8 minutes.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
