# `make test` from a fresh clone: builds .venv (CPU torch by default), then runs the suite.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
