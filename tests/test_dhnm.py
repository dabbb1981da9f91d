"""Dynamic Hard Negative Mining (§3.4, eq. 6): the rule, the pools, the collator and real Trainer runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conan_hf.dhnm import DHNM_STATE_NAME, DHNMCallback, DHNMDataCollator, NegativePool, dhnm_should_replace

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- eq. 6 ----------------------------------------------------------------------------------------------------------
TRUTH_TABLE = [
    ((0.3, 0.3), True),
    ((0.8, 0.6), True),
    ((0.8, 0.7), False),
    ((0.9, 0.72), False),
    ((0.5, 0.45), False),
    ((0.39, 0.9), True),
]


@pytest.mark.parametrize(("pair", "replace"), TRUTH_TABLE)
def test_rule_truth_table_scalars(pair, replace):
    assert bool(dhnm_should_replace(*pair)) is replace


def test_rule_is_vectorised_for_numpy_and_torch():
    s0 = [p[0] for p, _ in TRUTH_TABLE]
    s = [p[1] for p, _ in TRUTH_TABLE]
    expected = [r for _, r in TRUTH_TABLE]
    assert dhnm_should_replace(np.array(s0), np.array(s)).tolist() == expected
    out = dhnm_should_replace(torch.tensor(s0), torch.tensor(s))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.tolist() == expected
    # Broadcasting: one S0 against many current scores.
    assert dhnm_should_replace(0.8, np.array([0.5, 0.66, 0.67, 0.7])).tolist() == [True, True, False, False]


def test_rule_thresholds_are_configurable_and_nan_keeps():
    assert not dhnm_should_replace(0.3, 0.3, s0_min=0.2)
    assert not dhnm_should_replace(0.8, 0.69)  # 1.2 * 0.69 = 0.828 >= 0.8
    assert dhnm_should_replace(0.8, 0.69, drop_ratio=1.1)  # 1.1 * 0.69 = 0.759 < 0.8 and 0.69 < 0.7
    assert not dhnm_should_replace(0.9, 0.72)  # dropped enough, but 0.72 >= 0.7
    assert dhnm_should_replace(0.9, 0.72, s_max=0.75)
    nan = float("nan")
    assert dhnm_should_replace([nan, 0.8, nan], [0.1, nan, nan]).tolist() == [False, False, False]
    assert dhnm_should_replace(torch.tensor([nan]), torch.tensor([0.1])).tolist() == [False]


# ---- NegativePool ---------------------------------------------------------------------------------------------------
COUNTS = ("checked", "replaced", "used", "pool_exhausted", "nan_scores", "stale", "replaced_low_s0", "replaced_easy",
          "used_low_s0", "used_easy")


def naive_apply(active, s0, cursor, pool_sizes, rows, negs, scores, s0_min=0.4, drop_ratio=1.2, s_max=0.7,
                fresh=None, reason=None):
    """Loop reference for NegativePool.apply_scores (mutates its arguments, returns counts). ``fresh`` (same shape
    as ``active``) marks replacements not carried yet; None keeps its own all-False array. ``reason`` (same shape,
    str) records which clause of eq. 6 made each slot's replacement; None keeps its own."""
    counts = dict.fromkeys(COUNTS, 0)
    fresh = np.zeros(active.shape, dtype=bool) if fresh is None else fresh
    reason = np.full(active.shape, "", dtype=object) if reason is None else reason
    seen = set()
    for row, row_negs, row_scores in zip(rows, negs, scores):
        for neg, score in zip(row_negs, row_scores):
            if neg < 0 or (row, neg) in seen:
                continue
            seen.add((row, neg))
            carried = [j for j in range(active.shape[1]) if active[row, j] == neg]
            if carried and fresh[row, carried[0]]:
                counts["used"] += 1  # a replacement carried by a batch for the first time
                counts[f"used_{reason[row, carried[0]]}"] += 1
                fresh[row, carried[0]] = False
            if math.isnan(score):
                counts["nan_scores"] += 1
                continue
            slots = [j for j in range(active.shape[1]) if active[row, j] == neg]
            if not slots:
                counts["stale"] += 1
                continue
            slot = slots[0]
            counts["checked"] += 1
            if math.isnan(s0[row, slot]):
                s0[row, slot] = score
            first = s0[row, slot]
            if first < s0_min or (drop_ratio * score < first and score < s_max):
                if cursor[row] < pool_sizes[row]:
                    active[row, slot] = cursor[row]
                    s0[row, slot] = float("nan")
                    fresh[row, slot] = True
                    reason[row, slot] = "low_s0" if first < s0_min else "easy"
                    cursor[row] += 1
                    counts["replaced"] += 1
                    counts[f"replaced_{reason[row, slot]}"] += 1
                else:
                    counts["pool_exhausted"] += 1
    return counts


def test_pool_initial_state_and_short_pools():
    pool = NegativePool(["a", "b", "c"], [["n1", "n2", "n3", "n4"], ["m1"], []], k=3)
    assert pool.active.tolist() == [[0, 1, 2], [0, -1, -1], [-1, -1, -1]]
    assert pool.cursor.tolist() == [3, 1, 0]
    assert np.isnan(pool.s0).all()
    assert pool.active_negatives("a") == ["n1", "n2", "n3"]
    assert pool.active_negatives("b") == ["m1"] and pool.active_negatives("c") == []


@pytest.mark.parametrize("seed", range(5))
def test_apply_scores_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = 30, 4
    sizes = rng.integers(0, 9, size=n)
    pool = NegativePool(list(range(n)), [[f"c{i}-{j}" for j in range(s)] for i, s in enumerate(sizes)], k=k)
    active, s0, cursor, fresh = pool.active.copy(), pool.s0.copy(), pool.cursor.copy(), pool.fresh.copy()
    reason = np.full(active.shape, "", dtype=object)
    for _ in range(6):
        rows = rng.choice(n, size=12, replace=True)  # repeated examples: the first occurrence wins
        negs = pool.active[rows].copy()
        negs[rng.random(negs.shape) < 0.1] = 7  # sometimes a negative that is not active (stale)
        scores = rng.uniform(-0.2, 1.0, size=negs.shape)
        scores[rng.random(scores.shape) < 0.05] = np.nan
        counts = pool.apply_scores(rows, negs, scores)
        expected = naive_apply(active, s0, cursor, pool.pool_sizes, rows, negs, scores, fresh=fresh, reason=reason)
        assert counts == expected
        np.testing.assert_array_equal(pool.fresh, fresh)
        np.testing.assert_array_equal(pool.active, active)
        np.testing.assert_array_equal(pool.cursor, cursor)
        np.testing.assert_array_equal(pool.s0, s0)  # NaN == NaN for assert_array_equal
    assert pool.cursor.max() > k  # pools were actually advanced


