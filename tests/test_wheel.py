"""The wheel ships one top-level package, ``conan_hf``, with its stage configs, and a stage runs from it outside the
checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO_ROOT)], check=True, capture_output=True, text=True, cwd=out)
    (path,) = out.glob("conan_hf-*.whl")
    return path


def test_wheel_holds_conan_hf_only_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/", 1)[0] for name in names} == {"conan_hf", f"{wheel.name.split('-')[0]}-"
                                                         f"{wheel.name.split('-')[1]}.dist-info"}
    for stage in ("tokenizer", "pretrain", "sft", "weak", "supervised"):
        assert f"conan_hf/stages/configs/{stage}.yaml" in names
    assert "conan_hf/model_card/template.md" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "conan-train = conan_hf.stages.__main__:main" in entry_points


@pytest.mark.slow
def test_a_stage_runs_from_the_installed_wheel_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "conan_hf.stages", "tokenizer", "--preset", "tiny"], cwd=work,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (work / "runs" / "tokenizer" / "tokenizer.json").is_file()
    where = subprocess.run([sys.executable, "-c", "import conan_hf; print(conan_hf.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where
