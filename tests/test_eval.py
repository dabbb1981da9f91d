"""conan_hf.eval: local mteb tasks, evaluate(), MKQA-style cross-lingual retrieval, Fig. 3 plot, CLI.

Scores computed by mteb are checked against independent computations written here (scipy Spearman of cosine, a
naive nDCG@10 / Recall@k, nearest-neighbour bitext accuracy) on real data from ``$CONAN_DATA_DIR``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from conan_hf.eval import tasks as local_tasks
from conan_hf.eval.tasks import DataFormatError

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages\nQuery:\n"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ readers --------


def test_readers_parse_every_sts_format(shared_data_dir):
    stsb = local_tasks.read_sts(shared_data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv", limit=5)
    sick = local_tasks.read_sts(shared_data_dir / "sts/sick/SICK_trial.txt", limit=5)
    chinese = local_tasks.read_sts(shared_data_dir / "sts/zh/sts-b-dev.txt", limit=5)
    assert local_tasks.infer_sts_format(shared_data_dir / "sts/sick/SICK_trial.txt") == "sick"
    assert local_tasks.infer_sts_format(shared_data_dir / "sts/zh/sts-b-dev.txt") == "tsv"
    first_sick = (shared_data_dir / "sts/sick/SICK_trial.txt").read_text(encoding="utf-8").splitlines()[1].split("\t")
    assert (sick.sentence1[0], sick.sentence2[0], sick.score[0]) == (first_sick[1], first_sick[2], float(first_sick[3]))
    first_zh = (shared_data_dir / "sts/zh/sts-b-dev.txt").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert (chinese.sentence1[0], chinese.score[0]) == (first_zh[0], float(first_zh[2]))
    assert len(stsb) == 5 and all(0 <= s <= 5 for s in stsb.score)
    assert local_tasks.guess_language(shared_data_dir / "sts/zh/sts-b-dev.txt", chinese.sentence1) == "zho-Hans"


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,4.0\nc,d,not-a-number\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv:2: column 'score': cannot convert 'not-a-number'"):
        local_tasks.read_sts(bad)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("x\ty\t1\nx\ty\tentailment\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"pairs\.txt:2: column 'label': .*a pair label must be 0 or 1"):
        local_tasks.read_pairs(pairs)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2"\n', encoding="utf-8")
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n', encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: invalid JSON"):
        local_tasks.beir_retrieval_data(beir)


# Small generated STS data: distinct sentences (no cosine ties), known scores; one text has a comma and a quote.
GENERATED_STS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A woman is slicing an onion.", "Someone cuts vegetables, slowly.", 3.2),
    ("The cat sleeps on the sofa.", "A dog runs in the park.", 0.4),
    ("Two kids play football outside.", "Children are playing soccer.", 4.1),
    ("The stock market fell today.", "Shares dropped sharply on Monday.", 3.6),
    ("She said \"hello\" to him.", "He ignored the greeting.", 1.5),
    ("A plane is taking off.", "An airplane departs from the runway.", 4.4),
    ("The soup is too salty.", "The weather is sunny.", 0.0),
    ("He reads a book at night.", "A man is reading before sleep.", 3.9),
    ("The river floods every spring.", "Spring brings high water to the river.", 4.0),
    ("A chef cooks pasta.", "Pasta is being prepared by a cook.", 4.6),
    ("The train was late.", "I like green tea.", 0.2),
]


def _write_generated_sts(folder):
    """The same pairs in every STS layout evaluation reads (format name -> (path, read_sts keyword arguments))."""
    import csv as csv_module

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "stsb-en-test.csv").open("w", encoding="utf-8", newline="") as handle:
        csv_module.writer(handle).writerows(GENERATED_STS)
    sick_rows = "".join(f"{i}\t{a}\t{b}\t{score}\tNEUTRAL\n" for i, (a, b, score) in enumerate(GENERATED_STS, 1))
    (folder / "sick.txt").write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                                     + sick_rows, encoding="utf-8")
    (folder / "plain.txt").write_text("".join(f"{a}\t{b}\t{score}\n" for a, b, score in GENERATED_STS),
                                      encoding="utf-8")
    (folder / "train.jsonl").write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": score}) + "\n"
                                                for a, b, score in GENERATED_STS), encoding="utf-8")
    with (folder / "renamed.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(["label", "text_b", "text_a"])
        writer.writerows((score, b, a) for a, b, score in GENERATED_STS)
    return {
        "stsb": (folder / "stsb-en-test.csv", {}),
        "sick": (folder / "sick.txt", {}),
        "tsv": (folder / "plain.txt", {}),
        "jsonl": (folder / "train.jsonl", {}),
        "columns": (folder / "renamed.csv",
                    {"columns": {"sentence1": "text_a", "sentence2": "text_b", "score": "label"}}),
    }


def test_generated_sts_in_every_format_reads_the_written_pairs_and_scores_as_spearman(model, tmp_path):
    """Every STS layout (read by the training readers now) gives exactly the pairs written, and the mteb score of
    each equals the Spearman of cosine computed here from the known pairs (the score of the former eval readers)."""
    from conan_hf.eval import evaluate

    files = _write_generated_sts(tmp_path / "sts")
    s1, s2, gold = (list(column) for column in zip(*GENERATED_STS))
    for fmt, (path, kwargs) in files.items():
        data = local_tasks.read_sts(path, **kwargs)
        assert (data.sentence1, data.sentence2, data.score) == (s1, s2, gold), fmt
        assert local_tasks.read_sts(path, limit=5, **kwargs).score == gold[:5]
    assert {fmt: local_tasks.infer_sts_format(path) for fmt, (path, _) in files.items()} == {
        "stsb": "stsb", "sick": "sick", "tsv": "tsv", "jsonl": "jsonl", "columns": "stsb"}

    e1, e2 = model.encode(s1), model.encode(s2)
    expected = spearmanr(np.sum(_unit(e1) * _unit(e2), axis=1), gold)[0]
    tasks = [local_tasks.sts_task(path, name=f"Generated-{fmt}", language="en", **kwargs)
             for fmt, (path, kwargs) in files.items()]
    report = evaluate(model, tasks)
    assert set(report.main_scores) == {f"Generated-{fmt}" for fmt in files}
    for name, score in report.main_scores.items():
        assert score == pytest.approx(expected, abs=1e-6), name


def test_eval_reads_sts_jsonl_like_training(tmp_path):
    """The STS JSONL a stage-4 `sts` task trains on evaluates as the same rows, and a bad row fails in both with the
    same file:line and column (the former eval reader accepted a NaN score and turned a number into text)."""
    from conan_hf.errors import DataError
    from conan_hf.stages.supervised import TaskConfig, task_rows

    good = tmp_path / "sts.jsonl"
    good.write_text('{"sentence1": "a cat", "sentence2": "a kitten", "score": 4}\n\n'
                    '{"sentence1": "a car", "sentence2": "a poem", "score": "0.5", "extra": [1]}\n', encoding="utf-8")
    trained, _ = task_rows(TaskConfig(name="sts", type="sts", data=[str(good)]))
    data = local_tasks.read_sts(good)
    assert [(r["sentence1"], r["sentence2"], r["score"]) for r in trained] == \
        list(zip(data.sentence1, data.sentence2, data.score)) == [("a cat", "a kitten", 4.0), ("a car", "a poem", 0.5)]

    for bad_row, column in (('{"sentence1": "c", "sentence2": "d", "score": NaN}', "score"),
                            ('{"sentence1": "c", "sentence2": "d", "score": Infinity}', "score"),
                            ('{"sentence1": "c", "sentence2": "d", "score": true}', "score"),
                            ('{"sentence1": 12, "sentence2": "d", "score": 1}', "sentence1"),
                            ('{"sentence1": "c", "score": 1}', "sentence2")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"sentence1": "a", "sentence2": "b", "score": 3}\n' + bad_row + "\n", encoding="utf-8")
        with pytest.raises(DataError) as training_error:
            task_rows(TaskConfig(name="sts", type="sts", data=[str(bad)]))
        with pytest.raises(DataFormatError) as eval_error:
            local_tasks.read_sts(bad)
        for error in (training_error.value, eval_error.value):
            assert str(error).startswith(f"{bad}:2: ") and repr(column) in str(error), (bad_row, str(error))

    # Pair classification reads the same layouts: JSON lines, or any table through a column mapping.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": "c", "sentence2": "d", '
                     '"label": "0"}\n', encoding="utf-8")
    read = local_tasks.read_pairs(pairs)
    assert (read.sentence1, read.sentence2, read.score) == (["a", "c"], ["b", "d"], [1.0, 0.0])
    mapped = tmp_path / "pairs.csv"
    mapped.write_text("y,s,t\n1,a,b\n0,c,d\n", encoding="utf-8")
    read = local_tasks.read_pairs(mapped, columns={"sentence1": "s", "sentence2": "t", "label": "y"})
    assert (read.sentence1, read.sentence2, read.score) == (["a", "c"], ["b", "d"], [1.0, 0.0])


def _write_beir(folder, qrels_text):
    (folder / "qrels").mkdir(parents=True)
    docs = [("d1", "Cooking", "Boil pasta in salted water for ten minutes."),
            ("d2", "", "The Nile is the longest river in Africa."),
            ("d3", "Space", "Mars is the fourth planet from the sun."),
            ("d4", "", "Tea is brewed from the leaves of a shrub."),
            ("d5", "Cooking", "Bake the bread until it is golden.")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                                 for i, t, x in docs), encoding="utf-8")
    queries = [("q1", "how long to cook pasta"), ("q2", "longest river in africa"), ("q3", "which planet is fourth"),
               ("q4", "no judged documents")]
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries),
                                          encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels_text, encoding="utf-8")
    return folder


JUDGEMENTS = "q1\td1\t2\nq1\td5\t1\nq2\td2\t1\nq2\td4\t0\nq3\td3\t1\n"
EXPECTED_QRELS = {"q1": {"d1": 2, "d5": 1}, "q2": {"d2": 1, "d4": 0}, "q3": {"d3": 1}}


def test_beir_with_and_without_qrels_header_evaluates_the_same(model, tmp_path):
    from conan_hf.eval import evaluate

    with_header = _write_beir(tmp_path / "with-header", "query-id\tcorpus-id\tscore\n" + JUDGEMENTS)
    headerless = _write_beir(tmp_path / "headerless", JUDGEMENTS)
    trec = _write_beir(tmp_path / "trec", "".join(f"{q}\t0\t{d}\t{s}\n" for q, d, s in
                                                  (line.split("\t") for line in JUDGEMENTS.splitlines())))
    read = [local_tasks.beir_retrieval_data(folder) for folder in (with_header, headerless, trec)]
    for data, split in read:
        assert split == "test" and data.qrels == EXPECTED_QRELS
        assert list(data.queries) == ["q1", "q2", "q3"]  # q4 has no relevant document
        assert list(data.corpus) == ["d1", "d2", "d3", "d4", "d5"]
    limited, _ = local_tasks.beir_retrieval_data(headerless, limit_queries=1, limit_corpus=1)
    assert list(limited.queries) == ["q1"] and list(limited.corpus) == ["d1", "d5"]  # relevant ones always kept

    tasks = [local_tasks.retrieval_task(folder, name=f"GeneratedBEIR-{folder.name}", language="en")
             for folder in (with_header, headerless, trec)]
    report = evaluate(model, tasks)
    data = read[0][0]
    qids, doc_ids = list(data.queries), list(data.corpus)
    ndcg, recall = _naive_ndcg_recall(model.encode([data.queries[q] for q in qids]),
                                      model.encode([(d["title"] + " " + d["text"]).strip()
                                                    for d in data.corpus.values()]),
                                      doc_ids, qids, data.qrels, k_recall=2)
    for row in report.summary:
        scores = row["subsets"]["default"]
        assert scores["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4), row["task"]
        assert scores["recall_at_3"] >= scores["recall_at_1"]
    # all three layouts: identical scores
    assert len({round(row["main_score"], 9) for row in report.summary}) == 1


def test_squad_retrieval_keeps_every_paragraph_and_position_ids(tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [
        {"title": "A", "paragraphs": [
            {"context": "Paris is the capital of France.", "qas": [{"id": "x1", "question": "Capital of France?"}]},
            {"context": "A paragraph nobody asks about.", "qas": []},
        ]},
        {"title": "B", "paragraphs": [
            {"context": "The Nile flows north.", "qas": [{"id": "x2", "question": "Where does the Nile flow?"},
                                                        {"id": "x3", "question": "   "}]},
        ]},
    ]}), encoding="utf-8")
    with pytest.raises(DataFormatError,
                       match=r"squad\.json:data\[1\]\.paragraphs\[0\]\.qas\[1\]: question 'x3' has no text"):
        local_tasks.squad_retrieval_data(squad)
    data = local_tasks.squad_retrieval_data(squad, on_error="skip")
    assert data.corpus == {"0-0": {"title": "", "text": "Paris is the capital of France."},
                           "0-1": {"title": "", "text": "A paragraph nobody asks about."},
                           "1-0": {"title": "", "text": "The Nile flows north."}}
    assert data.queries == {"x1": "Capital of France?", "x2": "Where does the Nile flow?"}
    assert data.qrels == {"x1": {"0-0": 1}, "x2": {"1-0": 1}}
    assert local_tasks.squad_retrieval_data(squad, limit_queries=1, on_error="skip").qrels == {"x1": {"0-0": 1}}


# ------------------------------------------------------------------------------------------- mteb tasks --------


def test_sts_through_mteb_equals_spearman_of_cosine(model, shared_data_dir, tmp_path):
    from conan_hf.eval import evaluate

    path = shared_data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv"
    task = local_tasks.sts_task(path, limit=200)
    report = evaluate(model, [task], output_folder=tmp_path, batch_size=32)

    data = local_tasks.read_sts(path, limit=200)
    e1, e2 = model.encode(data.sentence1), model.encode(data.sentence2)
    expected = spearmanr(np.sum(_unit(e1) * _unit(e2), axis=1), data.score)[0]
    assert report.main_scores[task.metadata.name] == pytest.approx(expected, abs=1e-6)

    # mteb's result file (the dev file is labelled split "dev") and summary.json next to it
    saved = json.loads((report.results_dir / f"{task.metadata.name}.json").read_text())
    assert saved["scores"]["dev"][0]["cosine_spearman"] == pytest.approx(expected, abs=1e-5)
    summary = json.loads((report.results_dir / "summary.json").read_text())
    assert summary["tasks"][0]["main_score"] == pytest.approx(expected, abs=1e-6)

    # Matryoshka: the first 32 dimensions, re-normalised (cosine)
    report32 = evaluate(model, [local_tasks.sts_task(path, limit=200)], output_folder=tmp_path, dim=32)
    expected32 = spearmanr(np.sum(_unit(e1[:, :32]) * _unit(e2[:, :32]), axis=1), data.score)[0]
    assert report32.main_scores[task.metadata.name] == pytest.approx(expected32, abs=1e-6)
    assert report32.results_dir.name.endswith("-dim32") and report32.results_dir != report.results_dir
    assert report32.results_dir.parent == report.results_dir.parent == tmp_path  # <output>/<model>[-dim<d>]/
    assert model.truncate_dim is None  # restored


def _naive_ndcg_recall(query_emb, doc_emb, doc_ids, qids, qrels, k_ndcg=10, k_recall=20):
    scores = _unit(query_emb) @ _unit(doc_emb).T
    ndcgs, recalls = [], []
    for row, qid in zip(scores, qids):
        ranked = [doc_ids[j] for j in np.argsort(-row)]
        rel = qrels[qid]
        dcg = sum(rel.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranked[:k_ndcg]))
        ideal = sorted((r for r in rel.values() if r > 0), reverse=True)[:k_ndcg]
        ndcgs.append(dcg / sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal)))
        positives = {d for d, r in rel.items() if r > 0}
        recalls.append(len(positives & set(ranked[:k_recall])) / len(positives))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


def test_retrieval_with_task_instruction_equals_naive_ndcg(model, shared_data_dir):
    from conan_hf.eval import evaluate
    from conan_hf.eval.run import detect_instruction_template

    folder = shared_data_dir / "retrieval/dbpedia-mini"
    task = local_tasks.retrieval_task(folder, limit_queries=10, limit_corpus=150)
    model.prompts = {"query": QUERY_PROMPT, "document": ""}  # an instruction-style model: template is detected
    try:
        assert detect_instruction_template(model.prompts) == "Instruct: {instruction}\nQuery:\n"
        report = evaluate(model, [task], instruction_template="auto")  # task instructions are opt-in
        data, _ = local_tasks.beir_retrieval_data(folder, limit_queries=10, limit_corpus=150)
        instruction = task.metadata.prompt["query"]
        qids, doc_ids = list(data.queries), list(data.corpus)
        query_emb = model.encode([data.queries[q] for q in qids],
                                 prompt=f"Instruct: {instruction}\nQuery:\n")
        doc_emb = model.encode([(d["title"] + " " + d["text"]).strip() for d in data.corpus.values()], prompt="")
    finally:
        model.prompts = {"query": "", "document": ""}
    ndcg, recall = _naive_ndcg_recall(query_emb, doc_emb, doc_ids, qids, data.qrels)
    scores = report.summary[0]["subsets"]["default"]
    assert report.settings["prompts"][f"{task.metadata.name}-query"] == f"Instruct: {instruction}\nQuery:\n"
    assert scores["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4)
    assert scores["recall_at_20"] == pytest.approx(recall, abs=1e-4)
    positives = {d for rel in data.qrels.values() for d, r in rel.items() if r > 0}
    assert positives <= set(data.corpus) and len(data.corpus) <= 150 + len(positives)


def test_bitext_pairs_classification_clustering_through_mteb(model, shared_data_dir):
    from conan_hf.eval import evaluate

    bitext = local_tasks.bitext_task(shared_data_dir / "xling/tatoeba/tatoeba.deu-eng", limit=120)
    tasks = [
        bitext,
        local_tasks.pair_task(shared_data_dir / "sts/zh/lcqmc-dev.txt", limit=120),
        local_tasks.classification_task(shared_data_dir / "classification/thucnews/dev.txt", limit=300,
                                        n_experiments=2),
        local_tasks.clustering_task(shared_data_dir / "classification/thucnews/dev.txt", limit=200, n_clusters=2),
    ]
    report = evaluate(model, tasks)
    rows = {row["task"]: row for row in report.summary}
    assert {row["type"] for row in rows.values()} == {"BitextMining", "PairClassification", "Classification",
                                                     "Clustering"}
    for row in rows.values():
        assert 0.0 <= row["main_score"] <= 1.0

    # Bitext accuracy = share of German sentences whose nearest English sentence (cosine) is their translation.
    deu, eng = local_tasks.bitext_sentences(
        *local_tasks.tatoeba_files(shared_data_dir / "xling/tatoeba/tatoeba.deu-eng")[:2], limit=120)
    sims = _unit(model.encode(deu)) @ _unit(model.encode(eng)).T
    accuracy = float(np.mean(np.argmax(sims, axis=1) == np.arange(len(deu))))
    assert rows[bitext.metadata.name]["subsets"]["default"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)


# ------------------------------------------------------------------------------------ cross-lingual ---------


class IdentityEncoder:
    """A test "model" whose embedding is the one-hot vector of the exact text: identical texts score 1, others 0."""

    def __init__(self, dim: int = 4096):
        from mteb.models import ModelMeta

        self.dim = dim
        self.index: dict[str, int] = {}
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={"name": "test/identity", "revision": "1"})

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, self.index.setdefault(text, len(self.index))] = 1.0
        return out

    def similarity(self, a, b):
        from mteb.similarity_functions import cos_sim

        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(a, b)


def test_identity_model_recall_at_20_is_one_for_same_language(shared_data_dir):
    from conan_hf.eval.xling import CrossLingualData, evaluate_cross_lingual, load_xquad

    xquad = load_xquad(shared_data_dir / "xling/xquad", languages=["en"], limit_queries=150)
    # Same-language data where each query's text is its document's text.
    identical = CrossLingualData(
        corpus=xquad.corpus,
        queries={"en": {qid: xquad.corpus[next(iter(rel))]["text"] for qid, rel in xquad.qrels.items()}},
        qrels=xquad.qrels, name="IdentitySanity")
    report = evaluate_cross_lingual(IdentityEncoder(), identical)
    assert report.per_language["en"]["recall_at_20"] == 1.0
    assert report.per_language["en"]["ndcg_at_10"] == 1.0
    # ...and the same "model" cannot match questions to paragraphs: the metric is not trivially 1.
    questions = evaluate_cross_lingual(IdentityEncoder(), xquad)
    assert questions.per_language["en"]["recall_at_20"] < 0.3


def test_xquad_cross_lingual_table_matches_naive_recall(model, shared_data_dir, tmp_path):
    from conan_hf.eval.xling import evaluate_cross_lingual, load_xquad

    data = load_xquad(shared_data_dir / "xling/xquad", languages=["de", "es", "zh"], limit_queries=60)
    assert set(data.queries) == {"de", "es", "zh"} and len(data.corpus) == 240
    assert data.queries["de"].keys() == data.queries["zh"].keys()
    report = evaluate_cross_lingual(model, data, output_folder=tmp_path)
    assert list(report.per_language) == ["de", "es", "zh"]
    for row in report.per_language.values():
        assert 0 <= row["recall_at_20"] <= row["recall_at_100"] <= 1
    table = report.table()
    assert table.splitlines()[0].split() == ["Language", "nDCG@10", "Recall@20", "Recall@100"]
    assert table.splitlines()[-1].startswith("Avg")
    assert report.average["recall_at_20"] == pytest.approx(
        np.mean([r["recall_at_20"] for r in report.per_language.values()]))

    qids, doc_ids = list(data.queries["zh"]), list(data.corpus)
    ndcg, recall = _naive_ndcg_recall(model.encode_query([data.queries["zh"][q] for q in qids]),
                                      model.encode_document([d["text"] for d in data.corpus.values()]),
                                      doc_ids, qids, data.qrels)
    assert report.per_language["zh"]["recall_at_20"] == pytest.approx(recall, abs=1e-4)
    assert report.per_language["zh"]["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4)
    assert json.loads((tmp_path / f"{data.name}_table.json").read_text())["average"]["recall_at_20"] == \
        pytest.approx(report.average["recall_at_20"])


def test_mkqa_jsonl_relevance_by_answer_containment(tmp_path):
    from conan_hf.eval.xling import load_mkqa

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"_id": "p1", "title": "France", "text": "Paris is the capital of France."},
        {"_id": "p2", "title": "", "text": "The Nile is a long river."},
        {"_id": "p3", "title": "", "text": "Berlin has many museums."},
    ]), encoding="utf-8")
    mkqa = tmp_path / "mkqa.jsonl"
    mkqa.write_text("\n".join(json.dumps(d) for d in [
        {"example_id": 1, "query": "capital of france", "queries": {"en": "capital of france",
                                                                      "de": "Hauptstadt von Frankreich"},
         "answers": {"en": [{"type": "entity", "text": "Paris", "aliases": []}]}},
        {"example_id": 2, "query": "longest river", "queries": {"en": "longest river", "de": "längster Fluss"},
         "answers": {"en": [{"type": "entity", "text": "Amazon", "aliases": ["the nile"]}]}},
        {"example_id": 3, "query": "moon", "queries": {"en": "moon", "de": "Mond"},
         "answers": {"en": [{"type": "unanswerable", "text": None}]}},
    ]), encoding="utf-8")
    data = load_mkqa(mkqa, corpus, languages=["de"])
    assert data.qrels == {"1": {"p1": 1}, "2": {"p2": 1}}  # example 3 has no answer passage and is dropped
    assert data.queries == {"de": {"1": "Hauptstadt von Frankreich", "2": "längster Fluss"}}


# --------------------------------------------------------------------------------------- plot and CLI -------


def test_plot_language_distribution_writes_png(model, shared_data_dir, tmp_path):
    import matplotlib.image as mpimg

    from conan_hf.eval import plot_language_distribution

    texts = {lang: local_tasks.read_sts(shared_data_dir / f"sts/stsb-multi-mt/stsb-{lang}-dev.csv", limit=40).sentence1
             for lang in ("en", "de", "zh")}
    for method in ("tsne", "pca"):
        path = plot_language_distribution(model, texts, tmp_path / f"fig3_{method}.png", method=method)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        height, width = mpimg.imread(path).shape[:2]
        assert height > 300 and width > 300


def test_cli_prints_json_summary_last(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    from conan_hf.eval.__main__ import main

    data = shared_data_dir / "sts/zh/sts-b-dev.txt"
    assert main(["--model", str(tiny_model_dir), "--task", "sts", "--data", str(data), "--limit", "100",
                 "--output-folder", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary) == ["LocalSTS-sts-b-dev"]

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    pairs = local_tasks.read_sts(data, limit=100)
    expected = spearmanr(np.sum(_unit(st.encode(pairs.sentence1)) * _unit(st.encode(pairs.sentence2)), axis=1),
                         pairs.score)[0]
    # The Chinese file has identical sentence pairs (cosine 1 up to float rounding), whose tie order depends on how
    # the cosine is rounded; hence a tolerance of a few rank swaps rather than 1e-6.
    assert summary["LocalSTS-sts-b-dev"] == pytest.approx(expected, abs=2e-3)
    assert any("LocalSTS-sts-b-dev" in line and "cosine_spearman" in line for line in lines[:-1])
