"""model_card: the generated README.md carries real numbers from a run (config, weights, stages, mteb results)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conan_hf.model_card import count_parameters, generate_model_card, load_run_info

STAGES = [
    {"stage": "weak", "config": {"output_dir": "runs/weak", "model": "runs/sft/final", "learning_rate": 2e-4,
                                 "temperature": 0.02, "max_seq_length": 64, "soft_mask_schedule": "linear",
                                 "seed": 42, "tasks": [{"name": "pairs", "type": "retrieval"}]},
     "summary": {"final_loss": 1.25}},
    {"stage": "supervised", "config": {"output_dir": "runs/supervised", "learning_rate": 5e-4, "num_negatives": 7,
                                       "matryoshka": True, "matryoshka_dims": None, "dhnm": True,
                                       "tasks": [{"name": "sts", "type": "sts"}, {"name": "retrieval",
                                                                                   "type": "retrieval"}]},
     "summary": {"final_loss": 0.5}},
]


@pytest.fixture()
def model_dir(tiny_model_dir, tmp_path):
    # generate_model_card writes README.md into the folder: work on a copy of the shared fixture
    target = tmp_path / "conan-tiny"
    shutil.copytree(tiny_model_dir, target)
    return target


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_renders_real_evaluation_numbers(model_dir, shared_data_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from conan_hf.eval import evaluate, sts_task
    from conan_hf.eval.xling import evaluate_cross_lingual, load_xquad

    model = SentenceTransformer(str(model_dir), trust_remote_code=True)
    task = sts_task(shared_data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv", limit=150)
    report = evaluate(model, [task], output_folder=tmp_path / "results")
    xling = evaluate_cross_lingual(model, load_xquad(shared_data_dir / "xling/xquad", languages=["de", "zh"],
                                                     limit_queries=40))
    card = generate_model_card(model_dir, run_info={"model_name": "conan-tiny-demo", "languages": ["en", "zh"],
                                                    "stages": STAGES},
                               results=[report, xling])
    assert (model_dir / "README.md").read_text(encoding="utf-8") == card

    score = report.main_scores[task.metadata.name]
    meta = _front_matter(card)
    assert meta["library_name"] == "sentence-transformers"
    assert meta["language"] == ["en", "zh"] and "matryoshka" in meta["tags"]
    index = {r["dataset"]["name"]: r for r in meta["model-index"][0]["results"]}
    sts_entry = index[f"MTEB {task.metadata.name} (default)"]
    assert sts_entry["task"]["type"] == "STS"
    assert sts_entry["metrics"][0] == {"type": "cosine_spearman", "value": round(100 * score, 3)}
    assert f"| {task.metadata.name} | STS | cosine_spearman | {100 * score:.2f} |" in card

    # the per-language cross-lingual table carries the evaluator's numbers
    for language, row in xling.per_language.items():
        assert (f"| {language} | {100 * row['ndcg_at_10']:.2f} | {100 * row['recall_at_20']:.2f} | "
                f"{100 * row['recall_at_100']:.2f} |") in card
    assert f"**{100 * xling.average['recall_at_20']:.2f}**" in card


def test_card_reads_architecture_weights_stages_and_prompts(model_dir, tmp_path):
    from safetensors.numpy import load_file

    stage_dir = tmp_path / "stages"
    stage_dir.mkdir()
    for i, stage in enumerate(STAGES):
        (stage_dir / f"{i}_{stage['stage']}.json").write_text(json.dumps(stage), encoding="utf-8")
    card = generate_model_card(model_dir, run_info=stage_dir, results=None)

    config = json.loads((model_dir / "config.json").read_text())
    n_params = sum(int(np.prod(t.shape)) for t in load_file(str(model_dir / "model.safetensors")).values())
    assert count_parameters(model_dir) == n_params
    assert f"({n_params:,})" in card
    assert f"| Hidden size | {config['hidden_size']} |" in card
    assert f"| Layers | {config['num_hidden_layers']} |" in card
    assert f"| Key/value heads | {config['num_key_value_heads']} |" in card
    # stage hyper-parameters as recorded, not the output paths
    assert "| `learning_rate` | 0.0002 |" in card and "| `learning_rate` | 0.0005 |" in card
    assert "| `num_negatives` | 7 |" in card and "runs/weak" not in card
    assert "Run summary: final_loss = 1.25" in card
    assert "| 2 | supervised |" in card and "sts (sts), retrieval (retrieval)" in card
    # Matryoshka dims derived from the supervised stage (matryoshka on, dims None -> defaults for 128)
    from conan_hf.losses import default_matryoshka_dims

    assert ", ".join(str(d) for d in default_matryoshka_dims(config["hidden_size"])) in card
    assert "_No evaluation results were provided._" in card
    assert "2509.12892" in card


def test_run_info_forms_agree(tmp_path):
    as_dict = load_run_info({"stages": STAGES})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"stages": STAGES}), encoding="utf-8")
    files = []
    for i, stage in enumerate(STAGES):
        files.append(tmp_path / f"stage{i}.json")
        files[-1].write_text(json.dumps(stage), encoding="utf-8")
    assert load_run_info(path)["stages"] == as_dict["stages"] == load_run_info(files)["stages"] == STAGES
    with pytest.raises(ValueError, match=r"run\.json:1"):
        path.write_text("{not json", encoding="utf-8")
        load_run_info(path)


def test_card_reads_results_from_summary_folder(model_dir, shared_data_dir, tmp_path):
    from conan_hf.eval import evaluate, sts_task

    task = sts_task(shared_data_dir / "sts/sick/SICK_trial.txt", limit=100)
    report = evaluate(str(model_dir), [task], output_folder=tmp_path / "results", dim=64)
    card = generate_model_card(model_dir, results=tmp_path / "results")
    assert f"| {task.metadata.name} | STS | cosine_spearman | {100 * report.main_scores[task.metadata.name]:.2f} |" \
        in card
