# Thin aliases over the `dfd` command. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
BASE_STAMP := $(VENV)/.base-stamp
PROFILE ?= demo
RUN ?=

.DEFAULT_GOAL := help
.PHONY: help base setup browser demo lint test test-fast data serve bench clean-reports

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e .
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

base: $(BASE_STAMP) ## create .venv and install the kit alone: what the demo, dfd predict and dfd serve need (once)

setup: $(STAMP) ## create .venv and install the kit with its dev tools: tests, lint, OpenVINO (once)

demo: base ## build the demo dataset and run the whole pipeline on it (CPU, offline)
	$(BIN)/dfd pipeline --profile $(PROFILE) $(if $(RUN),--run $(RUN))

browser: ## install Debian's chromium for the browser tests (as root with apt; else they are skipped)
	@if [ -x /usr/bin/chromium ]; then echo "chromium: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium: could not be installed; the browser tests will be skipped"; \
	else echo "chromium: absent and not installable here; the browser tests will be skipped"; fi

lint: setup ## ruff over the library, tests, benchmarks and notebooks; the import contracts (pyproject.toml)
	$(BIN)/ruff check dfd_lib tests bench notebooks
	$(BIN)/lint-imports --no-cache

test: setup browser lint ## lint, then every test: library, CLI, server, browser and the notebooks at smoke size
	$(BIN)/python -m pytest -n auto --nbval-lax tests reports/nbval-smoke/notebooks

test-fast: setup lint ## the inner loop (minutes): lint, then every test not marked slow (no smoke pipelines, no notebooks)
	$(BIN)/python -m pytest -n auto -m "not slow" tests

data: base ## build only the demo dataset (data/demo/)
	$(BIN)/dfd build-demo

serve: base ## serve the HTTP API and web page on 127.0.0.1:8000 (weights/moe, else the newest run's under reports/)
	$(BIN)/dfd serve

bench: setup ## run the benchmarks in bench/ (minutes; see bench/RESULTS.md)
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean-reports: ## delete every run under reports/ (keeps its README)
	find reports -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
