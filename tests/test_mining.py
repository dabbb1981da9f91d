"""Hard-negative mining at corpus scale and the streamed teacher filter (issue 11).

Mining (:func:`conan_hf.data.teacher.mine_negative_ids` / ``mine_negative_pools``) is checked against a naive numpy
reference (all embeddings from plain ``SentenceTransformer.encode``, the full score matrix, the margin rules applied
candidate by candidate) and against sentence-transformers' brute-force ``mine_hard_negatives`` (the implementation
before issue 11). The teacher filter is checked chunked against unchunked and against a numpy reference, for every
accepted input type. A real 2-process gloo run (torchrun) checks that ranks share the encoding and get the same result
as one process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCORE_ATOL = 1e-5


def make_rows(seed: int = 0) -> tuple[list[dict], list[str]]:
    """60 (query, positive) rows with repeated queries (several positives), a duplicated row, and a corpus that holds
    one of the positives and a duplicate."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"id": i, "query": text(4), "positive": text(rng.randint(3, 9))} for i in range(50)]
    rows += [{"id": 50 + i, "query": rows[i]["query"], "positive": text(5)} for i in range(5)]
    rows += [dict(rows[7], id=55), dict(rows[0], id=56, positive=rows[1]["positive"])]
    corpus = [text(rng.randint(3, 9)) for _ in range(120)] + [rows[3]["positive"], "shared text"] + ["shared text"]
    return rows, corpus


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    return SentenceTransformer(str(tiny_model_dir), device="cpu")


def naive_pools(model, rows, corpus, pool_size, *, range_min=0, range_max=None, relative_margin=None,
                absolute_margin=None, max_score=None, min_score=None):
    """Reference pools per query, written the slow, obvious way."""
    queries = [r["query"] for r in rows]
    positives = [r["positive"] for r in rows]
    texts = list(dict.fromkeys(list(corpus) + positives))
    unique = list(dict.fromkeys(queries))
    c = model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    q = model.encode(unique, normalize_embeddings=True, show_progress_bar=False)
    scores = q @ c.T
    max_positives = max(Counter(queries).values())
    if range_max is None:
        wide = relative_margin is not None or absolute_margin is not None or max_score is not None
        range_max = range_min + (10 * pool_size if wide else pool_size) + max_positives
    window = range_max + max_positives
    pools = {}
    for qi, query in enumerate(unique):
        own = {texts.index(r["positive"]) for r in rows if r["query"] == query}
        reference = min(scores[qi, p] for p in own)
        survivors = []
        for candidate in np.argsort(-scores[qi], kind="stable")[:window]:
            s = scores[qi, candidate]
            if candidate in own:
                continue
            if absolute_margin is not None and s + absolute_margin > reference:
                continue
            if relative_margin is not None and s > reference - abs(reference) * relative_margin:
                continue
            if max_score is not None and s > max_score:
                continue
            if min_score is not None and s < min_score:
                continue
            survivors.append((texts[candidate], float(s)))
        pools[query] = survivors[range_min:range_min + pool_size]
    positive_scores = [float(q[unique.index(r["query"])] @ c[texts.index(r["positive"])]) for r in rows]
    return pools, positive_scores, texts


OPTIONS = [
    {"relative_margin": 0.05},
    {"relative_margin": None, "range_min": 2},
    {"relative_margin": None, "absolute_margin": -0.2, "range_min": 1},
    {"relative_margin": 0.02, "max_score": 0.95, "min_score": 0.5},
    {"relative_margin": None, "range_max": 9},
]


