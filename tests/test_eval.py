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
    with pytest.raises(DataFormatError, match=r"bad\.csv:2: score must be a number"):
        local_tasks.read_sts(bad)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("x\ty\t1\nx\ty\tentailment\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"pairs\.txt:2: pair label must be 0 or 1"):
        local_tasks.read_pairs(pairs)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2"\n', encoding="utf-8")
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n', encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: invalid JSON"):
        local_tasks.read_beir(beir)


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

    # mteb wrote its result file and we wrote summary.json next to it
    saved = json.loads((report.results_dir / f"{task.metadata.name}.json").read_text())
    assert saved["scores"]["test"][0]["cosine_spearman"] == pytest.approx(expected, abs=1e-5)
    summary = json.loads((report.results_dir / "summary.json").read_text())
    assert summary["tasks"][0]["main_score"] == pytest.approx(expected, abs=1e-6)

    # Matryoshka: the first 32 dimensions, re-normalised (cosine)
    report32 = evaluate(model, [local_tasks.sts_task(path, limit=200)], output_folder=tmp_path, dim=32)
    expected32 = spearmanr(np.sum(_unit(e1[:, :32]) * _unit(e2[:, :32]), axis=1), data.score)[0]
    assert report32.main_scores[task.metadata.name] == pytest.approx(expected32, abs=1e-6)
    assert report32.results_dir.name == "dim_32" and report32.results_dir != report.results_dir
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
        report = evaluate(model, [task])
        data, _ = local_tasks.read_beir(folder, limit_queries=10, limit_corpus=150)
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
    deu, eng = local_tasks.read_bitext(*local_tasks.tatoeba_files(shared_data_dir / "xling/tatoeba/tatoeba.deu-eng")[:2],
                                       limit=120)
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
        {"example_id": 1, "query": "capital of france", "queries": {"en": "capital of france", "de": "Hauptstadt von Frankreich"},
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
