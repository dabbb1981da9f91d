"""Bad input data gives a clear error naming the file and its 1-based line, and nothing is silently changed or dropped:
non-finite scores, texts that are not strings, empty and missing data files."""

from __future__ import annotations

import pytest

from conan_hf.data.readers import Row, read_beir, read_qrels, read_stsb_multi_mt, read_table
from conan_hf.data.sources import read_sources
from conan_hf.errors import DataError, DataFileNotFoundError, finite_float
from conan_hf.eval import tasks as eval_tasks
from conan_hf.stages.supervised import TaskConfig, task_rows
from conan_hf.stages.weak import to_pairs

from helpers import _write


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-Infinity"])
def test_training_rejects_non_finite_csv_scores_with_the_physical_line(tmp_path, bad):
    # Header on line 1: the bad score is on physical line 3.
    data = _write(tmp_path / "sts.csv", f"sentence1,sentence2,score\na,b,1.5\nc,d,{bad}\ne,f,2\n")
    task = TaskConfig(name="sts", type="sts", data=[str(data)])
    with pytest.raises(DataError, match=rf"sts\.csv:3: .*column 'score': '{bad}' is not a finite number"):
        task_rows(task)


def test_training_rejects_json_nan_literals_and_booleans(tmp_path):
    # json.loads reads the bare literals NaN / Infinity as floats; a boolean is not a score either.
    for line, value in ((2, "NaN"), (2, "Infinity"), (2, "true")):
        data = _write(tmp_path / "sts.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 3}\n'
                      f'{{"sentence1": "c", "sentence2": "d", "score": {value}}}\n')
        with pytest.raises(DataError, match=rf"sts\.jsonl:{line}: .*'score'"):
            task_rows(TaskConfig(name="sts", type="sts", data=[str(data)]))
    good = _write(tmp_path / "good.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 3}\n'
                  '{"sentence1": "c", "sentence2": "d", "score": "4.5"}\n')
    rows, _ = task_rows(TaskConfig(name="sts", type="sts", data=[str(good)]))
    assert [r["score"] for r in rows] == [3.0, 4.5]


def test_finite_float_by_hand():
    assert finite_float("2.5") == 2.5 and finite_float(3) == 3.0
    for bad in ("nan", "inf", "-inf", float("nan"), True, [1.0], None, "high"):
        with pytest.raises(ValueError):
            finite_float(bad)


def test_eval_readers_reject_non_finite_scores(tmp_path):
    # Evaluation reads through conan_hf.data.readers, so the errors are the training readers' ones.
    with pytest.raises(eval_tasks.DataFormatError, match=r"stsb\.csv:2: column 'score': cannot convert 'nan'"):
        eval_tasks.read_sts(_write(tmp_path / "stsb.csv", "a,b,4.0\nc,d,nan\n"))
    with pytest.raises(eval_tasks.DataFormatError, match=r"zh\.txt:3: column 'score': cannot convert 'inf'"):
        eval_tasks.read_sts(_write(tmp_path / "zh.txt", "a\tb\t1\nc\td\t2\ne\tf\tinf\n"))
    sick = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\n1\ta\tb\t4.5\n2\tc\td\tNaN\n"
    with pytest.raises(eval_tasks.DataFormatError, match=r"sick\.txt:3: column 'score': cannot convert 'NaN'"):
        eval_tasks.read_sts(_write(tmp_path / "sick.txt", sick))
    # A quoted CSV field spanning two lines: the error names the physical line the bad record starts on.
    with pytest.raises(eval_tasks.DataFormatError, match=r"multi\.csv:3: column 'score'"):
        eval_tasks.read_sts(_write(tmp_path / "multi.csv", '"a\nstill a",b,1\nc,d,nan\n'))
    # A relevance of inf used to escape as an OverflowError traceback.
    qrels = _write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\tinf\n")
    with pytest.raises(eval_tasks.DataFormatError, match=r"qrels\.tsv:3: score 'inf' is not a finite number"):
        read_qrels(qrels)


