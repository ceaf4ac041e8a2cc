# Two entry points for a fresh machine: `make run` (the whole pipeline) and `make test`.
# Both create .venv and install what they need first.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-all lint bench clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: install          ## download -> prepare -> balance -> train_teacher -> train_student -> train_hdkd -> evaluate -> report
	dvc repro

test: install         ## the fast suite (slow end-to-end tests: make test-all)
	python -m pytest

test-all: install
	python -m pytest -m "slow or not slow"

lint: install         ## ruff: pyflakes, pycodestyle, bugbear, pyupgrade, import order (pyproject.toml)
	ruff check .

bench: install        ## speed and memory benchmarks (figures in the README)
	python benchmarks/distill_step.py
	python benchmarks/data_pipeline.py

clean-venv:
	rm -rf $(VENV)
