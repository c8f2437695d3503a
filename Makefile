# One gate, run locally and in CI: lint, format check, types, tests.
PY ?= python

.PHONY: install install-dev demo check lint types test bench

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .

install-dev:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

demo: install
	workbench demo --out runs/demo

lint:
	ruff check .
	ruff format --check .

types:
	mypy workbench

test:
	$(PY) -m pytest tests

check: lint types test

bench:
	$(PY) -m scripts.bench_distributions
