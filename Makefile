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
DATA_SEED ?= 0
DATA ?=
COLUMNS ?=
COMPONENTS ?=
TRIALS ?=
JOBS ?=
STORAGE ?=
SEEDS ?= 10
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast bench lint demo mutants

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with the CPU build of torch and the project (idempotent)

# pip shows its progress (a bar per download on a terminal, one line per package otherwise): the first
# install takes about a minute, and a silent minute looks like a hang.
$(STAMP): pyproject.toml
	@echo "== make install: creating $(VENV) (first time only; about a minute on a quiet machine)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@echo "== 1/2: PyTorch, pinned CPU build ($(TORCH)); a bare torch requirement would pull a multi-GB CUDA build"
	$(PY) -m pip install "$(TORCH)"
	@echo "== 2/2: this project, editable, with its extras (test, postgres, sklearn)"
	$(PY) -m pip install -e ".[test,postgres,sklearn]"
	touch $@
	@echo "== installed. Run commands through make, or as .venv/bin/python -m ..., or after: source .venv/bin/activate"

# Numerically sensitive modules: `make test` runs them a second time on another math-kernel path (MKL's
# conditional-numerical-reproducibility mode and ATen's portable kernels), so a test that depends on where a
# chaotic trajectory happens to go fails on every machine, not only on some CPUs.
NUMERIC_TESTS := tests/test_collapse.py tests/test_fit.py tests/test_properties.py tests/test_scratch.py \
	tests/test_likelihood.py tests/test_em.py tests/test_minibatch.py tests/test_optim.py tests/test_model.py \
	tests/test_trust.py tests/test_distribution.py tests/test_population.py
OTHER_KERNELS := MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default

# Four xdist workers on two cores: much of the suite waits (on servers, killed processes, subprocesses' starts),
# and the waits overlap; the whole suite took 4:50 with 4 workers against 6:37 with 2 on the same 2-core VM.
TEST_WORKERS ?= 4

test: $(STAMP) ## run the whole test suite (slow end-to-end tests included), then the numeric tests on other kernels
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -q $(PYTEST_ARGS)
	@echo "numerically sensitive tests again, on another math-kernel path: $(OTHER_KERNELS)"
	$(OTHER_KERNELS) $(PY) -m pytest -n 2 -q -m "not slow" $(NUMERIC_TESTS)

mutants: $(STAMP) ## break each collapse rule in a scratch copy and check that a test fails (tests/mutants.py)
	$(PY) tests/mutants.py

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## time this project's fit against the original-style baseline (ratios, same run)
	$(PY) -m bench.run $(BENCH_ARGS)

lint: $(STAMP) ## ruff
	$(PY) -m ruff check gmm experiments studies tests bench

demo: $(STAMP) ## the seed project's demo: python -m gmm.demo with its defaults
	$(PY) -m gmm.demo $(DEMO_ARGS)

# Targets of the experiment runner, studies, reports and servers live in mk/*.mk.
-include mk/*.mk
