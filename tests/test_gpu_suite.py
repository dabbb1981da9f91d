"""The GPU benchmark suite (benchmarks/gpu/suite.py, issue 14) runs end to end in its CPU smoke mode, so it cannot rot
between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu" / "suite.py"


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[str, dict, float]:
    out = tmp_path_factory.mktemp("gpu-suite") / "report.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    # CPU time, not wall clock: on a shared machine the wall clock says more about the neighbours than the suite.
    return out.read_text(encoding="utf-8"), data, data["header"]["cpu_seconds"]


@pytest.mark.slow
def test_smoke_report_has_every_section_with_numbers(smoke_report):
    text, data, cpu_seconds = smoke_report
    assert cpu_seconds < 120, f"the smoke run must stay under 2 minutes of CPU time, took {cpu_seconds:.0f} s"
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    titles = [s.splitlines()[0] for s in sections]
    for number, name in enumerate(("Correctness", "Soft-mask cost", "Encode", "Training", "Ablation"), start=1):
        assert any(t.startswith(f"{number}. {name}") for t in titles), titles
    for number, name in enumerate(("correctness", "softmask", "encode", "train"), start=1):
        entry = data["sections"][name]
        assert entry["error"] is None, entry["error"]
        body = next(s for s in sections if s.startswith(f"{number}."))
        assert "ERROR" not in body
        # Every result table has at least one measured number (a row starting with a digit or a dtype/workload).
        assert re.search(r"^\| [^|]+ \| .*\d", body, flags=re.M), body
    # benchmarks/ablation.py exists; a smoke run never starts it (it needs the GPU scale and the shared data).
    assert data["sections"]["ablation"]["result"]["skipped"] == "smoke run: the ablation needs the GPU scale"


@pytest.mark.slow
def test_smoke_correctness_actually_compares_flex_with_dense(smoke_report):
    _, data, _ = smoke_report
    result = data["sections"]["correctness"]["result"]
    assert result["pass"] is True
    cases = result["cases"]
    # fp32 and bf16, both padding sides, both alphas.
    assert {(c["dtype"], c["padding"], c["alpha"]) for c in cases} == {
        (d, p, a) for d in ("float32", "bfloat16") for p in ("left", "right") for a in (0.3, 0.7)}
    for case in cases:
        # The two paths really ran (the model reports the path it took) ...
        assert case["soft_path"] == "flex_attention" and case["reference_path"] == "sdpa", case
        diff = case["output_rel_diff"]
        # ... and computed the same thing by different means: a finite, small, non-zero difference.
        assert math.isfinite(diff) and 0 < diff <= case["output_tolerance"], case
        if case["dtype"] == "float32":
            assert diff < 1e-4
        else:  # the bf16 tolerance is tied to bf16's own error against fp32, which must be small too
            assert 0 < case["bf16_floor_output"] < 0.05
    # A wrong alpha would be caught: the dense outputs at 0.3 and 0.7 are far apart in the same metric.
    worst = max(c["output_rel_diff"] for c in cases if c["dtype"] == "float32")
    assert result["alpha_sensitivity"] > 1000 * worst
    # alpha >= 1 leaves the soft machinery for the model's own bidirectional sdpa kernel.
    for row in result["bidirectional"]:
        assert row["path"] == "bidirectional" and row["attn_implementation"] == "sdpa"
        assert row["output_rel_diff_vs_bidirectional_mode"] == 0.0


@pytest.mark.slow
def test_smoke_measurements_are_consistent(smoke_report):
    _, data, _ = smoke_report
    softmask = data["sections"]["softmask"]["result"]
    rows = [r for r in softmask["rows"] if "error" not in r]
    assert {r["backend"] for r in rows} == {"bidirectional", "soft-flex", "soft-dense"}
    for row in rows:
        base = next(b for b in rows if b["length"] == row["length"] and b["backend"] == "bidirectional")
        assert row["time_ratio"] == pytest.approx(row["seconds"] / base["seconds"])
        expected_path = {"bidirectional": "sdpa", "soft-flex": "flex_attention", "soft-dense": "sdpa"}[row["backend"]]
        assert row["path"] == expected_path

    encode = data["sections"]["encode"]["result"]
    assert [w["name"] for w in encode["workloads"]] == ["seq 32", "real-length mix"]
    for workload in encode["workloads"]:
        assert workload["tokens"] > 0 and workload["st_tokens_per_s"] > 0 and workload["fast_tokens_per_s"] > 0
        assert workload["speedup"] == pytest.approx(workload["st_seconds"] / workload["fast_seconds"])
        assert workload["fast_tokens_per_s"] == pytest.approx(workload["tokens"] / workload["fast_seconds"])
    assert encode["st_dtype"] == encode["fast_dtype"] == "torch.bfloat16"  # the fair, bf16 baseline

    train = data["sections"]["train"]["result"]
    # 2 queries x (query + positive + 7 negatives) x 32 tokens, timed over the steps after warm-up.
    assert train["tokens_per_step"] == 2 * 9 * 32
    assert train["steps"] == 4 and train["timed_steps"] == 3
    assert train["tokens_per_s"] == pytest.approx(train["tokens_per_step"] / train["seconds_per_step"])
    assert "AdamW" in train["optimizer"]


def _load_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("conan_gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_difference_metrics_hand_computed():
    import torch

    suite = _load_suite()
    reference = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    flexed = torch.tensor([[1.1, -4.0], [2.0, 0.3]])
    # max |a - b| = 0.2 (at 0.5 -> 0.3), max |b| = 4  ->  0.05
    assert suite.relative_difference(flexed, reference) == pytest.approx(0.05)
    grads = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, -10.0])}
    reference_grads = {"a": torch.tensor([1.0, 2.5]), "b": torch.tensor([10.0, -9.0])}
    # a: 0.5 / 2.5 = 0.2; b: 1 / 10 = 0.1  ->  worst is a
    worst, name = suite.worst_gradient_difference(grads, reference_grads)
    assert (worst, name) == (pytest.approx(0.2), "a")
    grads["b"] = torch.tensor([float("nan"), 0.0])
    worst, name = suite.worst_gradient_difference(grads, reference_grads)
    assert math.isnan(worst) and name == "b"  # a NaN gradient is reported, never hidden behind a max()


def test_padded_batch_sides():
    suite = _load_suite()
    ids, mask = suite.padded_batch([3, 1], 4, "left", vocab=50, device="cpu")
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] >= 3).all()
    _, mask = suite.padded_batch([3, 1], 4, "right", vocab=50, device="cpu")
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
