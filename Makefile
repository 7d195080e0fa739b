# Two commands on a fresh machine: `make demo` (set up, then train the embedded offline demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e .
	touch $@

.PHONY: setup demo test lint screenshots
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/zimage-lora demo --out zimage-demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The web UI's screenshots in docs/images: the browser tests take them (into the ignored test-artifacts/ui/), this
# copies the ones the docs show. Tests never write tracked files; run this when the pages change.
SHOTS := 30-job-page:job-page 20-dataset-page:dataset-page 31-sample-viewer:sample-viewer 32-loss-chart:loss-chart
screenshots: setup
	ZIMAGE_LORA_REQUIRE_BROWSER=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_ui_browser_viewer.py tests/test_ui_browser_chart.py tests/test_ui_browser_datasets.py
	mkdir -p docs/images
	@for shot in $(SHOTS); do \
		cp test-artifacts/ui/$${shot%%:*}.png docs/images/ui-$${shot##*:}.png && echo "docs/images/ui-$${shot##*:}.png"; \
	done
