# Every target depends on the .venv stamp, so any of them works as the first command on a fresh machine.
# `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.stamp-install

FAMILY ?= full
SEED ?= 42
TRIALS ?=
JOBS ?= 1
STORAGE ?=
SEEDS ?= 10
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast bench lint demo

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with the CPU build of torch and the project (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned (CPU build): a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,postgres]"
	touch $@

test: $(STAMP) ## run the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -n 2 --dist loadgroup -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## time this project's fit against the original-style baseline (ratios, same run)
	$(PY) -m bench.run $(BENCH_ARGS)

lint: $(STAMP) ## ruff
	$(PY) -m ruff check gmm experiments studies tests bench

demo: $(STAMP) ## the seed project's demo: python -m gmm.demo with its defaults
	$(PY) -m gmm.demo $(DEMO_ARGS)

# Targets of the experiment runner, studies, reports and servers live in mk/*.mk.
-include mk/*.mk