def test_apply_scores_replacement_and_exhaustion():
    pool = NegativePool(["x"], [["n0", "n1", "n2"]], k=2)
    # First scoring: S0 = S. Slot 0 (S0 = 0.3 < 0.4) goes, slot 1 (0.8) stays.
    counts = pool.apply_scores([0], [[0, 1]], [[0.3, 0.8]])
    assert counts["replaced"] == 1 and pool.active.tolist() == [[2, 1]] and pool.cursor.tolist() == [3]
    assert np.isnan(pool.s0[0, 0]) and pool.s0[0, 1] == 0.8
    # Candidate 1 drops to 0.6 (1.2 * 0.6 < 0.8, 0.6 < 0.7): replace, but the pool is used up -> it stays.
    counts = pool.apply_scores([0], [[2, 1]], [[0.9, 0.6]])
    assert counts == dict(checked=2, replaced=0, used=1, pool_exhausted=1, nan_scores=0, stale=0, replaced_low_s0=0,
                          replaced_easy=0, used_low_s0=1, used_easy=0)
    assert pool.active.tolist() == [[2, 1]] and pool.s0[0].tolist() == [0.9, 0.8]
    # A NaN score is ignored: no S0, no decision.
    fresh = NegativePool(["y"], [["a", "b"]], k=1)
    assert fresh.apply_scores([0], [[0]], [[float("nan")]])["nan_scores"] == 1
    assert np.isnan(fresh.s0[0, 0]) and fresh.active.tolist() == [[0]]


def test_pool_bad_input_is_reported():
    with pytest.raises(ValueError, match=r"duplicated id\(s\): 'a' at rows \[0, 2\]"):
        NegativePool(["a", "b", "a"], [[], [], []])
    with pytest.raises(ValueError, match="3 ids but 2 candidate lists"):
        NegativePool(["a", "b", "c"], [[], []])
    with pytest.raises(TypeError, match="list of texts"):
        NegativePool(["a"], ["just one string"])
    with pytest.raises(TypeError, match="candidate 1 of example 'a' is int"):
        NegativePool(["a"], [["ok", 3]])
    with pytest.raises(ValueError, match="positive integer"):
        NegativePool(["a"], [[]], k=0)
    pool = NegativePool(["a"], [["n"]])
    with pytest.raises(KeyError, match="'zz' is not in the NegativePool"):
        pool.row("zz")
    with pytest.raises(ValueError, match="example rows must be in"):
        pool.apply_scores([5], [[0]], [[0.5]])


def _played_pool():
    """A pool after one step: "a" had slot 0 replaced (not carried yet); "b" has one candidate only."""
    pool = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    pool.apply_scores([0, 1], [[0, 1], [0, -1]], [[0.2, 0.9], [0.5, np.nan]])
    return pool


# The state of _played_pool() as the earlier in-memory arrays (int64 ranks, float64 S0, one bool per slot) held it,
# worked out by hand from eq. 6: a/slot 0 (S0 0.2 < 0.4) -> candidate 2, S0 reset; a/slot 1 keeps S0 0.9;
# b/slot 0 keeps S0 0.5 (0.5 >= 0.4, no drop).
PLAYED_ACTIVE = [[2, 1], [0, -1]]
PLAYED_S0 = [[np.nan, 0.9], [0.5, np.nan]]
PLAYED_CURSOR = [3, 1]
PLAYED_FRESH = [[True, False], [False, False]]


def assert_played_state(pool):
    np.testing.assert_array_equal(pool.active.astype(np.int64), np.array(PLAYED_ACTIVE, dtype=np.int64))
    np.testing.assert_array_equal(pool.s0, np.array(PLAYED_S0, dtype=np.float64))
    np.testing.assert_array_equal(pool.cursor.astype(np.int64), np.array(PLAYED_CURSOR, dtype=np.int64))
    assert pool.fresh.tolist() == PLAYED_FRESH


def test_pool_state_roundtrip_and_mismatch():
    pool = _played_pool()
    assert_played_state(pool)
    state = pool.state_dict()
    other = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    other.load_state_dict(state)
    assert_played_state(other)
    # load_state_dict copies by default: the two pools do not share state.
    pool.apply_scores([1], [[0, -1]], [[0.1, np.nan]])
    assert pool.active.tolist() == [[2, 1], [0, -1]] and pool.cursor.tolist() == [3, 1]  # "b" exhausted: stays
    assert np.isnan(other.s0[1, 1]) and other.s0[1, 0] == 0.5
    pool.apply_scores([0], [[2, 1]], [[0.95, 0.9]])
    assert pool.fresh.tolist() == [[False, False], [False, False]] and other.fresh.tolist() == PLAYED_FRESH
    with pytest.raises(ValueError, match="belongs to other pools"):
        NegativePool(["a", "b"], [["n0", "n1", "CHANGED"], ["m0"]], k=2).load_state_dict(state)
    with pytest.raises(ValueError, match="belongs to other pools"):
        NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=3).load_state_dict(state)


def _legacy_state(version, fingerprint):
    """A version-1/2 pool state exactly as earlier releases wrote it into dhnm_state.json (JSON lists)."""
    state = {"version": version, "num_examples": 2, "k": 2, "fingerprint": fingerprint,
             "active": PLAYED_ACTIVE, "s0": [[None, 0.9], [0.5, None]], "cursor": PLAYED_CURSOR}
    if version == 2:
        state["fresh"] = [0]  # flat index of a/slot 0
    return state


def test_callback_saves_binary_state_atomically_and_loads_it(st_model, tmp_path):
    from conan_hf.losses import InfoNCELoss

    pool = _played_pool()
    callback = DHNMCallback(pool, InfoNCELoss(st_model))
    callback.totals["replaced"] = 1
    path = callback.save(tmp_path, global_step=7)
    assert Path(path).name == DHNM_STATE_NAME == "dhnm_state.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dhnm_state.npz"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as saved:  # plain arrays in compact dtypes, no pickled objects
        assert saved["active"].dtype == np.int16 and saved["cursor"].dtype == np.int16
        assert saved["s0"].dtype == np.float64 and saved["fresh_bits"].dtype == np.uint8
        assert saved["fresh_bits"].tolist() == [[1], [0]]  # bit 0 = slot 0 of "a"
        meta = json.loads(str(saved["meta"]))
    assert meta["global_step"] == 7 and meta["totals"]["replaced"] == 1 and meta["pool"]["version"] == 3

    resumed = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    resumed_cb = DHNMCallback(resumed, InfoNCELoss(st_model))
    resumed_cb.load(tmp_path, expected_step=7)
    assert_played_state(resumed)
    assert resumed_cb.totals["replaced"] == 1
    with pytest.raises(ValueError, match="step 7, but training resumes at step 8"):
        resumed_cb.load(tmp_path, expected_step=8)


