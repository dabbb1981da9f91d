# The README's two commands for a fresh machine:
#   make demo   set up .venv and run the main job (accelerate launch examples/finetune.py)
#   make test   set up .venv, run `ruff check .` and the test suite (this is what CI runs)
# Installs come from requirements/lock.txt, the exact set the tests passed with; `make lock` regenerates it from
# setup.cfg's ranges (what users get with `pip install conan-hf`).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Where PyTorch comes from: empty = PyPI (the CUDA build on Linux x86_64); e.g. https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_SPEC ?= pip==26.3
LOCK := requirements/lock.txt
BIN := $(VENV)/bin
# Console scripts of the venv (accelerate, torchrun, deepspeed) for the jobs and the tests.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/conan-hf/torch_extensions

.PHONY: demo test setup lock clean

$(BIN)/.installed: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(PIP_SPEC)"
	# PyTorch first, from TORCH_INDEX when set; the lock pins it without a local label, so a +cpu or +cu128 build
	# of the same version satisfies it.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/accelerate launch examples/finetune.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# A fresh resolution of setup.cfg's ranges (with the dev extra) in a throw-away venv, frozen into the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet "$(PIP_SPEC)"
	.lock-venv/bin/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	.lock-venv/bin/pip install --quiet -e ".[dev]"
	.lock-venv/bin/python requirements/freeze_lock.py $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv conan-v2 runs
