# `make demo` and `make test` each create .venv when it is missing, install everything the project
# needs from requirements.txt and setup.py (building the native extension where a compiler and a CUDA
# toolkit exist), then run. A second run reuses .venv and reinstalls only when those files change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdecor-installed

# The CUDA toolkit for the extension's CUDA part (see setup.py); empty when there is none.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

PYTEST_ARGS ?=

.PHONY: install demo test bench gpu-check clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@touch $@

demo: $(STAMP)
	$(PY) -m sdecor demo

# pytest's exit code 5 (no test collected) is a failure here, like any other.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Writes ./sdecor-bench-output/ (git-ignored); `python -m sdecor bench --save-results` writes the
# curated files that the README quotes into benchmarks/results/.
bench: $(STAMP)
	$(PY) -m sdecor bench --quick

# On a machine with a CUDA GPU: the GPU tests (pytest -m gpu), the full benchmark and the static
# report, every output in benchmarks/results/<device>/ (or $(OUT)/<device>/ when OUT is set), ready
# to commit; see benchmarks/gpu_check.sh. Without a GPU: one line, exit status 0. BENCH_ARGS go to
# `sdecor bench` (default: torch.compile measured on the smallest shape of each op, whose compile
# time would otherwise dominate the run).
OUT ?=
BENCH_ARGS ?= --compile smallest
gpu-check: $(STAMP)
	@PY="$(PY)" OUT="$(OUT)" BENCH_ARGS="$(BENCH_ARGS)" PYTEST_ARGS="$(PYTEST_ARGS)" bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info python/*.egg-info python/sdecor/_C*.so .pytest_cache
