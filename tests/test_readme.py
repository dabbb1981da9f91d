"""Every Python block of the README runs as written after the main job, in a fresh process and a working directory
holding what `make demo` writes (``conan-v2`` and ``runs/finetune``); the blocks that are the files of
``docs/examples`` are those files verbatim (``tests/test_readme_examples.py`` runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    """The contents of the README's ```python fences, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def after_main_job(tmp_path_factory) -> Path:
    """A folder where the main job ran with its defaults (a few steps per stage, to keep the test short)."""
    folder = tmp_path_factory.mktemp("readme")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           str(REPO_ROOT / "examples" / "finetune.py"), "--max_steps", "6"]
    result = subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (folder / "conan-v2" / "model.safetensors").is_file()
    return folder


def test_readme_python_blocks_are_found():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5, "the README's usage examples are fenced as ```python blocks"


def test_readme_example_blocks_are_the_example_files_verbatim():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    for example in sorted((REPO_ROOT / "docs" / "examples").glob("*.py")):
        assert example.read_text(encoding="utf-8") in blocks, f"{example.name} is not in the README verbatim"


@pytest.mark.slow
def test_every_readme_python_block_runs_as_written(after_main_job):
    examples = {p.read_text(encoding="utf-8") for p in (REPO_ROOT / "docs" / "examples").glob("*.py")}
    ran = 0
    for number, block in enumerate(python_blocks(README.read_text(encoding="utf-8")), 1):
        if block in examples:
            continue  # run as files by tests/test_readme_examples.py
        result = subprocess.run([sys.executable, "-c", block], cwd=after_main_job, env=_env(), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"README python block {number} failed:\n{block}\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), f"README python block {number} printed nothing"
        ran += 1
    assert ran >= 3
