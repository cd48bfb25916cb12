# Two commands on a fresh machine: `make demo` (the whole toolkit on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so pip never pulls a multi-GB CUDA build as a dependency; GPU users
# install their own CUDA torch (>=2.3) before `pip install -e .`.
install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
