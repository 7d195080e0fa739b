# Two commands on a fresh machine: `make demo` (set up, then train the embedded offline demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e .
	touch $@

.PHONY: setup demo test lint
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/zimage-lora demo --out zimage-demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