@pytest.mark.parametrize("version", [1, 2])
def test_callback_loads_legacy_json_state(st_model, tmp_path, version):
    from conan_hf.losses import InfoNCELoss

    pool = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    legacy = {"global_step": 4, "thresholds": {"s0_min": 0.4, "drop_ratio": 1.2, "s_max": 0.7},
              "totals": {"checked": 3, "replaced": 1}, "pool": _legacy_state(version, pool.fingerprint())}
    (tmp_path / "dhnm_state.json").write_text(json.dumps(legacy))
    callback = DHNMCallback(pool, InfoNCELoss(st_model))
    callback.load(tmp_path, expected_step=4)
    np.testing.assert_array_equal(pool.active, PLAYED_ACTIVE)
    np.testing.assert_array_equal(pool.s0, np.array(PLAYED_S0))
    np.testing.assert_array_equal(pool.cursor, PLAYED_CURSOR)
    # Version 1 predates the "fresh" flags: no replacement is known to be pending.
    assert pool.fresh.tolist() == (PLAYED_FRESH if version == 2 else [[False, False], [False, False]])
    assert callback.totals["checked"] == 3 and callback.totals["replaced"] == 1 and callback.totals["used"] == 0
    assert pool.active.dtype == np.int16  # converted to the compact dtypes
    # It then trains on exactly like a pool that made those decisions itself.
    reference = _played_pool()
    if version == 1:
        reference.fresh_bits[:] = 0
    for p in (pool, reference):
        p.apply_scores([0, 1], [[2, 1], [0, -1]], [[0.3, 0.6], [0.45, np.nan]])
    for name in ("active", "s0", "cursor", "fresh_bits"):
        np.testing.assert_array_equal(getattr(pool, name), getattr(reference, name))


def test_pool_state_is_compact():
    n, k = 1000, 7
    pool = NegativePool(list(range(n)), [["t"] * 9] * n, k=k)
    # int16 ranks (active, cursor, pool_sizes), float64 S0, one bit per "fresh" flag: 14 + 56 + 2 + 2 + 1 bytes.
    assert pool.state_nbytes() == n * (2 * k + 8 * k + 2 + 2 + 1) == 75 * n
    assert pool.active.dtype == pool.cursor.dtype == pool.pool_sizes.dtype == np.int16
    assert pool.fresh_bits.shape == (n, 1)
    big = NegativePool(["x", "y"], [["t"] * 40_000, ["u"]], k=9)  # ranks past int16: int32, 2 flag bytes
    assert big.active.dtype == np.int32 and big.fresh_bits.shape == (2, 2)
    assert big.state_nbytes() == 2 * (4 * 9 + 8 * 9 + 4 + 4 + 2)
    big.apply_scores([0], [[0, 1, 2, 3, 4, 5, 6, 7, 8]], [[0.1] * 9])  # all nine slots: flags across two bytes
    assert big.fresh.tolist() == [[True] * 9, [False] * 9] and big.cursor.tolist() == [18, 1]
    assert big.active[0].tolist() == list(range(9, 18))


class _FixedHash:
    """An id whose hash collides with every other _FixedHash (and with the int 7)."""

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return 7

    def __eq__(self, other):
        return isinstance(other, _FixedHash) and other.name == self.name

    def __repr__(self):
        return f"_FixedHash({self.name!r})"


def test_pool_id_index_is_compact_and_handles_hash_collisions():
    n = 1000
    pool = NegativePool([f"task/{i}" for i in range(n)], [["t"] * 9] * n, k=7)
    assert pool.memory_nbytes() == (75 + 12) * n  # state arrays + sorted 64-bit hashes + int32 rows
    assert [pool.row(f"task/{i}") for i in (0, 517, 999)] == [0, 517, 999]
    # In CPython hash(-1) == hash(-2) == -2; _FixedHash ids all hash to 7, as does the int 7.
    ids = [-1, _FixedHash("a"), 5, -2, _FixedHash("b"), 7]
    pool = NegativePool(ids, [["x"]] * len(ids), k=1)
    assert [pool.row(i) for i in ids] == list(range(len(ids)))
    for missing in (-3, _FixedHash("c"), 6, "5", ["unhashable"]):
        with pytest.raises(KeyError, match="is not in the NegativePool"):
            pool.row(missing)
    duplicated = r"2 duplicated id\(s\): _FixedHash\('a'\) at rows \[1, 3\]; -2 at rows \[2, 4\]"
    with pytest.raises(ValueError, match=duplicated):
        NegativePool([_FixedHash("b"), _FixedHash("a"), -2, _FixedHash("a"), -2], [[]] * 5)
    with pytest.raises(TypeError, match=r"row 1 has id \['unhashable'\]"):
        NegativePool(["a", ["unhashable"]], [[], []])


class _NoFullScan(np.ndarray):
    """An array whose whole-array reductions fail: per-step updates must index the rows they were given only."""

    num_examples = 50

    def _guard(name):
        def reduction(self, *args, **kwargs):
            if self.ndim and self.shape[0] == _NoFullScan.num_examples:  # a whole array, not the rows of a step
                raise AssertionError(f"apply_scores computed .{name}() over a whole per-example array")
            return getattr(np.asarray(self), name)(*args, **kwargs)
        return reduction

    max, min, sum, any, all = _guard("max"), _guard("min"), _guard("sum"), _guard("any"), _guard("all")


def test_apply_scores_does_not_scan_the_whole_pool():
    pool = NegativePool(list(range(50)), [[f"c{i}-{j}" for j in range(6)] for i in range(50)], k=2)
    reference = NegativePool(list(range(50)), [[f"c{i}-{j}" for j in range(6)] for i in range(50)], k=2)
    for name in ("pool_sizes", "cursor", "active", "s0", "fresh_bits"):
        setattr(pool, name, getattr(pool, name).view(_NoFullScan))
    rows = np.array([3, 7, 3])
    negs = np.array([[0, 1], [0, 1], [0, 1]])
    scores = np.array([[0.2, 0.8], [0.9, 0.3], [0.5, 0.5]])
    assert pool.apply_scores(rows, negs, scores) == reference.apply_scores(rows, negs, scores)
    for name in ("pool_sizes", "cursor", "active", "s0", "fresh_bits"):
        np.testing.assert_array_equal(np.asarray(getattr(pool, name)), getattr(reference, name))


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
    for step in range(12):
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