@pytest.mark.parametrize("index,search_params", [("flat", None), ("stream", None), ("IVF4,Flat", {"nprobe": 4})])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_mined_ids_equal_naive_reference(teacher, tmp_path, index, search_params, options):
    """Exact indexes (and an IVF index probing all its lists) give the naive reference's pools, chunk after chunk."""
    from conan_hf.data.teacher import MinedPools, mine_negative_ids

    rows, corpus = make_rows()
    pools, report = mine_negative_ids(rows, teacher, pool_size=5, corpus=corpus, index=index,
                                      search_params=search_params, chunk_size=7, work_dir=tmp_path,
                                      show_progress_bar=False, verbose=False, **options)
    reference, positive_scores, texts = naive_pools(teacher, rows, corpus, 5, **options)
    assert isinstance(pools, MinedPools) and pools.texts == texts
    assert pools.candidate_ids.shape == (len(rows), 5) and pools.candidate_ids.dtype == np.int64
    for row, ids, scores in zip(rows, pools.candidate_ids, pools.candidate_scores):
        expected = reference[row["query"]]
        size = len(expected)
        assert [texts[i] for i in ids[:size]] == [t for t, _ in expected]
        assert (ids[size:] == -1).all() and np.isnan(scores[size:]).all()  # -1 / NaN padding
        np.testing.assert_allclose(scores[:size], [s for _, s in expected], atol=SCORE_ATOL)
    np.testing.assert_allclose(pools.positive_scores, positive_scores, atol=SCORE_ATOL)
    assert [texts[i] for i in pools.positive_ids] == [r["positive"] for r in rows]
    sizes = [len(reference[r["query"]]) for r in rows]
    assert report.total == len(rows) and report.dropped == 0
    assert (report.full, report.partial, report.empty) == (sizes.count(5), sum(0 < s < 5 for s in sizes),
                                                           sizes.count(0))
    assert list(tmp_path.iterdir())  # the embeddings went to files in work_dir


def test_pools_on_test_data_are_not_trivial(teacher):
    """The option sets above cover full, partial and empty pools (else the comparison would prove little)."""
    rows, corpus = make_rows()
    sizes = Counter()
    for options in OPTIONS:
        pools, _, _ = naive_pools(teacher, rows, corpus, 5, **options)
        sizes.update(min(len(p), 1) + (len(p) == 5) for p in pools.values())
    assert sizes[0] and sizes[1] and sizes[2]


