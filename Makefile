# The two commands: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# dvc repro calls `shrinkfleet stage ...`: the venv's scripts must be on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test bench compare docs venv lint clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install shrinkfleet with its dev extras

run: venv  ## run the default fleet (params.yaml) and print the report
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	@[ -d .dvc ] || $(BIN)/dvc init -q
	$(BIN)/shrinkfleet run

# Two test processes, one test file each at a time: the end-to-end tests mostly wait on servers
# and subprocesses (the suite takes about 25 minutes this way on 2 cores). Slow files start first.
TEST_WORKERS ?= 2
test: venv  ## run the whole test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile

bench: venv  ## every benchmark in bench/, each timed (tables on screen, JSON in bench/results/; see docs/benchmarks.md)
	$(BIN)/python bench/all.py

compare: venv  ## the orchestration benchmarks on commit BEFORE and on this checkout, side by side (bench/compare.py)
	@test -n "$(BEFORE)" || { echo "make compare BEFORE=<commit>: name the commit to compare with"; exit 2; }
	$(BIN)/python bench/compare.py --before $(BEFORE)

docs: venv  ## regenerate the parameter reference (docs/configuration.md) and the benchmark table (docs/benchmarks.md)
	$(BIN)/python -m shrinkfleet.reference
	$(BIN)/python bench/table.py --write

lint: venv  ## ruff: style and import order
	$(BIN)/ruff check .

clean:  ## remove run outputs (not .venv, not the DVC cache)
	rm -rf data/prepared models metrics reports mlflow.db mlartifacts mlruns dvc.lock