def test_fingerprint_follows_content_not_chunking_and_old_states_still_load(st_model, tmp_path):
    import hashlib

    import pyarrow as pa

    from conan_hf.losses import InfoNCELoss

    ids = np.array([[2, 0], [1, -1]])
    one = NegativePool.from_ids(None, ids, pa.array(["t0", "t1", "t2"]), k=2)
    chunked = NegativePool.from_ids(None, ids, pa.chunked_array([["t0"], ["t1", "t2"]]), k=2)
    assert one.fingerprint() == chunked.fingerprint()
    assert NegativePool.from_ids(None, ids, pa.array(["t0", "t1", "tX"]), k=2).fingerprint() != one.fingerprint()
    assert NegativePool.from_ids(None, ids[::-1].copy(), pa.array(["t0", "t1", "t2"]), k=2).fingerprint() != \
        one.fingerprint()
    # A dhnm_state.npz of the previous release: its fingerprint is sha256 over k, then per example repr(id), NUL,
    # the candidate texts joined by \x1f, \x1e (recomputed here by hand for _played_pool's data).
    old = hashlib.sha256(b"2")
    for example_id, texts in (("a", ["n0", "n1", "n2"]), ("b", ["m0"])):
        old.update(repr(example_id).encode() + b"\x00" + "\x1f".join(texts).encode() + b"\x1e")
    played = _played_pool()
    callback = DHNMCallback(played, InfoNCELoss(st_model))
    callback.save(tmp_path, global_step=2)
    with np.load(tmp_path / DHNM_STATE_NAME) as saved:
        arrays = {name: saved[name] for name in saved.files}
    meta = json.loads(str(arrays.pop("meta")))
    assert meta["pool"]["fingerprint"].startswith("ids-v1:")
    meta["pool"]["fingerprint"] = old.hexdigest()
    with open(tmp_path / DHNM_STATE_NAME, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    resumed = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    DHNMCallback(resumed, InfoNCELoss(st_model)).load(tmp_path, expected_step=2)
    assert_played_state(resumed)
    with pytest.raises(ValueError, match="belongs to other pools"):
        DHNMCallback(NegativePool(["a", "b"], [["n0", "n1", "nX"], ["m0"]], k=2), InfoNCELoss(st_model)).load(
            tmp_path)


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


def test_pool_from_columns():
    from datasets import Dataset

    ds = Dataset.from_dict(
        {
            "id": ["q1", "q2", "q3"],
            "anchor": ["a1", "a2", "a3"],
            "positive": ["p1", "p2", "p3"],
            "negative_1": ["x1", "", "z1"],
            "negative_2": ["x2", "y2", "z1"],
        }
    )
    pool = NegativePool.from_columns(ds, k=2)
    assert pool.candidates == [["x1", "x2"], ["y2"], ["z1"]]  # empty skipped, repeated text kept once
    listed = Dataset.from_dict({"id": [1, 2], "negatives": [["a", "b", "c"], []]})
    assert NegativePool.from_columns(listed, k=2).candidates == [["a", "b", "c"], []]
    with pytest.raises(ValueError, match="no 'id' column"):
        NegativePool.from_columns(ds.remove_columns("id"))


def test_pool_from_mining_respects_rank_and_false_negative_margin(st_model):
    from datasets import Dataset

    anchors = [f"the {s} sleeps on the" for s in SUBJECTS]
    positives = [f"the {s} sleeps on the {p}" for s, p in zip(SUBJECTS, PLACES)]
    ds = Dataset.from_dict({"id": [f"e{i}" for i in range(8)], "anchor": anchors, "positive": positives})
    corpus = [f"the {s} sleeps on the {p}" for s in SUBJECTS[:4] for p in PLACES[:4]]
    margin = 0.05
    pool = NegativePool.from_mining(ds, st_model, k=3, num_candidates=6, relative_margin=margin, corpus=corpus,
                                    verbose=False)
    assert len(pool) == 8 and pool.k == 3
    assert sum(len(c) for c in pool.candidates) > 0
    for i, candidates in enumerate(pool.candidates):
        assert positives[i] not in candidates and len(candidates) <= 6
        if not candidates:
            continue
        q = st_model.encode([anchors[i]], convert_to_tensor=True)
        docs = st_model.encode([positives[i], *candidates], convert_to_tensor=True)
        scores = (q @ docs.T)[0].tolist()
        positive, negatives = scores[0], scores[1:]
        assert negatives == sorted(negatives, reverse=True) or np.allclose(negatives, sorted(negatives, reverse=True),
                                                                            atol=1e-5)
        # False-negative filter: every kept candidate scores at most 95% of the positive's score magnitude below it.
        assert all(s <= positive - abs(positive) * margin + 1e-5 for s in negatives)


# ---- collator -------------------------------------------------------------------------------------------------------
SUBJECTS = ["cat", "dog", "bird", "horse", "fish", "mouse", "lion", "bear"]
PLACES = ["mat", "rug", "sofa", "bed", "floor", "chair", "table", "roof"]


def make_dataset():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "id": list(range(8)),
            "anchor": [f"the {s} sleeps on the" for s in SUBJECTS],
            "positive": [f"the {s} sleeps on the {p}" for s, p in zip(SUBJECTS, PLACES)],
        }
    )


def make_pool(k=2):
    # Near-duplicates of the positive: hard at first (cosine ~0.9), they get easier as training separates them.
    candidates = [[f"the {s} sleeps on the {q}" for q in PLACES if q != p][:5] for s, p in zip(SUBJECTS, PLACES)]
    return NegativePool(list(range(8)), candidates, k=k)


@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir))


class _RecordedScores(torch.nn.Module):
    """A score source (conan_hf.dhnm.contract) handing over fixed records, as InfoNCELoss does after a step."""

    def __init__(self, records):
        super().__init__()
        self.records = list(records)

    def pop_hard_negative_scores(self):
        records, self.records = self.records, []
        return records


