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

.PHONY: install demo test bench clean

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

bench: $(STAMP)
	$(PY) -m sdecor bench --quick

clean:
	rm -rf build *.egg-info python/*.egg-info python/sdecor/_C*.so .pytest_cache
