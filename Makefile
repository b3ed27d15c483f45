# The two commands: `make run` and `make test`. Both create .venv if missing and install posttrain.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/toy.yaml

.PHONY: run test test-all lab lint setup clean

setup: $(STAMP)

# The venv's own pip (Python 3.11's) installs editable pyproject packages. --no-compile: only
# the modules a run imports get byte-compiled, on first import (install 24 s instead of 43 s
# here). That needs Python to write .pyc files into .venv, so PYTHONDONTWRITEBYTECODE (set on
# these machines) is dropped for our commands; else every process (the tests start many)
# would compile torch and transformers from source again (~6 s each).
unexport PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/posttrain run $(CONFIG)

# One pytest worker per core (pytest-xdist); the lab's --quick tests stay on one worker.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# The lab: every experiment on world seeds 0,1,2 (SEEDS=101,102,103 for others); runs/lab/.
# One process per seed, JOBS at once (one per core, up to 4), then the pooled pass.
SEEDS ?= 0,1,2
lab: $(STAMP)
	$(BIN)/posttrain lab run all --seeds $(SEEDS) --jobs $(JOBS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
