# The two commands of the quickstart: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck pytest bench vendor clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## Create the stores and sample data, print an admin key, serve on :8000
	$(BIN)/cdp demo

test: $(STAMP)  ## ruff, mypy and the whole test suite
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/python -m pytest

check: test

bench: $(STAMP)  ## Every benchmark at full scale (slow; figures for the notes)
	$(BIN)/python -m benchmarks all

vendor:  ## Refresh the vendored chart library from npm (needs Node.js; the result is committed)
	dashboards/frontend/vendor.sh

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache .pytest_cache