def test_contract_routes_the_scores_of_every_task_loss_to_the_callback(st_model):
    from conan_hf.dhnm import HardNegativeScores, HardNegativeScoreSource, MultiTaskScores, find_score_source
    from conan_hf.losses import CoSENTLoss, InfoNCELoss, MatryoshkaLoss

    info_nce = InfoNCELoss(st_model)
    assert isinstance(info_nce, HardNegativeScoreSource)
    assert not isinstance(CoSENTLoss(st_model), HardNegativeScoreSource)
    assert find_score_source(MatryoshkaLoss(st_model, info_nce, [32, 16])) is info_nce
    with pytest.raises(TypeError, match="does not record hard-negative scores"):
        DHNMCallback(make_pool(), CoSENTLoss(st_model))

    def record(rows, negs, scores):
        return HardNegativeScores(torch.tensor(rows), torch.tensor(negs), torch.tensor(scores, dtype=torch.float64), 8)

    first = [record([0, 1], [[0, 1], [0, 1]], [[0.9, 0.3], [0.8, 0.75]])]
    second = [record([5], [[1, 0]], [[0.2, 0.95]]), record([6], [[0, -1]], [[0.5, float("nan")]])]
    # A loss per task, one of them wrapped (as MatryoshkaLoss wraps InfoNCE), one without scores (CoSENT for STS).
    losses = {"qa": _RecordedScores(first), "sts": CoSENTLoss(st_model),
              "clr": torch.nn.Sequential(_RecordedScores(second))}
    assert [len(source.records) for source in MultiTaskScores(losses).sources] == [1, 2]
    pool, reference = make_pool(), make_pool()
    callback = DHNMCallback(pool, losses)
    callback.on_step_end(None, None, None)
    # The same decisions as the task records applied to a pool directly, in task order (qa, then clr).
    expected = reference.apply_scores([0, 1, 5, 6], [[0, 1], [0, 1], [1, 0], [0, -1]],
                                      [[0.9, 0.3], [0.8, 0.75], [0.2, 0.95], [0.5, np.nan]])
    assert callback.last_step_counts == expected and expected["checked"] == 7 and expected["replaced"] == 2
    for name in ("active", "s0", "cursor", "fresh_bits"):
        np.testing.assert_array_equal(getattr(pool, name), getattr(reference, name))
    assert MultiTaskScores(losses).pop_hard_negative_scores() == []  # popped once


def test_collator_fills_negatives_from_pool_and_passes_ids(st_model):
    pool = NegativePool([10, 11, 12], [["a0", "a1", "a2"], ["b0"], []], k=2)
    texts = []

    def recording_preprocess(inputs, prompt=None, **kwargs):
        texts.append(list(inputs))
        return st_model.preprocess(inputs, prompt=prompt, **kwargs)

    collator = DHNMDataCollator(preprocess_fn=recording_preprocess, pool=pool)
    rows = [
        {"id": 12, "anchor": "q12", "positive": "p12", "negative": "ignored"},
        {"id": 10, "anchor": "q10", "positive": "p10", "negative": "ignored"},
        {"id": 11, "anchor": "q11", "positive": "p11", "negative": "ignored"},
    ]
    batch = collator(rows)
    # id is not tokenised; the data's own negative column is replaced by the pool's k active negatives, and
    # empty slots carry the row's positive as a placeholder (masked out by the loss through the -1 ids).
    assert texts == [["q12", "q10", "q11"], ["p12", "p10", "p11"], ["p12", "a0", "b0"], ["p12", "a1", "p11"]]
    assert batch["label"].tolist() == [[2, -1, -1], [0, 0, 1], [1, 0, -1]]
    assert not any(key.startswith("id_") or key.startswith("negative_input") for key in batch)
    # After a replacement the same example carries its new negative.
    pool.apply_scores([0], [[0, 1]], [[0.1, 0.9]])
    texts.clear()
    batch = collator([rows[1]])
    assert texts[2] == ["a2"] and batch["label"].tolist() == [[0, 2, 1]]


def test_collator_bad_input(st_model):
    pool = NegativePool([1], [["n"]], k=1)
    collator = DHNMDataCollator(preprocess_fn=st_model.preprocess, pool=pool)
    with pytest.raises(ValueError, match="no 'id' column"):
        collator([{"anchor": "a", "positive": "p"}])
    with pytest.raises(ValueError, match="id 2 is not in the NegativePool"):
        collator([{"id": 2, "anchor": "a", "positive": "p"}])
    with pytest.raises(ValueError, match=r"column\(s\) \['label'\] would be read as labels"):
        collator([{"id": 1, "anchor": "a", "positive": "p", "label": 1.0}])
    with pytest.raises(ValueError, match="needs a NegativePool"):
        DHNMDataCollator(preprocess_fn=st_model.preprocess)([{"id": 1, "anchor": "a", "positive": "p"}])


