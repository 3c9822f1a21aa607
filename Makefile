# Every target creates/updates .venv and installs what it needs; torch is pinned first so pip takes the
# CPU wheel that lies on disk instead of pulling a multi-GB CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,all
OUT ?= runs/default

.PHONY: run test typecheck bench lint format clean flower-example

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/deltaplane run --out $(OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

# The Flower app example on Flower's local simulation SuperLink, with this checkout's deltaplane (nothing is
# installed at run time: deltaplane is not on the package index).
flower-example: $(STAMP)
	cd examples/flower-app && FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 ../../$(VENV)/bin/flwr run . local --stream

# Every section of docs/benchmarks.md with the command that recorded it (hours; see benchmarks/run_all.py).
# PFL_PYTHON: a python with pfl-research installed, for the sim_speed section (not refreshed without it).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# mypy over every module of src/deltaplane with pyproject's [tool.mypy]; none is exempt.
# Run by .ci/run. Cold (no .mypy_cache: a fresh clone) it takes about a minute, mostly reading torch's and
# numpy's stubs (60 s wall, 47 s CPU on the 2 shared cores, 2026-12-07); with the cache (gitignored, kept
# between runs of one checkout) about 2 s.
typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
