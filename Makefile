# Quick start: `make train` trains configs/tiny.yaml on the embedded corpus; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override with e.g. TORCH_SPEC="torch>=2.6" on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml
ARGS ?=

.PHONY: install train test test-slow lint clean gpu-wheels

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
	$(PY) -m pytest -x -q

# The tests marked slow (CI runs them after `make test`).
test-slow: install
	$(PY) -m pytest -q -m slow

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