@pytest.mark.parametrize("options", OPTIONS[:4], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_text_pools_equal_sentence_transformers_brute_force(teacher, options):
    """``mine_negative_pools`` returns what ``mine_hard_negatives`` (the implementation before issue 11) returns."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from conan_hf.data.teacher import mine_negative_pools

    rows, corpus = make_rows()
    out, report = mine_negative_pools(rows, teacher, pool_size=5, corpus=corpus, chunk_size=16,
                                      show_progress_bar=False, verbose=False, **options)
    mined = mine_hard_negatives(Dataset.from_list(rows), teacher, anchor_column_name="query",
                                positive_column_name="positive", corpus=corpus, num_negatives=5,
                                sampling_strategy="top", output_format="labeled-list", output_scores=True,
                                verbose=False, **options)
    expected = {(q, texts[0]): (texts[1:], scores) for q, texts, scores in
                zip(mined["query"], mined["positive"], mined["scores"])}
    kept = [r for r in rows if (r["query"], r["positive"]) in expected]
    assert out["id"] == [r["id"] for r in kept]  # rows without a pool are dropped, the rest keep their order
    assert report.dropped == len(rows) - len(kept) == report.empty
    for row in out:
        texts, scores = expected[(row["query"], row["positive"])]
        assert row["negatives"] == texts
        np.testing.assert_allclose(row["negative_scores"], scores[1:], atol=SCORE_ATOL)
        assert row["positive_score"] == pytest.approx(scores[0], abs=SCORE_ATOL)


def test_return_ids_index_the_corpus(teacher):
    """With a duplicate-free corpus holding every positive, ids are corpus rows; kept-empty rows keep NaN scores."""
    from conan_hf.data.teacher import MinedPools, mine_negative_pools

    rows, corpus = make_rows()
    corpus = list(dict.fromkeys(corpus + [r["positive"] for r in rows]))
    pools, report = mine_negative_pools(rows, teacher, pool_size=4, corpus=corpus, relative_margin=0.05,
                                        return_ids=True, show_progress_bar=False, verbose=False)
    texts, _ = mine_negative_pools(rows, teacher, pool_size=4, corpus=corpus, relative_margin=0.05, keep_empty=True,
                                   show_progress_bar=False, verbose=False)
    assert isinstance(pools, MinedPools) and pools.texts == corpus
    assert report.empty > 0 and report.dropped == 0
    for ids, row in zip(pools.candidate_ids, texts):
        assert [corpus[i] for i in ids if i >= 0] == row["negatives"]
        if not row["negatives"]:
            assert np.isnan(row["positive_score"])


def test_mining_rejects_bad_options(teacher):
    from conan_hf.data.teacher import mine_negative_ids

    rows, _ = make_rows()
    with pytest.raises(ValueError, match="Cannot mine 5 negatives per query: only 3 candidates"):
        mine_negative_ids(rows, teacher, pool_size=5, range_max=3, show_progress_bar=False, verbose=False)
    with pytest.raises(KeyError, match=r"\['answer'\] not in the data"):
        mine_negative_ids(rows, teacher, positive_column="answer", show_progress_bar=False, verbose=False)


# ---- teacher filter --------------------------------------------------------------------------------------------
def filter_rows(count: int = 45) -> list[dict]:
    rng = random.Random(3)
    words = [f"v{i}" for i in range(40)]
    rows = []
    for i in range(count):
        query = " ".join(rng.choice(words) for _ in range(3))
        positive = query if i % 4 == 0 else " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        rows.append({"id": i, "query": query, "positive": positive})
    return rows


def reference_scores(model, rows) -> np.ndarray:
    q = model.encode([r["query"] for r in rows], normalize_embeddings=True, show_progress_bar=False)
    p = model.encode([r["positive"] for r in rows], normalize_embeddings=True, show_progress_bar=False)
    return (q * p).sum(axis=1)


@pytest.mark.parametrize("kind", ["list", "generator", "dataset", "iterable_dataset"])
def test_teacher_filter_chunked_equals_unchunked(teacher, tmp_path, kind):
    from datasets import Dataset

    from conan_hf.data.teacher import filter_by_teacher

    rows = filter_rows()
    scores = reference_scores(teacher, rows)
    threshold = float(np.median(scores))  # about half the rows pass

    def data():
        if kind == "list":
            return rows
        if kind == "generator":
            return (dict(r) for r in rows)
        dataset = Dataset.from_list(rows)
        return dataset if kind == "dataset" else dataset.to_iterable_dataset()

    results = {}
    for chunk_size in (7, 1000):  # 7 does not divide 45: the last chunk is partial
        kept, report = filter_by_teacher(data(), teacher, threshold, chunk_size=chunk_size,
                                         output_dir=tmp_path / f"{kind}{chunk_size}", show_progress_bar=False,
                                         verbose=False)
        results[chunk_size] = (kept, report)
        expected = [r for r, s in zip(rows, scores) if s >= threshold]
        assert report.total == len(rows) and report.kept + report.dropped == len(rows)
        assert report.kept == len(kept) == len(expected) and 0 < report.kept < len(rows)
        assert kept["id"] == [r["id"] for r in expected] and kept["positive"] == [r["positive"] for r in expected]
        np.testing.assert_allclose(report.scores, scores, atol=SCORE_ATOL)
        np.testing.assert_allclose(kept["teacher_score"], scores[scores >= threshold], atol=SCORE_ATOL)
    np.testing.assert_allclose(results[7][1].scores, results[1000][1].scores, atol=SCORE_ATOL)
    assert results[7][0]["id"] == results[1000][0]["id"]


def test_teacher_filter_per_row_prompts_in_chunks(teacher):
    """A list of per-row prompts and a function of the row give the same scores as ``teacher_scores`` on all rows."""
    from conan_hf.data.teacher import filter_by_teacher, teacher_scores

    rows = filter_rows(20)
    prompts = [f"Instruct: task {r['id'] % 3}\nQuery: " if r["id"] % 2 else None for r in rows]
    expected = teacher_scores(teacher, [r["query"] for r in rows], [r["positive"] for r in rows],
                              query_prompt=prompts, chunk_size=1000, show_progress_bar=False)
    _, listed = filter_by_teacher(rows, teacher, 0.0, query_prompt=prompts, chunk_size=6, show_progress_bar=False,
                                  verbose=False)
    _, computed = filter_by_teacher(iter(rows), teacher, 0.0, chunk_size=6, show_progress_bar=False, verbose=False,
                                    query_prompt=lambda r: f"Instruct: task {r['id'] % 3}\nQuery: " if r["id"] % 2
                                    else None)
    np.testing.assert_allclose(listed.scores, expected, atol=SCORE_ATOL)
    np.testing.assert_allclose(computed.scores, expected, atol=SCORE_ATOL)
    assert abs(expected[1] - teacher_scores(teacher, [rows[1]["query"]], [rows[1]["positive"]],
                                            show_progress_bar=False)[0]) > 1e-6  # the prompt was used


def test_teacher_filter_reports_bad_rows(teacher):
    from conan_hf.data.teacher import filter_by_teacher

    rows = filter_rows(10)
    broken = rows[:8] + [{"query": "a", "answer": "b"}] + rows[9:]
    with pytest.raises(ValueError, match=r"row 9 has columns \['query', 'answer'\], unlike row 1"):
        filter_by_teacher(iter(broken), teacher, chunk_size=4, show_progress_bar=False, verbose=False)
    with pytest.raises(ValueError, match="query_prompt has more entries than the data has rows"):
        filter_by_teacher(rows, teacher, query_prompt=[None] * 11, show_progress_bar=False, verbose=False)
    with pytest.raises(ValueError, match="query_prompt has 9 entries but the data has more rows"):
        filter_by_teacher(rows, teacher, query_prompt=[None] * 9, chunk_size=4, show_progress_bar=False,
                          verbose=False)
    with pytest.raises(ValueError, match="no rows given"):
        filter_by_teacher(iter([]), teacher, show_progress_bar=False, verbose=False)


# ---- two ranks -------------------------------------------------------------------------------------------------
def _worker(model_dir: str, output: str) -> None:
    """Run by torchrun in each of 2 processes: mine and filter with the encoding split across ranks."""
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer

    from conan_hf.data.teacher import filter_by_teacher, mine_negative_ids

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = SentenceTransformer(model_dir, device="cpu")
    encoded = []
    model[0].register_forward_pre_hook(lambda module, args: encoded.append(len(args[0]["input_ids"])))
    rows, corpus = make_rows()
    pools, _ = mine_negative_ids(rows, model, pool_size=5, corpus=corpus, relative_margin=None, range_min=1,
                                 chunk_size=7, work_dir=os.path.join(output, f"work{rank}"),
                                 show_progress_bar=False, verbose=False)
    mined_texts = sum(encoded)
    encoded.clear()
    kept, report = filter_by_teacher(iter(filter_rows()), model, 0.5, chunk_size=7,
                                     output_dir=os.path.join(output, "kept"), show_progress_bar=False, verbose=False)
    result = {"ids": pools.candidate_ids.tolist(), "scores": np.nan_to_num(pools.candidate_scores, nan=-9).tolist(),
              "mined_texts": mined_texts, "filter_texts": sum(encoded), "kept": list(kept["id"]),
              "filter_scores": report.scores.tolist(), "total": report.total}
    Path(output, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_encoding_and_match_one_process(teacher, tiny_model_dir, tmp_path):
    from conan_hf.data.teacher import filter_by_teacher, mine_negative_ids

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           __file__, str(tiny_model_dir), str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    rows, corpus = make_rows()
    encoded = []
    hook = teacher[0].register_forward_pre_hook(lambda module, args: encoded.append(len(args[0]["input_ids"])))
    try:
        pools, _ = mine_negative_ids(rows, teacher, pool_size=5, corpus=corpus, relative_margin=None, range_min=1,
                                     chunk_size=7, show_progress_bar=False, verbose=False)
        mined_texts = sum(encoded)
        encoded.clear()
        kept, report = filter_by_teacher(iter(filter_rows()), teacher, 0.5, chunk_size=7, show_progress_bar=False,
                                         verbose=False)
        filter_texts = sum(encoded)
    finally:
        hook.remove()
    for other in ranks:
        assert other["ids"] == pools.candidate_ids.tolist()
        np.testing.assert_allclose(other["scores"], np.nan_to_num(pools.candidate_scores, nan=-9), atol=SCORE_ATOL)
        assert other["kept"] == list(kept["id"]) and other["total"] == report.total == len(filter_rows())
        np.testing.assert_allclose(other["filter_scores"], report.scores, atol=SCORE_ATOL)
    # Each rank encoded about half of what one process encodes (one extra text per rank finds the embedding size).
    for key, single in (("mined_texts", mined_texts), ("filter_texts", filter_texts)):
        shares = [other[key] for other in ranks]
        assert sum(shares) <= single + 4 and max(shares) < 0.6 * single, (key, shares, single)


if __name__ == "__main__":  # torchrun entry point of the two-rank test
    _worker(sys.argv[1], sys.argv[2])
