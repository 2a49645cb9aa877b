# Quick start: `make train` trains configs/tiny.yaml on the embedded corpus; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override with e.g. TORCH_SPEC="torch>=2.6" on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml
ARGS ?=

.PHONY: install dev train test clean

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

test: install
	$(PY) -m pytest -x -q

clean:
	rm -rf $(VENV) runs .pytest_cache
