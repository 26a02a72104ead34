# The two commands of the README's Quickstart:
#   make demo   builds .venv and runs `forkref bench --quick`: forkref against the stdlib
#               pools, joblib, mpire (and Ray, when installed) on five workloads, every result checked (1-1.5 min)
#   make test   builds .venv, runs ruff, mypy --strict, the import-linter layer contracts,
#               the docs build (make docs), the package checks (make package) and the suite
#               on Python 3.11,
#               then the smoke subset on every other supported Python that is installed;
#               with CONFORMANCE=1 also `make conformance` (CPython 3.13's pool tests)
# Both create their own virtualenvs and install what they need; nothing else is required.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
MAIN_VERSION := 3.11
SMOKE_VERSIONS := 3.10 3.12 3.13
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

# Print the path of an interpreter for version $(1), or nothing: a pyenv-installed
# one first (a pyenv shim on PATH may exist for a version it will refuse to run),
# else a pythonX.Y on PATH.
find_python = $(shell ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1).*/bin/python 2>/dev/null | sort -V | tail -n 1 | grep . || command -v python$(1) 2>/dev/null)
MAIN_PYTHON := $(or $(call find_python,$(MAIN_VERSION)),$(shell command -v python3))

.PHONY: demo test lint docs package unit venvs smoke conformance bench bench-long clean

$(VENV)/.stamp-%: pyproject.toml
	@test -x $(PY) || $(MAIN_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$*]'
	@touch $@

# The ray extra, for the Ray backend's tests and benchmark. Where Ray cannot be installed
# (no wheel for this Python or platform) this says so and goes on: those tests then skip,
# saying why.
$(VENV)/.stamp-ray: pyproject.toml $(VENV)/.stamp-test,lint
	$(PY) -m pip install -q -e '.[ray]' || echo "Ray cannot be installed here: the Ray backend's tests will be skipped"
	@touch $@

# torch, for the tests of compact containers in a real DataLoader (torch is never a
# dependency of forkref). Where no wheel installs (this Python or platform), those tests
# skip, saying why.
TORCH_VERSION ?= 2.13.0
$(VENV)/.stamp-torch: pyproject.toml $(VENV)/.stamp-test,lint
	$(PY) -m pip install -q 'torch==$(TORCH_VERSION)' || echo "torch cannot be installed here: the DataLoader tests will be skipped"
	@touch $@

# DEMO_ARGS adds bench options, e.g. DEMO_ARGS="--plot bench.png" or "--size 1GiB".
demo: $(VENV)/.stamp-demo
	$(VENV)/bin/forkref bench --quick $(DEMO_ARGS)

# CPython's own pool tests are part of `make test`; CONFORMANCE=0 leaves them out.
CONFORMANCE ?= 1
test: lint docs package unit smoke $(if $(filter 1,$(CONFORMANCE)),conformance)

# The layers of ARCHITECTURE.md are import-linter contracts in pyproject.toml.
lint: $(VENV)/.stamp-test,lint
	$(VENV)/bin/ruff check src tests benchmarks conformance
	$(VENV)/bin/mypy --strict src/forkref
	$(VENV)/bin/lint-imports --no-cache

# The Sphinx site in docs/_build/html; every warning and unresolved reference fails it.
# Offline: intersphinx reads the inventories kept in docs/_intersphinx/ (see docs/conf.py).
docs: $(VENV)/.stamp-docs
	$(VENV)/bin/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html

# The sdist and wheel in dist/, and twine's check that PyPI would render their metadata.
package: $(VENV)/.stamp-release
	rm -rf dist build  # a stale build/ would be packed as it is
	$(PY) -m build -q --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

unit: $(VENV)/.stamp-test,lint $(VENV)/.stamp-ray $(VENV)/.stamp-torch venvs
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The virtualenvs of the other supported Pythons that are installed: the smoke stage runs
# in them, and the unit stage's tests/test_fork_warnings.py runs its scenarios in
# .venv-3.12 and .venv-3.13, so both stages build them first.
venvs:
	@for v in $(SMOKE_VERSIONS); do \
	  py=$$( (ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python 2>/dev/null | sort -V | tail -n 1 | grep .) || command -v python$$v 2>/dev/null || true); \
	  if [ -z "$$py" ]; then echo "venvs: Python $$v not installed, skipped"; continue; fi; \
	  venv=.venv-$$v; \
	  if [ ! -f $$venv/.stamp ] || [ pyproject.toml -nt $$venv/.stamp ]; then \
	    { $$py -m venv $$venv && $$venv/bin/python -m pip install -q --upgrade pip && \
	      $$venv/bin/python -m pip install -q -e '.[test]' && \
	      { $$venv/bin/python -m pip install -q -e '.[ray]' || echo "venvs: Ray cannot be installed for Python $$v: its Ray tests skip"; } && \
	      touch $$venv/.stamp; } || exit 1; \
	  fi; \
	done

