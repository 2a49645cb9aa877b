# Quick start: `make train` trains configs/tiny.yaml on the embedded corpus; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override with e.g. TORCH_SPEC="torch>=2.6" on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml
ARGS ?=

.PHONY: install train test test-slow lint clean gpu-wheels compat

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# deepspeed ships only an sdist whose setup.py imports torch: build it against the torch above.
	$(PY) -c "import deepspeed" 2>/dev/null || $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m braid.train --config $(CONFIG) $(ARGS)

# The quick suite (<= 10 min on 2 cores), after the lint gate.
test: install lint
	$(PY) -m pytest -x -q --durations=25

# The tests marked slow (CI runs them after `make test`).
test-slow: install
	$(PY) -m pytest -q -m slow --durations=40

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

# Wheels the GPU machine's image lacks (Python 3.12, no internet there); carried as .whl/.
gpu-wheels:
	grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl omegaconf==2.3.0 antlr4-python3-runtime==4.9.3

# The GPU image's versions, checked on CPU: Python 3.12, torch 2.11.0 (PyPI's CUDA build: it runs on CPU,
# but imports only with its CUDA libraries, ~3 GB of wheels), triton 3.6.0, transformers 5.17.0.
# Runs the Triton interpreter tests, the whole quick suite (~10 min; tests of packages the image lacks, deepspeed,
# megatron-core, wandb, skip) and the ahead-of-time sm_90 compile of every kernel backend="auto" uses
# (bench/aot_table.py, table under bench/results/). COMPAT_TESTS="tests/test_config.py ..." runs fewer files.
# The first python3.12 that runs (a pyenv shim is on PATH but fails unless 3.12 is pyenv's selected version).
COMPAT_PYTHON ?= $(shell for p in $$(command -v python3.12) $$(ls $(HOME)/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null); \
	do $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS ?= tests
$(COMPAT_VENV)/.installed:
	test -n "$(COMPAT_PYTHON)" || { echo "make compat: no python3.12 found (set COMPAT_PYTHON=...)"; exit 2; }
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0
	$(COMPAT_VENV)/bin/pip install -q -e ".[dev]" --no-deps
	# numpy < 2.3: Triton 3.6's interpreter converts 1-element arrays to ints, which later numpy refuses
	$(COMPAT_VENV)/bin/pip install -q omegaconf pyyaml "numpy<2.3" pytest pytest-timeout ruff safetensors xxhash tqdm
	touch $@

compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)"
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -x -q -p no:cacheprovider tests/test_triton_attention.py \
		tests/test_triton_kda.py tests/test_triton_scan.py tests/test_fused.py
	$(COMPAT_VENV)/bin/python -m pytest -x -q -p no:cacheprovider $(COMPAT_TESTS)
	env -u TRITON_INTERPRET $(COMPAT_VENV)/bin/python bench/aot_table.py --out bench/results/aot_sm90_triton3.6
