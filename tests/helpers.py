"""Helpers shared by the command-line and input-check tests: the repository root, the environment of a child
process, and small data files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               COLUMNS="1000", **extra)
    return env


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_sts_jsonl(path: Path, n: int = 40, names=("sentence1", "sentence2", "score")) -> list[dict]:
    from conan_hf.demo import demo_sts

    # identical pairs left out: their cosines tie at 1 up to rounding, and mteb and numpy break such ties differently
    rows = [r for r in demo_sts() if r["sentence1"] != r["sentence2"]][:n]
    path.write_text("".join(json.dumps({names[0]: r["sentence1"], names[1]: r["sentence2"], names[2]: r["score"]},
                                       ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _assert_one_line_exit_2(result: subprocess.CompletedProcess, prog: str, where: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: {where}: "), lines[0]
    return lines[0]
