"""The ablation harness (benchmarks/ablation.py, issue 13): its tables report exactly what it measured.

The smoke run trains the shared stages and two variants with two seeds on the real shared data (skipped without
``CONAN_DATA_DIR``); the table cells are recomputed here from the JSON with naive formulas, and one model is
re-evaluated to check the JSON holds what the evaluation gives.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("ablation_harness", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _table_row(markdown: str, heading: str, first_cell: str) -> list[str]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {heading!r}")


def test_difference_is_significant_only_beyond_two_pooled_std():
    harness = _harness()
    # pooled std = sqrt((1² + 1²)/2) = 1: Δ = 2.5 is beyond 2, Δ = 1.5 is not; one seed never is.
    assert harness.difference((12.5, 1.0, 3), (10.0, 1.0, 3)) == (2.5, True)
    assert harness.difference((11.5, 1.0, 3), (10.0, 1.0, 3)) == (1.5, False)
    assert harness.difference((20.0, 0.0, 1), (10.0, 0.0, 1))[1] is False
    # pooled std = sqrt((3² + 1²)/2) = sqrt(5) ≈ 2.236: Δ = 4.4 < 4.47 is inside the noise.
    assert harness.difference((14.4, 3.0, 3), (10.0, 1.0, 3))[1] is False


def _result(runs: dict, baseline: dict, invocation: dict) -> dict:
    return {"runs": runs, "baseline": baseline, "seconds": {f"{v}/{s}": 10.0 for v, by in runs.items() for s in by},
            "models": {v: {s: f"/m/{v}-{s}" for s in by} for v, by in runs.items()},
            "meta": {"scale": "cpu", "sizes": {"sft": 5}}, "invocations": [invocation]}


def test_merge_adds_other_invocations_runs_and_refuses_another_checkpoint():
    harness = _harness()
    scores = {m: 0.1 for m in harness.METRICS}
    first = _result({"SM": {"0": scores}}, {"sts_en": 0.4},
                    {"started": 100.0, "seconds": 50.0, "shared_stages_seconds": 20.0, "cpu_seconds": 40.0,
                     "cpu_count": 2, "load_1min": [1.0, 3.0]})
    second = _result({"hard": {"0": scores, "1": scores}}, {"sts_en": 0.4},
                     {"started": 110.0, "seconds": 60.0, "shared_stages_seconds": 25.0, "cpu_seconds": 45.0,
                      "cpu_count": 2, "load_1min": [5.0]})
    harness.merge_results(first, second, "second.json")
    assert set(first["runs"]) == {"SM", "hard"} and set(first["runs"]["hard"]) == {"0", "1"}
    assert first["models"]["hard"]["1"] == "/m/hard-1" and first["seconds"]["hard/1"] == 10.0
    assert len(first["invocations"]) == 2
    # Summed wall 50 + 60 = 110 s, side by side from 100 to 170 = 70 s, CPU 85 s, load mean (1 + 3 + 5)/3 = 3.0.
    sentence = harness.wall_time_sentence(first)
    assert "110 s" in sentence and "70 s" in sentence and "CPU time 85 s" in sentence
    assert "3.0 on average (max 5.0)" in sentence

    other_checkpoint = _result({"SM+CLR": {"0": scores}}, {"sts_en": 0.5}, second["invocations"][0])
    with pytest.raises(ValueError, match="other.json.*not the same shared checkpoint"):
        harness.merge_results(first, other_checkpoint, "other.json")
    conflicting = _result({"SM": {"0": {**scores, "sts_en": 0.9}}}, {"sts_en": 0.4}, second["invocations"][0])
    with pytest.raises(ValueError, match="SM seed 0"):
        harness.merge_results(first, conflicting, "conflict.json")


def test_without_data_dir_it_skips_cleanly(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CONAN_DATA_DIR", raising=False)
    assert _harness().main(["--scale", "smoke", "--results-dir", str(tmp_path)]) == 0
    assert "CONAN_DATA_DIR" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.environ.get("CONAN_DATA_DIR"), reason="needs the shared real data (CONAN_DATA_DIR)")
def test_smoke_run_writes_tables_that_equal_its_measurements(tmp_path):
    harness = _harness()
    results = tmp_path / "results"
    assert harness.main(["--scale", "smoke", "--results-dir", str(results), "--work-dir", str(tmp_path / "work"),
                         "--fresh"]) == 0
    md = (results / "ablation_smoke.md").read_text(encoding="utf-8")
    png = (results / "ablation_smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    result = json.loads((results / "ablation_smoke.json").read_text(encoding="utf-8"))
    metrics = ("sts_en", "sts_zh", "xsts", "scifact_ndcg10", "xquad_r20", "tatoeba_acc")
    assert set(result["runs"]) == {"SM", "SM+CLR+DHNM"}
    for variant, by_seed in result["runs"].items():
        assert set(by_seed) == {"0", "1"}
        for scores in by_seed.values():
            assert set(scores) == set(metrics)
            assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in scores.values()), scores

    # Table 4 cells, recomputed from the JSON: Eng = mean(STS-B en, SciFact), Zh = STS-B zh, Multi = mean(xSTS,
    # XQuAD, Tatoeba), ×100, mean ± sample std over the seeds.
    columns = {"Multi": ("xsts", "xquad_r20", "tatoeba_acc"), "Eng": ("sts_en", "scifact_ndcg10"), "Zh": ("sts_zh",)}
    expected = {}
    for variant in ("SM", "SM+CLR+DHNM"):
        row = _table_row(md, "## Table 4", variant)
        assert row[1] == "2"
        for index, (column, names) in enumerate(columns.items()):
            values = [100 * sum(s[n] for n in names) / len(names) for s in result["runs"][variant].values()]
            expected[variant, column] = _mean_std(values)
            assert row[2 + index] == f"{expected[variant, column][0]:.2f} ± {expected[variant, column][1]:.2f}"
    full = _table_row(md, "## Table 4", "SM+CLR+DHNM")
    for index, column in enumerate(columns):
        (m1, s1), (m0, s0) = expected["SM+CLR+DHNM", column], expected["SM", column]
        delta, pooled = m1 - m0, math.sqrt((s1 ** 2 + s0 ** 2) / 2)
        verdict = "significant" if abs(delta) > 2 * pooled else "within seed noise"
        assert full[8 + index] == f"{delta:+.2f} ({verdict})"
    # The paper's numbers stand beside ours.
    assert full[5:8] == ["65.17", "73.52", "74.24"]
    # Every-metric table: STS-B en of SM.
    sts_en = _mean_std([100 * s["sts_en"] for s in result["runs"]["SM"].values()])
    assert _table_row(md, "## Every metric per variant", "SM")[6] == f"{sts_en[0]:.2f} ± {sts_en[1]:.2f}"

    # The JSON holds what the package's evaluation measures: re-evaluate one trained model.
    again = harness.evaluate_model(result["models"]["SM"]["0"], Path(os.environ["CONAN_DATA_DIR"]),
                                   result["meta"]["evaluation"], harness.SCALES["smoke"])
    assert again == pytest.approx(result["runs"]["SM"]["0"], abs=1e-5)


def test_minilm_summary_gives_mean_std_over_seeds_and_the_verdict_against_the_base():
    spec = importlib.util.spec_from_file_location("minilm_stage4", ROOT / "benchmarks" / "minilm_stage4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sts, ndcg = "stsb_en_dev_spearman", "scifact_heldout_ndcg@10"
    results = {"base": {sts: 0.80, ndcg: 0.70},
               # SciFact 0.75/0.76/0.77: mean 76.00, std 1.00, Δ +6.00 > 2 → improves; STS 0.79/0.81/0.80: Δ 0.
               **{f"inbatch-s{i}": {sts: v, ndcg: w} for i, (v, w) in enumerate([(0.79, 0.75), (0.81, 0.76),
                                                                                 (0.80, 0.77)])},
               "dhnm-s0": {sts: 0.70, ndcg: 0.70}}
    table = module.summarize(results)
    inbatch = _table_row(table, "| model", "in-batch negatives only")
    assert inbatch[1] == "3"
    assert inbatch[2] == "80.00 ± 1.00 (Δ base +0.00: no change beyond seed noise)"
    assert inbatch[3] == "76.00 ± 1.00 (Δ base +6.00: improves)"
    assert _table_row(table, "| model", "DHNM (`dhnm: true`)")[2].endswith("(Δ base -10.00: one seed: no noise estimate)")
    assert "static mined" not in table
