# Two commands for a new user:  `make run`  (the demo on the local stack)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run up down test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Start the local stack in the background, then import a demo audience and send to it live.
run: install
	$(BIN)/campaigns stack up --detach
	$(BIN)/campaigns demo

up: install
	$(BIN)/campaigns stack up

down:
	$(BIN)/campaigns stack down

test: install
	$(BIN)/pytest

# The inner loop: everything but the few long end-to-end tests marked `slow`.
test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) data .pytest_cache
