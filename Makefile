# One gate, run locally and in CI: lint, format check, types, tests.
PY ?= python

.PHONY: install install-dev demo check lint types test numerics bench

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

# The suite once more with other float32 rounding: ATen's generic (non-SIMD) kernels, MKL's
# conservative code path, oneDNN at SSE4.1 and OpenBLAS's Sandy Bridge kernels. Tolerances
# that only held for this CPU's rounding fail here (CI machines may have another CPU). The
# organisms are trained afresh under those kernels in a cache of their own (their weights
# differ from the cached ones, as on another CPU), so thresholds that held only for one
# training's weights fail too. NUMERICS_CACHE keeps them between runs.
NUMERICS_CACHE ?= $(HOME)/.cache/workbench-numerics
numerics:
	WORKBENCH_CACHE=$(NUMERICS_CACHE) \
	ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE DNNL_MAX_CPU_ISA=SSE41 \
	OPENBLAS_CORETYPE=Sandybridge $(PY) -m pytest tests -q

bench:
	$(PY) -m scripts.bench_distributions
