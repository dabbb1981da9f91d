"""Dynamic Hard Negative Mining (§3.4, eq. 6): the rule, and NegativePool's scoring, replacement and construction
(from columns, from mining)."""

from __future__ import annotations

import dhnm_helpers
import numpy as np
import pytest
import torch
from dhnm_helpers import PLACES, SUBJECTS, naive_apply

from conan_hf.dhnm import (
    NegativePool,
    dhnm_should_replace,
)

st_model = dhnm_helpers.st_model  # the module-scoped SentenceTransformer fixture

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
