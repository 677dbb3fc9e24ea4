# The two commands of the README. Each creates .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVER_STAMP := $(VENV)/.installed-server

.PHONY: run test lint bench clean

# make run needs the server extras only; make test the dev set (which includes them).
$(SERVER_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server]'
	touch $(SERVER_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(SERVER_STAMP)

# ARGS passes flags through, e.g. make run ARGS="--mqtt-port 1884" when 1883 is taken.
run: $(SERVER_STAMP)
	@$(BIN)/fieldchat up $(ARGS) || { status=$$?; \
	  echo 'with make, pass flags through ARGS, e.g. make run ARGS="--mqtt-port 1884"' >&2; \
	  exit $$status; }

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/envelope.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
