# Two commands on a fresh machine with Python 3.11, pip and make:  `make run`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Run history lives inside the project so `make dev` shows the runs of `make run` and survives restarts.
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export DO_NOT_TRACK := 1

.PHONY: setup run replay test test-slow test-all dev serve lint bench bench-serve clean

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

test-slow: setup ## only the tests marked slow
	$(BIN)/python -m pytest -m slow

test-all: setup
	$(BIN)/python -m pytest -m ''

dev: setup ## the Dagster UI on http://127.0.0.1:3000
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

serve: setup ## the REST API on the champions: http://127.0.0.1:8000/docs (after `make run`)
	$(BIN)/ml-assets serve --host 127.0.0.1 --port $(or $(PORT),8000)

lint: setup
	$(BIN)/ruff check ml_assets ml_assets_tests bench
	$(BIN)/ruff format --check ml_assets ml_assets_tests bench

bench: setup ## Dagster vs plain-Python end-to-end timing
	$(BIN)/python bench/e2e.py

bench-serve: setup ## online latency and batch throughput of the flagship's champion
	$(BIN)/python bench/serve.py

clean:
	rm -rf data .dagster_home
