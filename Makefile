# sphereops — every target creates the virtual environment first if it is missing.
#   make bench   the main job: benchmark suite (quick) on whatever device is present
#   make test    the test suite (CPU; Triton kernels through TRITON_INTERPRET=1)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sphereops-installed
# Same numerics on every triton version: fused multiply-add on, explicitly.
export TRITON_DEFAULT_FP_FUSION ?= 1
PYTEST_WORKERS ?= 2

.PHONY: venv test test-fast bench bench-full gpu-check aot-check profile train compare data clean

venv: $(STAMP)

# A machine whose python already has torch (a CUDA machine) reuses it through system site
# packages; otherwise take the CPU build 2.13.0 explicitly so pip never pulls a CUDA build.
$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "reusing the system torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	    $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

bench: $(STAMP)
	$(PY) -m bench

bench-full: $(STAMP)
	$(PY) -m bench --full

aot-check: $(STAMP)
	$(PY) -m sphereops_kernels.aot --out docs/aot_table.md

profile: $(STAMP)
	$(PY) -m sphereops.profile

train: $(STAMP)
	$(PY) -m sphereops.train $(ARGS)

compare: $(STAMP)
	$(PY) -m sphereops.compare $(ARGS)

data:
	-apt-get install -y dataset-fashion-mnist

# For a GPU machine with torch and triton preinstalled and no package registry.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
