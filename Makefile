# Two commands on a fresh machine with Python 3.11, pip and make:  `make run`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Run history lives inside the project so `make dev` shows the runs of `make run` and survives restarts.
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export DO_NOT_TRACK := 1
# One "planned" event per asset for a run over a partition range, not one per partition (undocumented
# Dagster switch, guarded by ml_assets_tests/test_public_dagster.py; docs/design.md says why; see
# ml_assets/orchestration/build.py): read by whichever process creates the run.
export DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS := 1

.PHONY: setup browser run replay test test-slow test-ui test-all dev serve lint bench bench-serve bench-tuning clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

setup: $(STAMP) $(DAGSTER_HOME)/dagster.yaml

run: setup ## materialize the whole asset graph on the embedded data and print a summary
	$(BIN)/ml-assets run

# The next slices of the demo data into the landing zone (default: all the rest), e.g. `make replay UNTIL=2013-07-31 SHIFT='distance=+300'`;
# RESAMPLE=2013-01-01..2013-03-17 replays days drawn from that period instead (a stationary replay).
UNTIL ?= 2014-01-01
replay: setup
	$(BIN)/ml-assets replay flight_delay --until $(UNTIL) $(if $(SHIFT),--shift '$(SHIFT)') $(if $(RESAMPLE),--resample-from $(RESAMPLE))

test: setup ## the default test suite (what CI runs)
	$(BIN)/python -m pytest

# The browser test drives Debian's Chromium through Playwright's Python API; it never downloads a browser.
browser:
	@command -v chromium >/dev/null || { $$([ "$$(id -u)" -eq 0 ] || echo sudo) apt-get update && $$([ "$$(id -u)" -eq 0 ] || echo sudo) apt-get install -y chromium; }

test-slow: setup browser ## only the tests marked slow (the browser test among them)
	$(BIN)/python -m pytest -m slow

test-ui: setup browser ## the Dagster UI in a headless Chromium; screenshots in bench/out/ui/
	$(BIN)/python -m pytest -m slow ml_assets_tests/test_ui_browser.py

test-all: setup
	$(BIN)/python -m pytest -m ''

# The report server (plots and HTML reports for the UI, http://127.0.0.1:3001) runs beside `dagster dev`
# and stops with it.
dev: setup ## the Dagster UI on http://127.0.0.1:3000
	$(BIN)/python -m ml_assets.core.report_server & server=$$!; trap 'kill $$server' EXIT; $(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

serve: setup ## the REST API on the champions: http://127.0.0.1:8000/docs (after `make run`)
	$(BIN)/ml-assets serve --host 127.0.0.1 --port $(or $(PORT),8000)

lint: setup
	$(BIN)/ruff check ml_assets ml_assets_tests bench
	$(BIN)/ruff format --check ml_assets ml_assets_tests bench

bench: setup ## Dagster vs plain-Python end-to-end timing
	$(BIN)/python bench/e2e.py

bench-serve: setup ## online latency and batch throughput of the flagship's champion
	$(BIN)/python bench/serve.py

bench-tuning: setup ## random search vs Optuna under the same time budget (about 25 min)
	$(BIN)/python -m bench.tuning

clean:
	rm -rf data .dagster_home
