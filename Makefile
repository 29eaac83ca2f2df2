# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) benchmarks/bench_mixup.py

clean:
	rm -rf $(VENV) output build *.egg-info
