# Two commands on a fresh machine: `make demo` (the whole toolkit on synthetic data) and `make test`;
# then `make serve` opens the demo's model in a web page.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: install test demo serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so pip never pulls a multi-GB CUDA build as a dependency; GPU users
# install their own CUDA torch (>=2.3) before `pip install -e .`.
install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,parquet,onnx,demo]"

test: install
	$(PY) -m pytest -q

# The whole toolkit offline: synthetic data -> tiny model -> scores -> masks on loose images.
# Re-running resumes: prepare keeps finished shards, train continues from last.pt.
demo: install
	$(VENV)/bin/sris prepare synthetic --out $(DEMO)/data
	$(VENV)/bin/sris train --recipe tiny --data $(DEMO)/data --out $(DEMO)/run --resume auto
	$(VENV)/bin/sris eval --checkpoint $(DEMO)/run/best.pt --data $(DEMO)/data --split val,test --json $(DEMO)/eval.json --plot $(DEMO)/by_size.png
	$(VENV)/bin/sris predict $(DEMO)/data/examples --prompts $(DEMO)/data/examples/prompts.jsonl \
		--checkpoint $(DEMO)/run/best.pt --out $(DEMO)/predictions --attention
	@echo "overlays, masks and attention maps: $(DEMO)/predictions/  scores: $(DEMO)/eval.json"

# The demo's model in a web page (sris demo): http://127.0.0.1:7860, Ctrl-C stops it.
serve: install
	@test -f $(DEMO)/run/best.pt || { echo "no $(DEMO)/run/best.pt: run make demo first"; exit 2; }
	$(VENV)/bin/sris demo --checkpoint $(DEMO)/run/best.pt

clean:
	rm -rf $(VENV) $(DEMO)
