# Two entry points for a fresh machine: `make run` (the whole pipeline) and `make test`.
# Both create .venv and install what they need first: the exact versions of requirements.lock.
VENV   ?= .venv
PYTHON ?= python3
LOCK   := requirements.lock
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

# Tests run on every core (pytest-xdist): one worker per core, a module's tests on one worker (its module
# fixtures are built once); the scratch pipelines, once for all workers (tests/helpers/pipeline.py:built_once).
# `pytest` alone runs them one after another.
XDIST  := -n auto --dist loadscope

.PHONY: install run test test-slow test-all coverage lint docs bench mutants lock clean-venv

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .  # built with the locked setuptools
	touch $@

install: $(BIN)/.installed

run: install          ## download -> prepare -> balance -> train_teacher -> train_student -> train_hdkd -> evaluate -> report
	dvc repro

test: install         ## the fast suite (slow end-to-end tests: make test-slow; both: make test-all)
	python -m pytest $(XDIST)

test-slow: install   ## the end-to-end pipelines of tests/pipeline/ and the units' slow tests (Ray, torchrun, SMOTE at scale)
	python -m pytest -m slow $(XDIST) tests/pipeline tests/unit tests/tools

test-all: install
	python -m pytest -m "slow or not slow" $(XDIST)

coverage: install     ## line and branch coverage of hdkd/ by both suites, stage subprocesses included, per package
	rm -f .coverage .coverage.*
	python -m pytest -m "slow or not slow" $(XDIST) --cov --cov-report=
	python scripts/coverage_by_package.py

lint: install         ## ruff (pyproject.toml), and the wings' layering as import contracts (.importlinter)
	ruff check .
	lint-imports --no-cache

docs: install         ## the docs site (docs/, mkdocs.yml) into site/; a broken link or reference fails it
	mkdocs build --strict --site-dir site

bench: install        ## speed and memory benchmarks (figures in the README)
	python benchmarks/distill_step.py
	python benchmarks/bootstrap.py
	python benchmarks/data_pipeline.py
	python benchmarks/reproducible_numerics.py

mutants: install      ## mutation testing of one module (not in CI): make mutants MODULE=hdkd/evidence/stats.py
	@test -n "$(MODULE)" || { echo "usage: make mutants MODULE=hdkd/<wing>/<module>.py (scripts/mutation.py -h)"; exit 2; }
	python scripts/mutation.py $(MODULE)

lock:                 ## regenerate requirements.lock: pyproject.toml's dependencies, resolved afresh and frozen
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip setuptools
	.lock-venv/bin/python -m pip install --quiet '.[dev,ray]'
	{ grep '^#' $(LOCK); .lock-venv/bin/python -m pip freeze --all --exclude hdkd; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
