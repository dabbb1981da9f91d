# The README's two commands for a fresh machine:
#   make demo   set up .venv and run the main job (accelerate launch examples/finetune.py)
#   make test   set up .venv and run the test suite (this is what CI runs)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Console scripts of the venv (accelerate, torchrun, deepspeed) for the jobs and the tests.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/conan-hf/torch_extensions

.PHONY: demo test setup clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# PyTorch first, so the package's `torch` requirement is already satisfied (no CUDA wheels on CPU machines).
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/accelerate launch examples/finetune.py

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) conan-v2 runs
