"""Evaluation as a new user meets it: STS JSONL files that training accepts, local models named by their folder,
training prompt names mapped to mteb's keys."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from helpers import _write_sts_jsonl


def _spearman_of_cosine(model, rows, prompt=None) -> float:
    from scipy.stats import spearmanr

    a = model.encode([r["sentence1"] for r in rows], prompt=prompt, normalize_embeddings=True)
    b = model.encode([r["sentence2"] for r in rows], prompt=prompt, normalize_embeddings=True)
    return float(spearmanr(np.sum(a * b, axis=1), [r["score"] for r in rows]).statistic)


def test_eval_reads_the_sts_jsonl_training_accepts(tiny_model_dir, tmp_path, capsys):
    from conan_hf.data.readers import DataFormatError
    from conan_hf.eval.__main__ import main
    from conan_hf.eval.tasks import infer_task_kind, read_sts

    plain = tmp_path / "sts-train.jsonl"
    rows = _write_sts_jsonl(plain)
    data = read_sts(plain)
    assert (data.sentence1, data.sentence2, data.score) == ([r["sentence1"] for r in rows],
                                                            [r["sentence2"] for r in rows],
                                                            [float(r["score"]) for r in rows])
    renamed = tmp_path / "pairs.jsonl"
    _write_sts_jsonl(renamed, names=("a", "b", "label"))
    assert read_sts(renamed, columns={"sentence1": "a", "sentence2": "b", "score": "label"}).score == data.score
    csv_file = tmp_path / "pairs.csv"  # header-less CSV by column index, as a training `columns:` mapping
    csv_file.write_text("".join(f'"{r["sentence1"]}","{r["sentence2"]}",{r["score"]}\n' for r in rows),
                        encoding="utf-8")
    assert read_sts(csv_file, columns={"sentence1": 0, "sentence2": 1, "score": 2}).sentence2 == data.sentence2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "sentence2": "b", '
                   '"score": "high"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: column 'score'"):
        read_sts(bad)
    assert infer_task_kind(plain) == "sts"
    mkqa = tmp_path / "mkqa.jsonl"
    mkqa.write_text('{"example_id": 1, "queries": {"en": "q"}, "answers": {}}\n', encoding="utf-8")
    assert infer_task_kind(mkqa) == "xling"

    # the command line, with inferred kind, and with a column mapping
    from sentence_transformers import SentenceTransformer

    expected = _spearman_of_cosine(SentenceTransformer(str(tiny_model_dir), trust_remote_code=True), rows)
    assert main(["--model", str(tiny_model_dir), "--data", str(plain), "--instruction-template", "none"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"LocalSTS-sts-train": pytest.approx(expected, abs=1e-6)}
    assert main(["--model", str(tiny_model_dir), "--task", "sts", "--data", str(renamed), "--columns",
                 "sentence1=a", "sentence2=b", "score=label", "--instruction-template", "none"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"LocalSTS-pairs": pytest.approx(expected, abs=1e-6)}


def test_eval_names_local_models_by_folder_and_keeps_their_results_apart(tiny_model_dir, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    from conan_hf.eval import evaluate, load_summary, sts_task

    sts_file = tmp_path / "sts.jsonl"
    rows = _write_sts_jsonl(sts_file)
    alpha, beta = tmp_path / "alpha", tmp_path / "weak" / "final"
    shutil.copytree(tiny_model_dir, alpha)
    other = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    with torch.no_grad():  # a different model: its scores differ
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other.save(str(beta))

    reports = {}
    for folder in (alpha, beta):
        model = SentenceTransformer(str(folder), trust_remote_code=True)  # an object, not a path
        reports[folder] = (evaluate(model, [sts_task(sts_file)], output_folder=tmp_path / "results",
                                    instruction_template=None), _spearman_of_cosine(model, rows))
    (ra, sa), (rb, sb) = reports[alpha], reports[beta]
    assert ra.settings["model_name"] == "local/alpha" and rb.settings["model_name"] == "local/weak-final"
    assert ra.results_dir != rb.results_dir
    assert sa != pytest.approx(sb, abs=1e-4)
    for report, score, folder in ((ra, sa, alpha), (rb, sb, beta)):
        summary = load_summary(report.results_dir / "summary.json")
        assert summary["settings"]["model_path"] == str(folder.resolve())
        assert [row["main_score"] for row in summary["tasks"]] == [pytest.approx(score, abs=1e-6)]


def test_eval_maps_training_prompt_names_to_mteb_keys_without_warnings(tiny_model_dir, tmp_path, caplog):
    import logging

    from sentence_transformers import SentenceTransformer

    from conan_hf.eval import evaluate, sts_task

    sts_file = tmp_path / "sts.jsonl"
    rows = _write_sts_jsonl(sts_file)
    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    sts_prompt = "Instruct: Retrieve semantically similar text\nQuery: "
    model.prompts = {"retrieval": "Instruct: Given a question, retrieve passages that answer it\nQuery: ",
                     "clr": "Instruct: Given an English sentence, retrieve its Chinese translation\nQuery: ",
                     "classification": "Instruct: Classify the activity described in the sentence\nQuery: ",
                     "sts": sts_prompt}  # the names stage 4 saves
    saved = dict(model.prompts)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        report = evaluate(model, [sts_task(sts_file)])
    prompt_warnings = [str(w.message) for w in caught if "prompt" in str(w.message).lower()]
    prompt_warnings += [r.getMessage() for r in caplog.records if "prompt" in r.getMessage().lower()]
    assert prompt_warnings == []
    assert model.prompts == saved  # the model itself is left as it was
    assert report.settings["prompts"] == {"Retrieval-query": saved["retrieval"], "Classification":
                                          saved["classification"], "STS": sts_prompt}
    # the STS task was encoded with the model's trained sts prompt
    expected = _spearman_of_cosine(model, rows, prompt=sts_prompt)
    assert expected != pytest.approx(_spearman_of_cosine(model, rows), abs=1e-4)
    assert report.main_scores["LocalSTS-sts"] == pytest.approx(expected, abs=1e-6)
