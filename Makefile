# Two commands for a new user:  `make run`  (the demo on the local stack)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test-tools run up down test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Debian's prometheus package, for the tests that scrape a worker with a real Prometheus
# and check the compose rules with promtool: installed where apt-get can (as root),
# otherwise those tests skip and say what is missing.
test-tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus package (for the real-scrape tests)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || \
		echo "could not install prometheus: the real-scrape tests will skip"; \
	else echo "prometheus is not installed (apt-get install prometheus): the real-scrape tests will skip"; fi

# Start the local stack in the background, then import a demo audience and send to it live.
run: install
	$(BIN)/campaigns stack up --detach
	$(BIN)/campaigns demo

up: install
	$(BIN)/campaigns stack up

down:
	$(BIN)/campaigns stack down

test: install test-tools
	$(BIN)/pytest

# The inner loop: everything but the few long end-to-end tests marked `slow`.
test-fast: install test-tools
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) data .pytest_cache