smoke: venvs
	@for v in $(SMOKE_VERSIONS); do \
	  py=$$( (ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python 2>/dev/null | sort -V | tail -n 1 | grep .) || command -v python$$v 2>/dev/null || true); \
	  if [ -z "$$py" ]; then echo "smoke: Python $$v not installed, skipped"; continue; fi; \
	  venv=.venv-$$v; \
	  echo "smoke: Python $$v ($$py)"; \
	  $$venv/bin/python -m pytest -q -m smoke $(PYTEST_ARGS); \
	done

# CPython 3.13's own process-pool tests (test_concurrent_futures, and the Pool tests of
# _test_multiprocessing) against forkref's pools under fork, forkserver and spawn, in
# .venv-3.13 as `make smoke` builds it. Skipped, with a message, where Python 3.13 is not
# installed. `make conformance CONFORMANCE_ARGS="--json out.json --method fork"`;
# `.venv-3.13/bin/python -m conformance --help` lists the options.
CONFORMANCE_ARGS ?=
conformance:
	@py='$(call find_python,3.13)'; \
	if [ -z "$$py" ]; then echo "conformance: Python 3.13 not installed, skipped"; exit 0; fi; \
	venv=.venv-3.13; \
	if [ ! -f $$venv/.stamp ] || [ pyproject.toml -nt $$venv/.stamp ]; then \
	  { $$py -m venv $$venv && $$venv/bin/python -m pip install -q --upgrade pip && \
	    $$venv/bin/python -m pip install -q -e '.[test]' && touch $$venv/.stamp; } || exit 1; \
	fi; \
	$$venv/bin/python -m conformance $(CONFORMANCE_ARGS)

# Every benchmark, one after the other on a quiet machine (about 10 minutes);
# ray joins bench_shm.py when installed (pip install ray), and bench_ray.py needs it.
bench: $(VENV)/.stamp-bench $(VENV)/.stamp-ray
	@mkdir -p benchmarks/results
	$(PY) benchmarks/bench_core.py --json benchmarks/results/core.json | tee benchmarks/results/core.txt
	$(PY) benchmarks/bench_pools.py | tee benchmarks/results/pools.txt
	$(PY) benchmarks/bench_shm.py | tee benchmarks/results/shm.txt
	$(PY) benchmarks/bench_ray.py | tee benchmarks/results/ray.txt
	$(PY) benchmarks/bench_cow.py --json benchmarks/results/cow.json | tee benchmarks/results/cow.txt
	$(PY) benchmarks/bench_share_anywhere.py --json benchmarks/results/share_anywhere.json | tee benchmarks/results/share_anywhere.txt

# The longer ones, each the command docs/benchmarks.md gives for its results file:
# big results and the warm store (a few minutes each), compact reads, the DataLoader over
# 2M records (about an hour: the plain list's epochs are slow) and the scale curve to
# 8 GiB (tens of minutes, 20 GiB of free memory for its largest heap).
bench-long: $(VENV)/.stamp-bench $(VENV)/.stamp-ray $(VENV)/.stamp-torch
	@mkdir -p benchmarks/results
	$(PY) benchmarks/bench_results.py --rounds 3 | tee benchmarks/results/results.txt
	$(PY) benchmarks/bench_warm.py --rounds 8 --write-methods | tee benchmarks/results/warm.txt
	$(PY) benchmarks/bench_compact_read.py --records 100000 --rounds 9 | tee benchmarks/results/compact_read.txt
	$(PY) benchmarks/bench_dataloader.py --rounds 2 | tee benchmarks/results/dataloader.txt
	$(PY) benchmarks/bench_scale.py --max 8GiB --json benchmarks/results/scale.json | tee benchmarks/results/scale.txt

clean:
	rm -rf .venv .venv-* build dist docs/_build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