# ---- real Trainer runs ----------------------------------------------------------------------------------------------
def snapshot_callback(events):
    """Factory of a TrainerCallback placed before DHNMCallback: it records the pool and the scores the loss
    recorded, right before each step's decisions."""
    from transformers import TrainerCallback

    def make(pool, loss):
        class Snapshot(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                records = [
                    (r.example_ids.numpy().copy(), r.negative_ids.numpy().copy(), r.scores.numpy().astype(float))
                    for r in loss.peek_hard_negative_scores()
                ]
                events.append(
                    ("step_end", state.global_step, pool.active.copy(), pool.s0.copy(), pool.cursor.copy(), records,
                     pool.fresh.copy())
                )

        return Snapshot()

    return make


def train(model_dir, out_dir, pool, max_steps, *, stop_at=None, resume=None, extra_callbacks=(), preprocess=None,
          save_steps=None, **arg_overrides):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    from conan_hf.losses import InfoNCELoss

    model = SentenceTransformer(str(model_dir))
    loss = InfoNCELoss(model, temperature=0.05)
    dhnm = DHNMCallback(pool, loss)
    callbacks = [make(pool, loss) for make in extra_callbacks]
    if stop_at is not None:
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop_at:
                    control.should_training_stop = True

        callbacks.append(Stop())
    settings = dict(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        seed=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    args = SentenceTransformerTrainingArguments(**{**settings, **arg_overrides})
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(),
        loss=loss,
        data_collator=DHNMDataCollator(preprocess_fn=preprocess(model) if preprocess else model.preprocess,
                                       pool=pool),
        callbacks=[*callbacks, dhnm],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, dhnm, loss


def dhnm_logs(trainer):
    return {h["step"]: {k: v for k, v in h.items() if k.startswith("dhnm_")} for h in trainer.state.log_history
            if "loss" in h}


def run_and_replay(model_dir, out_dir, max_steps=10, **overrides):
    """Train with DHNM, replay every step's decisions with the loop reference, and check the next batch of each
    changed example carries its new negative. Returns (drop_replacements, new_negative_checks, trainer)."""
    pool = make_pool(k=2)
    events: list = []

    def recording(model):
        def preprocess(inputs, prompt=None, **kwargs):
            events.append(("column", list(inputs)))
            return model.preprocess(inputs, prompt=prompt, **kwargs)

        return preprocess

    trainer, dhnm, _ = train(model_dir, out_dir, pool, max_steps=max_steps, preprocess=recording,
                             extra_callbacks=[snapshot_callback(events)], **overrides)
    logs = dhnm_logs(trainer)
    assert sorted(logs) == list(range(1, max_steps + 1))

    steps = [e for e in events if e[0] == "step_end"]
    posts = [(s[2], s[3], s[4]) for s in steps[1:]] + [(pool.active, pool.s0, pool.cursor)]
    drop_replacements = 0
    new_negative_checks = 0
    reason = np.full(pool.active.shape, "", dtype=object)  # the clause behind each slot's replacement, across steps
    for (_, step, active, s0, cursor, records, fresh), (post_active, post_s0, post_cursor) in zip(steps, posts):
        # The decisions follow eq. 6 on exactly the scores the loss recorded for this step.
        pre_active, pre_s0 = active.copy(), s0.copy()
        active, s0, cursor, fresh = active.copy(), s0.copy(), cursor.copy(), fresh.copy()
        counts = dict.fromkeys(COUNTS, 0)
        for rows, negs, scores in records:
            step_counts = naive_apply(active, s0, cursor, pool.pool_sizes, rows, negs, scores, fresh=fresh,
                                      reason=reason)
            counts = {k: counts[k] + step_counts[k] for k in counts}
        np.testing.assert_array_equal(post_active, active)
        np.testing.assert_array_equal(post_cursor, cursor)
        np.testing.assert_array_equal(post_s0, s0)
        # The counts reach the Trainer's logs (nothing is re-queued: a plain SentenceTransformerTrainer's sampler).
        assert logs[step] == {f"dhnm_{k}": v for k, v in {**counts, "requeued": 0, "requeue_late": 0}.items()}
        assert counts["checked"] == 4 * 2  # batch of 4, k = 2, every pair scored

        index = next(i for i, e in enumerate(events) if e[0] == "step_end" and e[1] == step)
        later = [e[1] for e in events[index + 1 :] if e[0] == "column"]
        for row, slot in np.argwhere(post_active != pre_active):
            if not math.isnan(pre_s0[row, slot]):
                drop_replacements += 1  # replaced because its score fell, not at its first scoring
            # The next batch containing this example (collated after the decision) carries the new negative.
            anchor = f"the {SUBJECTS[row]} sleeps on the"
            for b in range(0, len(later) - 3, 4):  # one batch = anchor, positive, negative_1, negative_2 columns
                if anchor in later[b]:
                    position = later[b].index(anchor)
                    assert later[b + 2 + slot][position] == pool.candidates[row][post_active[row, slot]]
                    new_negative_checks += 1
                    break
    assert dhnm.totals["replaced"] == sum(v["dhnm_replaced"] for v in logs.values())
    return drop_replacements, new_negative_checks, trainer


@pytest.mark.slow
def test_trainer_run_replaces_falling_negatives_and_next_batch_carries_them(tiny_model_dir, tmp_path):
    # 10 steps = 5 epochs of 8 examples: enough for the near-duplicate negatives to become easy under training
    # (checked on 10 random initialisations of the tiny model: 3-14 drop replacements, 2-14 re-batched checks).
    drop_replacements, new_negative_checks, _ = run_and_replay(tiny_model_dir, tmp_path / "run", max_steps=10)
    assert drop_replacements >= 1
    assert new_negative_checks >= 1


@pytest.mark.slow
def test_kill_and_resume_gives_same_state_and_losses(tiny_model_dir, tmp_path):
    full_pool = make_pool(k=2)
    full, full_cb, _ = train(tiny_model_dir, tmp_path / "full", full_pool, max_steps=6, save_steps=3)

    first_pool = make_pool(k=2)
    train(tiny_model_dir, tmp_path / "cut", first_pool, max_steps=6, save_steps=3, stop_at=3)
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    with np.load(checkpoint / DHNM_STATE_NAME) as saved:
        assert json.loads(str(saved["meta"]))["global_step"] == 3
        assert not np.isnan(saved["s0"]).all()  # a non-trivial state was saved
    assert not (tmp_path / "cut" / "checkpoint-6").exists()

    resumed_pool = make_pool(k=2)  # a fresh process would rebuild the pools from the data
    resumed, resumed_cb, _ = train(tiny_model_dir, tmp_path / "cut", resumed_pool, max_steps=6, save_steps=3,
                                   resume=str(checkpoint))
    np.testing.assert_array_equal(resumed_pool.active, full_pool.active)
    np.testing.assert_array_equal(resumed_pool.cursor, full_pool.cursor)
    np.testing.assert_allclose(resumed_pool.s0, full_pool.s0, rtol=1e-5, atol=1e-6)
    assert resumed_cb.totals == full_cb.totals
    full_logs = {h["step"]: h for h in full.state.log_history if "loss" in h}
    resumed_logs = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    assert sorted(resumed_logs) == sorted(full_logs) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed_logs[step]["loss"] == pytest.approx(full_logs[step]["loss"], rel=1e-4)
        assert {k: v for k, v in resumed_logs[step].items() if k.startswith("dhnm_")} == {
            k: v for k, v in full_logs[step].items() if k.startswith("dhnm_")
        }
    # The state files of the final checkpoints agree too.
    with np.load(tmp_path / "full" / "checkpoint-6" / DHNM_STATE_NAME) as a, \
            np.load(tmp_path / "cut" / "checkpoint-6" / DHNM_STATE_NAME) as b:
        for name in ("active", "cursor", "fresh_bits"):
            np.testing.assert_array_equal(a[name], b[name])

    # Resuming without the DHNM state is an error, not a silent restart of the pools.
    bare = tmp_path / "bare" / "checkpoint-3"
    shutil.copytree(checkpoint, bare)
    (bare / DHNM_STATE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no dhnm_state.npz \(or dhnm_state.json\) was found"):
        train(tiny_model_dir, tmp_path / "bare", make_pool(k=2), max_steps=6, resume=str(bare))


def test_callback_refuses_dataloader_workers(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        train(tiny_model_dir, tmp_path / "w", make_pool(), max_steps=1, dataloader_num_workers=1)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch.distributed as dist
    from dhnm_case import make_dataset, make_pool, train_with

    out = sys.argv[2]
    pool = make_pool()
    seen = []
    trainer, dhnm = train_with(sys.argv[1], out, pool, seen)
    rank = dist.get_rank()
    arrays = pool.state_dict()
    state = {
        "world_size": dist.get_world_size(),
        "pool": {"fingerprint": arrays["fingerprint"], "active": arrays["active"].tolist(),
                 "cursor": arrays["cursor"].tolist(), "fresh_bits": arrays["fresh_bits"].tolist(),
                 "s0": [[None if v != v else v for v in row] for row in arrays["s0"].tolist()]},
        "totals": dhnm.totals,
        "logs": [{k: v for k, v in h.items() if k.startswith("dhnm_") or k == "step"}
                 for h in trainer.state.log_history if "loss" in h],
        "seen_ids": seen,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(state, f)
    """
)

CASE_MODULE = textwrap.dedent(
    """
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments,
    )
    from conan_hf.losses import InfoNCELoss
    from conan_hf.dhnm import DHNMCallback, DHNMDataCollator, NegativePool

    SUBJECTS = {subjects!r}
    PLACES = {places!r}

    def make_dataset():
        return Dataset.from_dict({{
            "id": list(range(8)),
            "anchor": [f"the {{s}} sleeps on the" for s in SUBJECTS],
            "positive": [f"the {{s}} sleeps on the {{p}}" for s, p in zip(SUBJECTS, PLACES)],
        }})

    def make_pool(k=2):
        candidates = [
            [f"the {{s}} sleeps on the {{q}}" for q in PLACES if q != p][:5] for s, p in zip(SUBJECTS, PLACES)
        ]
        return NegativePool(list(range(8)), candidates, k=k)

    class Recording(DHNMDataCollator):
        def __call__(self, features):
            self.seen.extend(int(f["id"]) for f in features)
            return super().__call__(features)

    def train_with(model_dir, out, pool, seen):
        model = SentenceTransformer(model_dir)
        # Cross-device negatives too: each query also sees the other rank's documents.
        loss = InfoNCELoss(model, temperature=0.05, gather_across_devices=True)
        dhnm = DHNMCallback(pool, loss)
        collator = Recording(preprocess_fn=model.preprocess, pool=pool)
        collator.seen = seen
        args = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=2e-3,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=1,
            use_cpu=True, disable_tqdm=True, ddp_backend="gloo",
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=make_dataset(), loss=loss,
                                             data_collator=collator, callbacks=[dhnm])
        trainer.train()
        return trainer, dhnm
    """
)


@pytest.mark.slow
def test_two_process_run_makes_identical_decisions_on_both_ranks(tiny_model_dir, tmp_path):
    (tmp_path / "dhnm_case.py").write_text(CASE_MODULE.format(subjects=SUBJECTS, places=PLACES))
    script = tmp_path / "ddp_dhnm.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tiny_model_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    # Each rank batched its own shard of the data ...
    assert set(r0["seen_ids"]) and set(r1["seen_ids"]) and not set(r0["seen_ids"][:2]) & set(r1["seen_ids"][:2])
    # ... yet both judged every pair scored on either rank (2 ranks x 2 rows x k=2 per step) ...
    assert [log["dhnm_checked"] for log in r0["logs"]] == [8, 8, 8, 8]
    # ... and made the same decisions: identical pools, S0 values and counts.
    assert r0["pool"] == r1["pool"]
    assert r0["totals"] == r1["totals"] and r0["logs"] == r1["logs"]
    scored = {i for i, row in enumerate(r0["pool"]["s0"]) if any(v is not None for v in row)}
    replaced = {i for i, c in enumerate(r0["pool"]["cursor"]) if c > 2}
    assert (scored | replaced) >= set(r0["seen_ids"]) | set(r1["seen_ids"])


# ---- stage 4 with its default schedule ------------------------------------------------------------------------------
def _stage4_config(model_dir, data_file, out_dir, **overrides):
    """Stage 4 as `conan-train supervised` builds it (the shipped YAML, no preset): the schedule
    (num_train_epochs, max_steps) is the shipped default; only size, data and speed options are overridden."""
    from conan_hf.training.config import default_config_path, load_config
    from conan_hf.stages.supervised import SupervisedConfig

    values = {
        "model": str(model_dir), "output_dir": str(out_dir / "run"), "final_dir": str(out_dir / "final"),
        "tasks": [{"name": "qa", "type": "retrieval", "data": [{"path": str(data_file)}], "batch_size": 4,
                   "prompt": "find where it sleeps"}],
        "num_negatives": 2, "max_seq_length": 32, "num_threads": 1, "bf16": False, "gradient_checkpointing": False,
        "logging_steps": 1, "save_steps": 1000, "disable_tqdm": True,
        # S0 < 2 holds for every cosine: each negative is replaced at its first scoring, so the run makes
        # replacements whatever the tiny random model's scores are (eq. 6 itself is tested above).
        "dhnm_s0_min": 2.0,
        **overrides,
    }
    config = load_config(SupervisedConfig, default_config_path("supervised"), preset=None, overrides=values)
    assert config.max_steps <= 0 and config.num_train_epochs >= 2  # the shipped schedule, not the test's
    return config


def _stage4_rows():
    positives = [f"the {s} sleeps on the {p}" for s, p in zip(SUBJECTS, PLACES)]
    rows = []
    for i, (s, p) in enumerate(zip(SUBJECTS, PLACES)):
        # The two hardest candidates are other rows' positives: whenever such a row shares the batch, the candidate
        # is an in-batch false negative of that row's query (the sampler only sees id/anchor/positive).
        near = [f"the {s} sleeps on the {q}" for q in PLACES if q != p][:4]
        rows.append({"query": f"the {s} sleeps on the", "positive": positives[i],
                     "negatives": [positives[(i + 1) % 8], positives[(i + 2) % 8], *near]})
    return rows


def _weights(final_dir):
    from safetensors.torch import load_file

    files = sorted(Path(final_dir).rglob("*.safetensors"))
    assert files, f"no weights in {final_dir}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_stage4_default_schedule_uses_replacements_and_masks_false_negatives(tiny_model_dir, tmp_path):
    from conan_hf.stages import supervised

    rows = _stage4_rows()
    data_file = tmp_path / "qa.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = []
    original = supervised.MultiTaskCollator.__call__

    def spy(self, features):
        batch = original(self, features)
        batches.append(([f["positive"] for f in features], batch["label"].numpy().copy(), self.pool))
        return batch

    histories = []
    from conan_hf.training import runner

    original_finish = runner.finish_stage

    def finish(trainer, *args, **kwargs):
        histories.append([h for h in trainer.state.log_history if "loss" in h])
        return original_finish(trainer, *args, **kwargs)

    threads = torch.get_num_threads()
    supervised.MultiTaskCollator.__call__ = spy
    runner.finish_stage = finish
    try:
        on = supervised.run(_stage4_config(tiny_model_dir, data_file, tmp_path / "on"))
        on_batches, batches[:] = list(batches), []
        off = supervised.run(_stage4_config(tiny_model_dir, data_file, tmp_path / "off", dhnm=False))
        off_batches = list(batches)
    finally:
        supervised.MultiTaskCollator.__call__ = original
        runner.finish_stage = original_finish
        torch.set_num_threads(threads)

    # DHNM changes training: the replaced negatives are trained in the second pass, so the weights differ.
    on_weights, off_weights = _weights(on["final_dir"]), _weights(off["final_dir"])
    assert on_weights.keys() == off_weights.keys()
    assert any(not torch.equal(on_weights[k], off_weights[k]) for k in on_weights)
    assert off["dhnm"] is None and len(off_batches) == len(on_batches) == on["global_step"] == 4  # 2 epochs x 2

    # Independent count of "used": distinct (example, candidate) pairs beyond the initially active ones that a
    # trained batch carried (every collated batch was trained: the run ends with its epoch).
    pool = on_batches[0][2]
    initially_active = np.minimum(pool.pool_sizes, pool.k)
    carried = {(int(label[0]), int(rank)) for _, labels, _ in on_batches for label in labels for rank in label[1:]
               if rank >= initially_active[label[0]]}
    dhnm = on["dhnm"]
    assert dhnm["used"] == len(carried) == 16  # 8 examples x 2 slots replaced in epoch 1, carried in epoch 2
    assert dhnm["replaced"] == 32 and dhnm["pending"] == 16 and dhnm["used_fraction"] == 0.5
    # The per-step logs carry the counts: nothing used in epoch 1 (steps 1-2), all 16 in epoch 2.
    assert [h["dhnm_used"] for h in histories[0]] == [0, 0, 8, 8]
    assert sum(h["dhnm_replaced"] for h in histories[0]) == 32

    # Independent count of masked in-batch false negatives: pairs (query i, filled negative slot of any row of the
    # batch) whose text is query i's positive.
    expected_masked = 0
    for positives, labels, batch_pool in on_batches:
        for row_positive in positives:
            for label in labels:
                texts = [batch_pool.candidates[int(label[0])][int(r)] for r in label[1:] if r >= 0]
                expected_masked += sum(text == row_positive for text in texts)
    assert expected_masked > 0  # the data makes some (rows i and i+1 or i+2 share a batch in epoch 1)
    assert on["false_negatives_masked"] == expected_masked
    assert sum(h["infonce_false_negatives_masked"] for h in histories[0]) == expected_masked


def test_stage4_tables_are_memory_mapped_and_the_pool_matches_the_rows(st_model, tmp_path, monkeypatch):
    from datasets.table import MemoryMappedTable

    from conan_hf.stages import supervised
    from conan_hf.stages.supervised import (
        TaskConfig,
        TaskTable,
        build_negative_pool,
        iter_task_examples,
        task_rows,
        write_task_table,
    )

    monkeypatch.setattr(supervised, "_TABLE_BATCH_ROWS", 3)  # several Arrow record batches per file
    qa_rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}-{j}" for j in range(i % 4)]}
               for i in range(8)]
    qa_rows[5] = {"query": "q5", "positive": "p5", "negative_1": "x", "negative_2": "y"}
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    labels = ["sport", "music", "food"]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": labels[i % 3]}) + "\n"
                                                for i in range(7)))
    (tmp_path / "sts.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 0.5}\n')
    tasks = [TaskConfig(name="qa", type="retrieval", data=[str(tmp_path / "qa.jsonl")]),
             TaskConfig(name="cls", type="classification", data=[str(tmp_path / "cls.jsonl")]),
             TaskConfig(name="sim", type="sts", data=[str(tmp_path / "sts.jsonl")])]
    tables, first_id, expected_rows, expected_candidates = {}, 0, [], []
    for task in tasks:
        tables[task.name] = write_task_table(task, iter_task_examples(task, seed=3), tmp_path / "t" / task.name,
                                             first_id=first_id)
        rows, candidates = task_rows(task, seed=3)
        if task.type != "sts":
            first_id += len(rows)
            expected_rows += [{"anchor": r["anchor"], "positive": r["positive"]} for r in rows]
            expected_candidates += candidates
    for table in tables.values():
        assert isinstance(table.dataset.data, MemoryMappedTable) and table.dataset.cache_files
    assert tables["qa"].dataset.data.column("id").num_chunks == 3  # 8 rows written 3 at a time
    assert tables["sim"].dataset.to_list() == [{"sentence1": "a", "sentence2": "b", "score": 0.5}]
    assert tables["qa"].dataset["id"][:] == list(range(8)) and tables["cls"].dataset["id"][:] == list(range(8, 15))
    assert [{"anchor": r["anchor"], "positive": r["positive"]} for t in ("qa", "cls")
            for r in tables[t].dataset.to_list()] == expected_rows
    assert expected_candidates[5] == ["x", "y"] and sorted(expected_candidates[8] + ["sport"]) == sorted(labels)

    pool = build_negative_pool([tables["qa"], tables["cls"]], k=2, folder=tmp_path / "t")
    assert pool.ids is None and isinstance(pool.candidate_ids, np.memmap) and len(pool) == 15
    assert pool.candidates == expected_candidates
    assert pool.active_negatives(9) == expected_candidates[9][:2]

    # A task whose pools a teacher mined (stage 4 with `teacher:`): its pool's ids and in-memory table are used.
    mined = NegativePool.from_mining(tables["qa"].dataset, st_model, k=2, num_candidates=3, verbose=False)
    mined_table = TaskTable(tables["qa"].dataset, texts=mined.text_table, pool_sizes=mined.pool_sizes,
                            candidate_ids=mined.candidate_ids)
    assert sum(map(len, mined.candidates)) > 0
    pool = build_negative_pool([mined_table, tables["cls"]], k=2, folder=tmp_path / "m")
    assert pool.candidates == list(mined.candidates) + expected_candidates[8:]


def test_dhnm_passes_counts_visits_per_example():
    from types import SimpleNamespace

    from conan_hf.stages.supervised import SupervisedConfig, dhnm_passes

    args = SimpleNamespace(world_size=2, gradient_accumulation_steps=1)
    rows, sizes = {"qa": 40, "sts": 64}, {"qa": 4, "sts": 32}
    assert dhnm_passes(SupervisedConfig(num_train_epochs=2), args, rows, sizes) == 2.0
    assert SupervisedConfig().num_train_epochs == 2  # the stage-4 default lets DHNM act
    # (40 // 4 + 64 // 32) = 12 batches per epoch, shared by 2 ranks: 6 steps; 9 steps = 1.5 passes.
    assert dhnm_passes(SupervisedConfig(max_steps=9), args, rows, sizes) == 1.5
