"""DHNM pools as row ids into a memory-mapped text table: the same decisions as text pools, the collator's
fetches, bad input and memory per example."""

from __future__ import annotations

import dhnm_helpers
import numpy as np
import pytest

from conan_hf.dhnm import (
    DHNMDataCollator,
    NegativePool,
)

st_model = dhnm_helpers.st_model  # the module-scoped SentenceTransformer fixture


# ---- pools as row ids into a memory-mapped text table ----------------------------------------------------------------
def _corpus_and_pools(tmp_path, num_examples=40, num_texts=60, max_pool=9, seed=0):
    """A corpus saved to disk (as a miner's corpus would be) and ranked pools of distinct corpus rows per example,
    given both as candidate ids (-1 padded) and as the equivalent lists of texts."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    corpus = [f"passage {i} about {rng.integers(1000)}" for i in range(num_texts)]
    Dataset.from_dict({"text": corpus}).save_to_disk(str(tmp_path / "corpus"))
    candidate_ids = np.full((num_examples, max_pool), -1, dtype=np.int64)
    for row in range(num_examples):
        size = int(rng.integers(0, max_pool + 1))
        candidate_ids[row, :size] = rng.choice(num_texts, size=size, replace=False)
    np.save(tmp_path / "candidate_ids.npy", candidate_ids)
    texts = [[corpus[i] for i in row if i >= 0] for row in candidate_ids]
    return corpus, candidate_ids, texts


def _id_text_tables(tmp_path, corpus):
    """The same corpus as the text table kinds from_ids takes: memory-mapped Dataset, Dataset with an indices
    mapping, multi-chunk Arrow array."""
    import pyarrow as pa
    from datasets import load_from_disk

    on_disk = load_from_disk(str(tmp_path / "corpus"))
    reversed_rows = load_from_disk(str(tmp_path / "corpus")).select(range(len(corpus) - 1, -1, -1))
    chunked = pa.chunked_array([pa.array(corpus[:7]), pa.array(corpus[7:30]), pa.array(corpus[30:])])
    return {"mapped": on_disk, "indices": reversed_rows, "chunked": chunked}


@pytest.mark.parametrize("table_kind", ["mapped", "indices", "chunked"])
def test_id_pool_makes_the_same_decisions_as_the_text_pool(tmp_path, table_kind):
    corpus, candidate_ids, texts = _corpus_and_pools(tmp_path)
    table = _id_text_tables(tmp_path, corpus)[table_kind]
    ids_into_table = candidate_ids.copy()
    if table_kind == "indices":  # the table lists the corpus backwards: row r holds corpus[n - 1 - r]
        ids_into_table = np.where(candidate_ids >= 0, len(corpus) - 1 - candidate_ids, -1)
        np.save(tmp_path / "candidate_ids.npy", ids_into_table)
    mapped_ids = np.load(tmp_path / "candidate_ids.npy", mmap_mode="r")  # stays on disk
    by_text = NegativePool([f"e{i}" for i in range(len(texts))], texts, k=3)
    by_id = NegativePool.from_ids(None, mapped_ids, table, k=3)
    assert isinstance(by_id.candidate_ids, np.memmap) and by_id.ids is None
    assert by_id.candidates == texts and by_text.candidates == texts
    np.testing.assert_array_equal(by_id.pool_sizes, [len(t) for t in texts])

    rng = np.random.default_rng(1)
    for _step in range(12):
        rows = rng.choice(len(texts), size=10, replace=True)
        negs = by_text.active[rows].astype(np.int64)
        negs[rng.random(negs.shape) < 0.1] = 8  # sometimes not active (stale)
        scores = rng.uniform(-0.1, 1.0, size=negs.shape)
        scores[rng.random(scores.shape) < 0.05] = np.nan
        assert by_id.apply_scores(rows, negs, scores) == by_text.apply_scores(rows, negs, scores)
        for name in ("active", "s0", "cursor", "fresh_bits"):
            np.testing.assert_array_equal(getattr(by_id, name), getattr(by_text, name))
        for row in range(len(texts)):
            expected = [texts[row][r] for r in by_text.active[row] if r >= 0]  # the lists, indexed by hand
            assert by_id.active_negatives(row) == by_text.active_negatives(f"e{row}") == expected
    assert by_text.cursor.astype(int).sum() > np.minimum(by_text.pool_sizes, 3).astype(int).sum()  # replacements


def test_id_pool_collator_fetches_the_batch_texts(st_model, tmp_path):
    corpus, candidate_ids, texts = _corpus_and_pools(tmp_path, num_examples=6, max_pool=4, seed=3)
    candidate_ids[2] = -1  # one example without negatives
    pool = NegativePool.from_ids(None, candidate_ids, _id_text_tables(tmp_path, corpus)["mapped"], k=2)
    seen = []

    def recording(inputs, prompt=None, **kwargs):
        seen.append(list(inputs))
        return st_model.preprocess(inputs, prompt=prompt, **kwargs)

    collator = DHNMDataCollator(preprocess_fn=recording, pool=pool)
    features = [{"id": row, "anchor": f"q{row}", "positive": f"p{row}"} for row in (4, 2, 0)]
    batch = collator(features)
    expected = [[corpus[candidate_ids[r, s]] if candidate_ids[r, s] >= 0 and s < 2 else f"p{r}" for r in (4, 2, 0)]
                for s in range(2)]
    assert seen[2:] == expected
    assert batch["label"].tolist() == [[r, *[s if candidate_ids[r, s] >= 0 else -1 for s in range(2)]]
                                       for r in (4, 2, 0)]
    with pytest.raises(ValueError, match=r"example id 6 is not in the NegativePool \(6 examples\) \(examples are "
                                         r"keyed by their row index\)"):
        collator([{"id": 6, "anchor": "q", "positive": "p"}])
    for bad in ("4", True, 1.0, -1):
        with pytest.raises(KeyError, match="is not in the NegativePool"):
            pool.row(bad)


def test_text_list_pool_keeps_a_deduplicated_arrow_table_not_the_lists():
    import gc
    import weakref

    class Text(str):  # a str subclass can be weakly referenced: it shows whether the pool keeps the strings
        __slots__ = ("__weakref__",)

    texts = [[Text("shared"), Text("a")], [Text("b"), Text("shared2")], []]
    texts[1][1] = texts[0][0]  # the same text twice: one table row
    refs = [weakref.ref(t) for row in texts for t in row]
    pool = NegativePool(["x", "y", "z"], texts, k=2)
    assert pool.text_table.to_pylist() == ["shared", "a", "b"]
    assert pool.candidate_ids.tolist() == [[0, 1], [2, 0], [-1, -1]]
    del texts
    gc.collect()
    assert all(ref() is None for ref in refs)  # the pool holds none of the given strings
    assert pool.candidates == [["shared", "a"], ["b", "shared"], []]


def test_from_ids_bad_input_names_the_problem(tmp_path):
    import pyarrow as pa
    from datasets import Dataset

    texts = pa.array(["t0", "t1", "t2"])
    with pytest.raises(ValueError, match=r"candidate_ids\[1, 0\] = 3 is not a row of the text table \(3 texts\)"):
        NegativePool.from_ids(None, np.array([[0, 1], [3, -1]]), texts)
    with pytest.raises(ValueError, match=r"candidate_ids\[0, 1\] = -2 .* example 'b'"):
        NegativePool.from_ids(["b"], np.array([[0, -2]]), texts)
    with pytest.raises(ValueError, match="row 1 .* has a candidate at position 2 after a -1"):
        NegativePool.from_ids(None, np.array([[0, 1, 2], [0, -1, 2]]), texts)
    with pytest.raises(ValueError, match="2-D"):
        NegativePool.from_ids(None, np.array([0, 1]), texts)
    with pytest.raises(TypeError, match="integer array"):
        NegativePool.from_ids(None, np.array([[0.0]]), texts)
    with pytest.raises(ValueError, match="2 ids but 1 rows of candidate_ids"):
        NegativePool.from_ids(["a", "b"], np.array([[0]]), texts)
    with pytest.raises(ValueError, match="missing \\(null\\) text at row 4"):
        NegativePool.from_ids(None, np.array([[0]]), pa.chunked_array([["a", "b"], ["c", "d", None]]))
    with pytest.raises(TypeError, match="must hold strings"):
        NegativePool.from_ids(None, np.array([[0]]), pa.array([1, 2]))
    with pytest.raises(ValueError, match="no 'text' column"):
        NegativePool.from_ids(None, np.array([[0]]), Dataset.from_dict({"passage": ["a"]}))
    with pytest.raises(TypeError, match="text table row 1 is int"):
        NegativePool.from_ids(None, np.array([[0]]), ["a", 5])
    pool = NegativePool.from_ids(None, np.array([[2, 0], [1, -1]], dtype=np.int32), texts, k=1)
    assert pool.candidate_ids.dtype == np.int32 and pool.candidates == [["t2", "t0"], ["t1"]]
    from_list = NegativePool.from_ids(None, np.array([[2, 0], [1, -1]]), ["t0", "t1", "t2"], k=1)
    assert from_list.candidates == [["t2", "t0"], ["t1"]] and from_list.fingerprint() == NegativePool.from_ids(
        None, np.array([[2, 0], [1, -1]]), texts, k=1).fingerprint()


def test_id_pool_ram_per_example_beyond_the_data_is_under_100_bytes(tmp_path):
    """1M examples keyed by row index, 10 candidates each as row ids on disk (.npy, memory-mapped) into a corpus
    saved with datasets: what the pool allocates (tracemalloc sees numpy's allocations) stays <= 100 B/example."""
    import tracemalloc

    from datasets import Dataset, load_from_disk

    n, width = 1_000_000, 10
    Dataset.from_dict({"text": [f"passage {i}" for i in range(5000)]}).save_to_disk(str(tmp_path / "corpus"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, size=(n, width), dtype=np.int64)
    ids[rng.random(n) < 0.1, 6:] = -1  # some shorter pools
    np.save(tmp_path / "candidate_ids.npy", ids)
    del ids
    candidate_ids = np.load(tmp_path / "candidate_ids.npy", mmap_mode="r")
    corpus = load_from_disk(str(tmp_path / "corpus"))
    tracemalloc.start()
    try:
        pool = NegativePool.from_ids(None, candidate_ids, corpus, k=7)
        held, peak = tracemalloc.get_traced_memory()
        pool.apply_scores(np.arange(64), pool.active[:64].astype(np.int64), np.full((64, 7), 0.2))
        texts = pool.negative_texts(np.arange(64), pool.active[:64])
        held_after_step, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / n <= 100, f"{held / n:.1f} B/example"
    assert held_after_step / n <= 100
    assert peak / n <= 150, f"peak {peak / n:.1f} B/example while checking candidate_ids block by block"
    assert pool.state_nbytes() == pool.memory_nbytes() == 75 * n  # no id index with row-index ids
    # S0 = 0.2 < 0.4: every scored negative is replaced by the next candidate while the pool has one.
    mapped = np.load(tmp_path / "candidate_ids.npy", mmap_mode="r")
    for row in range(64):
        size = int((mapped[row] >= 0).sum())
        ranks = list(range(min(size, 7)))
        cursor = len(ranks)
        for slot in range(len(ranks)):
            if cursor < size:
                ranks[slot], cursor = cursor, cursor + 1
        assert texts[row] == [f"passage {mapped[row, r]}" for r in ranks] + [None] * (7 - len(ranks))