def test_training_readers_reject_non_finite_scores(tmp_path):
    folder = tmp_path / "stsb"
    folder.mkdir()
    _write(folder / "stsb-en-dev.csv", "a,b,1\nc,d,nan\n")
    with pytest.raises(DataError, match=r"stsb-en-dev\.csv:2: column 'score': cannot convert 'nan'"):
        read_stsb_multi_mt(folder, "en")
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    _write(beir / "corpus.jsonl", '{"_id": "d1", "text": "x"}\n')
    _write(beir / "queries.jsonl", '{"_id": "q1", "text": "y"}\n')
    _write(beir / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\nq1\td1\tinf\n")
    with pytest.raises(DataError, match=r"train\.tsv:2: score 'inf' is not a finite number"):
        read_beir(beir, split="train")


def test_non_string_texts_are_rejected_with_file_line_and_column(tmp_path):
    retrieval = _write(tmp_path / "qa.jsonl", '{"query": "a", "positive": "b"}\n\n{"query": 12, "positive": "p"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:3: .*column 'query' must be a text, got int 12"):
        task_rows(TaskConfig(name="qa", type="retrieval", data=[str(retrieval)]))
    sts = _write(tmp_path / "sts.jsonl", '{"sentence1": ["a"], "sentence2": "b", "score": 1}\n')
    with pytest.raises(DataError, match=r"sts\.jsonl:1: .*column 'sentence1' must be a text, got list"):
        task_rows(TaskConfig(name="sts", type="sts", data=[str(sts)]))
    labelled = _write(tmp_path / "cls.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": 3}\n')
    with pytest.raises(DataError, match=r"cls\.jsonl:2: .*column 'label' must be a text, got int 3"):
        task_rows(TaskConfig(name="cls", type="classification", data=[str(labelled)]))
    negatives = _write(tmp_path / "neg.jsonl", '{"query": "a", "positive": "b", "negatives": ["c", 4.5]}\n')
    with pytest.raises(DataError, match=r"neg\.jsonl:1: .*a negative must be a text, got float 4.5"):
        task_rows(TaskConfig(name="qa", type="retrieval", data=[str(negatives)]))
    # Strings pass through unchanged.
    fine = _write(tmp_path / "fine.jsonl", '{"query": "a", "positive": "b", "negative_1": "c"}\n')
    rows, candidates = task_rows(TaskConfig(name="qa", type="retrieval", data=[str(fine)]))
    assert (rows, candidates) == ([{"id": "qa/0", "anchor": "a", "positive": "b"}], [["c"]])


def test_weak_pairs_reject_non_string_texts_and_name_the_row():
    rows = [Row({"instruction": "find it", "input": "x", "output": "y"}, "weak.jsonl:1"),
            Row({"instruction": "find it", "input": 7, "output": "y"}, "weak.jsonl:2")]
    with pytest.raises(DataError, match=r"weak\.jsonl:2: .*column 'input' must be a text, got int 7"):
        to_pairs(rows)
    assert to_pairs(rows[:1]) == [{"instruction": "find it", "anchor": "x", "positive": "y"}]
    # Rows without a location (a plain list given to to_pairs) are named by their 1-based position.
    with pytest.raises(DataError, match=r"stage 3 data row 2: .*column 'positive' must be a text"):
        to_pairs([{"query": "q", "positive": "p"}, {"query": "q", "positive": 1.0}])


def test_tokenizer_stage_rejects_non_string_texts(tmp_path):
    from conan_hf.stages import tokenizer as tokenizer_stage
    from conan_hf.training.config import config_from_dict

    data = _write(tmp_path / "texts.jsonl", '{"text": "fine"}\n{"text": 5}\n')
    config = config_from_dict(tokenizer_stage.TokenizerConfig, {"data": [str(data)], "output_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"texts\.jsonl:2: stage 0 \(tokenizer\) data: column 'text' must be a text"):
        tokenizer_stage.run(config)


def test_messages_name_each_source_file_and_its_own_line(tmp_path):
    first = _write(tmp_path / "first.jsonl", "".join(f'{{"query": "q{i}", "positive": "p{i}"}}\n' for i in range(4)))
    # Line 5 of the second file lacks `positive`: it is row 9 of the sources joined, row 4 counting from 0 in its file.
    second = _write(tmp_path / "second.jsonl", "".join(f'{{"query": "q{i}", "positive": "p{i}"}}\n' for i in range(4))
                    + '{"query": "lonely"}\n')
    with pytest.raises(DataError, match=r"second\.jsonl:5: stage 4 task 'qa' \(retrieval\): no \['positive'\]"):
        task_rows(TaskConfig(name="qa", type="retrieval", data=[str(first), str(second)]))
    # Stage 3 reads any columns; its own check names the row's file and line too (was "stage 3 data row 8").
    with pytest.raises(DataError, match=r"second\.jsonl:5: .*needs instruction/input/output or query/positive"):
        to_pairs(read_sources([str(first), str(second)], list, required=[]))
    # CSV: the physical line, header included; a blank line in between still counts.
    csv_file = _write(tmp_path / "sts.csv", "sentence1,sentence2,score\na,b,1\n\nc,d,high\n")
    with pytest.raises(DataError, match=r"sts\.csv:4: "):
        task_rows(TaskConfig(name="sts", type="sts", data=[str(csv_file)]))
    # Demo rows are named "demo row N" (1-based).
    with pytest.raises(DataError, match=r"demo row 2: demo data: column 'text' must be a text, got int 3"):
        read_sources(["demo"], lambda: [{"text": "a"}, {"text": 3}], required=["text"], text=["text"],
                     what="demo data")
    rows = read_sources(["demo", str(first)], lambda: [{"text": "a"}], required=[])
    assert [r.location for r in rows] == ["demo row 1"] + [f"{first}:{i}" for i in range(1, 5)]


def test_empty_data_files_fail_naming_the_file(tmp_path):
    for name in ("empty.csv", "empty.jsonl", "blank.jsonl"):
        empty = _write(tmp_path / name, "sentence1,sentence2,score\n" if name.endswith(".csv") else "\n" * (
            name == "blank.jsonl"))
        with pytest.raises(DataError, match=rf"{name}: stage 4 task 'sts' \(sts\): no rows \(the source is empty\)"):
            task_rows(TaskConfig(name="sts", type="sts", data=[str(empty)]))
    only_bad = _write(tmp_path / "bad.jsonl", '{"query": "a"}\n{"query": "b"}\n')
    source = {"path": str(only_bad), "columns": {"query": "query", "positive": "positive"}, "on_error": "skip"}
    with pytest.raises(DataError, match=r"bad\.jsonl: .*no rows \(all 2 rows were bad and skipped\)"):
        read_sources([source], list, required=["query"])


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"nope\.jsonl: no such"):
        read_table(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers that catch that
        eval_tasks.read_sts(tmp_path / "nope.csv")
