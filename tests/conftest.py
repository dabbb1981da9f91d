"""Shared pytest fixtures.

Tests never touch the network: the Hub is switched off before transformers is imported.
Real datasets are reached through ``CONAN_DATA_DIR`` (the shared ``data/`` folder); tests that need it
skip cleanly when it is unset or missing.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Root of the shared real-data folder, or skip the test."""
    root = os.environ.get("CONAN_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("CONAN_DATA_DIR is not set to the shared data folder")
    return Path(root)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Conan SentenceTransformer (random weights, trained demo tokenizer), built once per session."""
    import torch

    from conan_hf import ConanConfig, build_sentence_transformer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-conan")
    model = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=64)
    model.save(str(path))
    return path


@pytest.fixture
def restore_threads():
    """Stages set torch's thread count from their config (``num_threads``); put it back after the test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
