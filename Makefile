# The two commands: `make run` and `make test`. Both create .venv if missing and install posttrain.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/toy.yaml

.PHONY: run test test-all lint setup clean

setup: $(STAMP)

# The venv's own pip (Python 3.11's) installs editable pyproject packages. --no-compile: the
# modules that run are byte-compiled on first import, not all of torch's up front (10 s less).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/posttrain run $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
