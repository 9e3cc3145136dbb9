# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick plot clean venv

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

lint: $(STAMP)
	$(PY) -m compileall -q elsa_codec kernels bench tests

bench: $(STAMP)
	$(VENV)/bin/elsa bench

bench-quick: $(STAMP)
	$(VENV)/bin/elsa bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
