"""The ablation harness (benchmarks/ablation.py): its tables report exactly what it measured.

The smoke run trains the shared stages and two variants with two seeds on the real shared data (skipped without
``CONAN_DATA_DIR``); the table cells are recomputed here from the JSON with naive formulas, the DHNM counts and
stage-4 steps from the runs' stage records, and one model is re-evaluated to check the JSON holds what the evaluation
gives. The paper's numbers are parsed from the paper's text (skipped without it); chance levels are checked against
Monte Carlo; identical-row marking on a constructed result.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "paper" / "conan-embedding-v2-arxiv-2509.12892.txt"
if not PAPER.is_file():
    PAPER = Path("/work/shared/paper/conan-embedding-v2-arxiv-2509.12892.txt")


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
    for by_seed in result["runs"].values():
        assert set(by_seed) == {"0", "1"}
        for scores in by_seed.values():
            assert set(scores) == set(metrics)
            assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in scores.values()), scores

    # Metrics on which SM's mean (×100) stays below the chance bound are dropped; the others make the columns.
    chance = result["chance"]
    dropped = [m for m in metrics if 100 * sum(s[m] for s in result["runs"]["SM"].values()) / 2
               < chance[m]["bound"]]
    # Table 4 cells, recomputed from the JSON: Eng = mean(STS-B en, SciFact), Zh = STS-B zh, Multi = mean(xSTS,
    # XQuAD, Tatoeba) over the metrics not dropped, ×100, mean ± sample std over the seeds.
    columns = {"Multi": ("xsts", "xquad_r20", "tatoeba_acc"), "Eng": ("sts_en", "scifact_ndcg10"), "Zh": ("sts_zh",)}
    columns = {c: [n for n in names if n not in dropped] for c, names in columns.items()}
    expected = {}
    for variant in ("SM", "SM+CLR+DHNM"):
        row = _table_row(md, "## Table 4", variant)
        assert row[1] == "2"
        for index, (column, names) in enumerate(columns.items()):
            if not names:
                assert row[2 + index] == "dropped"
                continue
            values = [100 * sum(s[n] for n in names) / len(names) for s in result["runs"][variant].values()]
            expected[variant, column] = _mean_std(values)
            assert row[2 + index] == f"{expected[variant, column][0]:.2f} ± {expected[variant, column][1]:.2f}"
    full = _table_row(md, "## Table 4", "SM+CLR+DHNM")
    for index, column in enumerate(columns):
        if not columns[column]:
            continue
        (m1, s1), (m0, s0) = expected["SM+CLR+DHNM", column], expected["SM", column]
        delta, pooled = m1 - m0, math.sqrt((s1 ** 2 + s0 ** 2) / 2)
        verdict = "significant" if abs(delta) > 2 * pooled else "within seed noise"
        assert full[8 + index] == f"{delta:+.2f} ({verdict})"
    # The paper's numbers stand beside ours (Table 12: SM only, linear = SM).
    assert full[5:8] == ["65.17", "73.52", "74.24"]
    assert _table_row(md, "## Table 12", "linear")[1:4] == [
        f"{expected['SM', c][0]:.2f} ± {expected['SM', c][1]:.2f}" if columns[c] else "dropped" for c in columns]
    assert "†" not in md
    # Every-metric table: the kept metrics of SM.
    kept = [m for m in metrics if m not in dropped]
    assert _table_row(md, "## Every metric per variant", "SM")[6:6 + len(kept)] == [
        "{:.2f} ± {:.2f}".format(*_mean_std([100 * s[m] for s in result["runs"]["SM"].values()])) for m in kept]

    # Chance levels printed beside the metrics, equal to the JSON's; SciFact's within its exact range (one relevant
    # document in at most 60: at least 100 * 4.54 / 60 ... at most the 1-in-N value times the relevant count).
    assert set(chance) == set(metrics)
    assert chance["tatoeba_acc"]["chance"] == pytest.approx(100 / 30)
    assert chance["sts_en"] == {"chance": 0.0, "bound": pytest.approx(300 / math.sqrt(39))}
    for metric in metrics:
        row = _table_row(md, "## Chance levels", metric)
        assert row[1:3] == [f"{chance[metric]['chance']:.2f}", f"{chance[metric]['bound']:.2f}"]
        sm = _mean_std([100 * s[metric] for s in result["runs"]["SM"].values()])
        assert row[5].startswith("**at chance: dropped**" if sm[0] < chance[metric]["bound"] else "above chance")
        assert (metric in dropped) == (sm[0] < chance[metric]["bound"])
    assert _table_row(md, "## Every metric per variant", "chance")[6:6 + len(kept)] == [
        f"{chance[m]['chance']:.2f}" for m in kept]

    # DHNM made / used by clause and the stage-4 steps, from each run's stage-4 record; one step budget for all.
    records = {}
    for variant, by_seed in result["models"].items():
        for seed, final in by_seed.items():
            record = json.loads((Path(final) / "conan_stage.json").read_text(encoding="utf-8"))["summary"]
            records[variant, seed] = record
            assert result["records"][variant][seed]["stage4_steps"] == record["global_step"]
    assert len({r["global_step"] for r in records.values()}) == 1
    full_row = _table_row(md, "## Table 4", "SM+CLR+DHNM")
    for index, kind in ((11, "replaced"), (12, "used")):
        totals = {k: sum(records["SM+CLR+DHNM", s]["dhnm"][k] for s in ("0", "1"))
                  for k in (kind, kind + "_low_s0", kind + "_easy")}
        assert full_row[index] == f"{totals[kind]} ({totals[kind + '_low_s0']} low S0, {totals[kind + '_easy']} easy)"
        assert totals[kind] == totals[kind + "_low_s0"] + totals[kind + "_easy"]
    assert full_row[13] == str(records["SM", "0"]["global_step"])
    assert _table_row(md, "## Table 4", "SM")[11:13] == ["off", "off"]
    assert records["SM", "0"]["dhnm"] is None

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
    assert _table_row(table, "| model", "3 mined negatives + DHNM, lr 2e-5 (`--learning_rate 2e-5`)")[2].endswith(
        "(Δ base -10.00: one seed: no noise estimate)")
    assert "static mined" not in table


@pytest.mark.skipif(not PAPER.is_file(), reason="needs the paper's text (../shared/paper)")
def test_paper_numbers_equal_the_papers_text():
    harness = _harness()
    text = PAPER.read_text(encoding="utf-8")
    number = r"(\d+\.\d\d)"
    # Table 4: six rows of three numbers right above its caption, in the order the paper's §4.5 names them.
    block = text.split("Table 4: Results of ablation study")[0].rsplit("SM CLR DHNM Multi Eng Zh", 1)[1]
    rows = [tuple(map(float, r)) for r in re.findall(rf"^{number} {number} {number}$", block, flags=re.MULTILINE)]
    assert len(rows) == 6
    assert "(Row 2)" in text and "(Row 3)" in text and "SM+CLR (Row 4)" in text and "SM+DHNM (Row 5)" in text
    assert [harness.PAPER_TABLE4[k] for k in ("SM", "CLR", "DHNM", "SM+CLR", "SM+DHNM", "SM+CLR+DHNM")] == rows
    # Table 6: "LoRA r=16r=16 72.18 72.12" ... "Full fine-tuning 71.50 73.52" (w/o, w/ SoftMask).
    block = text.split("Table 6: Results on MTEB English")[0].rsplit("w/o SoftMask w/ SoftMask", 1)[1]
    table6 = {}
    for rank, hard, soft in re.findall(rf"LoRA r=(\d+)r=\d+ {number} {number}", block):
        table6["hard", f"LoRA r={rank}"], table6["soft", f"LoRA r={rank}"] = float(hard), float(soft)
    hard, soft = re.search(rf"Full fine-tuning {number} {number}", block).groups()
    table6["hard", "full"], table6["soft", "full"] = float(hard), float(soft)
    assert harness.PAPER_TABLE6_ENG == table6
    # Table 12 (App. C).
    block = text.split("Table 12: Results of different soft mask functions")[0].rsplit("Function Multi Eng Zh", 1)[1]
    table12 = {name.lower(): tuple(map(float, nums)) for name, *nums in
               re.findall(rf"^(Linear|Accelerating|Decelerating) {number} {number} {number}$", block,
                          flags=re.MULTILINE)}
    assert harness.PAPER_TABLE12 == table12
    assert table12 == {"linear": (61.73, 70.41, 70.99), "accelerating": (61.50, 70.51, 70.81),
                       "decelerating": (61.43, 70.01, 70.37)}


def test_random_ndcg_at_10_equals_monte_carlo():
    harness = _harness()
    rng = random.Random(0)

    def ndcg(ranking: list[int], gains: dict[int, float]) -> float:
        dcg = sum(gains.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(ranking[:10]))
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains.values(), reverse=True)[:10]))
        return dcg / ideal

    for gains, n in (([1.0], 60), ([1.0, 1.0, 1.0], 25), ([2.0, 1.0], 12)):
        docs = list(range(n))
        relevant = dict(zip(docs, gains))
        values = []
        for _ in range(20000):
            rng.shuffle(docs)
            values.append(ndcg(docs, relevant))
        mean, std = _mean_std(values)
        # Within 4 standard errors of the Monte Carlo mean (and 4 errors are < 10 % of the value: a real check).
        assert abs(harness.random_ndcg_at_10(gains, n) - mean) < 4 * std / math.sqrt(len(values)) < 0.1 * mean
    assert harness.random_ndcg_at_10([1.0], 100) == pytest.approx(0.0454, abs=1e-4)


def test_identical_rows_are_marked_identical_and_at_chance_metrics_flagged():
    harness = _harness()
    sm = {"0": {m: 0.10 + 0.01 * i for i, m in enumerate(harness.METRICS)},
          "1": {m: 0.12 + 0.01 * i for i, m in enumerate(harness.METRICS)}}
    runs = {"SM": sm, "SM+DHNM": json.loads(json.dumps(sm)),  # bit-identical copy
            "SM+CLR": {s: {m: v + 0.05 for m, v in sc.items()} for s, sc in sm.items()},
            "decelerating": {"0": sm["0"]}}  # equal on seed 0 only: not identical
    assert harness.identical_rows(runs) == {"SM+DHNM": "SM"}
    chance = {m: {"chance": 0.0, "bound": 15.0} for m in harness.METRICS}
    chance["tatoeba_acc"] = {"chance": 5.0, "bound": 15.0}
    result = {"runs": runs, "seconds": {}, "meta": {"scale": "cpu", "protocol": dict(harness.PROTOCOL),
              "model": "tiny", "parameters": 1, "vocab": 10, "sizes": {}, "seconds": 1.0}, "chance": chance,
              "records": {"SM+DHNM": {s: {"stage3_steps": 3, "stage4_steps": 12, "dhnm": dict.fromkeys(
                  harness.DHNM_KEYS, 0)} for s in sm}}}
    md = harness.markdown(result)
    row = _table_row(md, "## Table 4", "SM+DHNM")
    assert row[8:11] == ["identical to SM"] * 3 and row[-1] == "identical to SM"
    assert row[11:14] == ["0 (0 low S0, 0 easy)", "0 (0 low S0, 0 easy)", "12"]
    assert "within seed noise" not in " ".join(row)
    assert _table_row(md, "## Table 4", "SM+CLR")[-1] == ""
    assert _table_row(md, "## Every metric per variant", "decelerating")[-1] == ""
    # SM means ×100: sts_en 11, sts_zh 12, xsts 13, scifact 14 (< 15: at chance), xquad 15, tatoeba 16 (>= 15).
    assert harness.at_chance(result) == {"sts_en": True, "sts_zh": True, "xsts": True, "scifact_ndcg10": True,
                                         "xquad_r20": False, "tatoeba_acc": False}
    assert _table_row(md, "## Chance levels", "tatoeba_acc")[1:] == ["5.00", "15.00", "16.00 ± 1.41", "3.2×",
                                                                     "above chance: reported"]
    assert _table_row(md, "## Chance levels", "scifact_ndcg10")[5].startswith("**at chance: dropped**")
    # Metrics at chance are dropped from the tables and columns: Multi = mean(xquad, tatoeba), Eng and Zh dropped.
    assert harness.dropped_metrics(result) == ["sts_en", "sts_zh", "xsts", "scifact_ndcg10"]
    assert "| n | xquad_r20 | tatoeba_acc | DHNM made |" in md
    sm_row = _table_row(md, "## Table 4", "SM")
    assert sm_row[2:5] == ["15.50 ± 1.41", "dropped", "dropped"]  # mean of (14 + 15)/2 and (16 + 17)/2, ×100
    assert "OLD runs" not in md
    del result["meta"]["protocol"]  # a file of the older harness says so
    assert "These are the OLD runs" in harness.markdown(result)


def test_stage3_lora_trains_adapters_under_the_soft_mask_and_saves_a_merged_model(tiny_model_dir, tmp_path):
    """Table 6's LoRA rows train LoRA where the soft mask acts: stage 3 with ``lora`` runs the α schedule to 1 and
    saves a plain checkpoint (same tensors as its input, no adapter keys) in which only linear projections moved."""
    import torch
    from safetensors.torch import load_file

    from conan_hf.stages import weak
    from conan_hf.training.config import config_from_dict

    threads = torch.get_num_threads()
    try:
        config = config_from_dict(weak.WeakConfig, {
            "model": str(tiny_model_dir), "output_dir": str(tmp_path / "weak"), "lora": {"r": 4, "lora_alpha": 8},
            "max_steps": 3, "per_device_train_batch_size": 8, "max_seq_length": 48, "learning_rate": 1e-2,
            "bf16": False, "num_threads": 1, "disable_tqdm": True, "logging_steps": 1})
        summary = weak.run(config)
    finally:
        torch.set_num_threads(threads)
    final = Path(summary["final_dir"])
    assert summary["final_alpha"] == 1.0 and summary["attention_mode"] == "bidirectional"
    assert summary["soft_mask_alphas"] == [(s, pytest.approx(s / 3)) for s in (1, 2, 3)]
    record = json.loads((final / "conan_stage.json").read_text(encoding="utf-8"))
    assert record["config"]["lora"] == {"r": 4, "lora_alpha": 8}
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed
