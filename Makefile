PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000
MODEL   ?= checkpoints/attamba-wt2
ARGS    ?=

.PHONY: install install-dev serve test bench gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (the pinned CPU build), then the project itself.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/attamba serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: install-dev
	$(BIN)/attamba bench $(ARGS)

# Everything that needs a GPU (kernel tests, engine parity, benchmarks) as JSON in $(OUT); runs
# with the machine's python, no venv or install (scripts/gpu_check.py).
OUT ?= gpu-check
gpu-check:
	$(PY) scripts/gpu_check.py --out $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info
