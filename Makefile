# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick plot clean venv static roofline gpu-check

$(STAMP): requirements.txt setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/elsa demo

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint, pyproject.toml) and import-linter (the layers contract, docs/ARCHITECTURE.md)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

# The sm_90a compile gate (no GPU): bench/results/static-sm90/; the roofline floor: bench/results/roofline/.
static: $(STAMP)
	$(PY) -m bench static

roofline: $(STAMP)
	$(PY) -m bench roofline

# On a GPU machine (its own python3 with torch and triton; no venv, no install): make gpu-check OUT=DIR
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=DIR [PYTHON=python3]" >&2; exit 2; }
	bash bench/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
