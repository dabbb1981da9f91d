"""The opt-in score scale of DHNM (``score_baseline``): eq. 6 applied to (S - b) / (1 - b), and the measured b."""

from __future__ import annotations

import itertools

import dhnm_helpers
import numpy as np
import pytest
from dhnm_helpers import naive_apply

from conan_hf.dhnm import DHNMCallback, NegativePool, dhnm_should_replace, rescale_scores, unrelated_score_baseline

st_model = dhnm_helpers.st_model  # the module-scoped SentenceTransformer fixture


def test_rule_with_a_score_baseline_is_the_paper_rule_on_rescaled_scores():
    grid = np.round(np.arange(0.80, 1.0001, 0.01), 2)
    for b in (0.0, 0.5, 0.9):
        for s0, s in itertools.product(grid, grid):
            r0, r = (s0 - b) / (1 - b), (s - b) / (1 - b)
            expected = r0 < 0.4 or (1.2 * r < r0 and r < 0.7)
            assert bool(dhnm_should_replace(s0, s, score_baseline=b)) == expected, (b, s0, s)
    # Cosines bunched near 1: the paper's rule never fires, the rescaled one finds the negative that became easy.
    assert not dhnm_should_replace(0.95, 0.92)
    assert dhnm_should_replace(0.95, 0.92, score_baseline=0.9)  # 0.5 -> 0.2: 1.2 * 0.2 < 0.5 and 0.2 < 0.7
    assert not dhnm_should_replace(0.95, 0.945, score_baseline=0.9)  # 0.5 -> 0.45: 1.2 * 0.45 = 0.54 > 0.5, kept
    with pytest.raises(ValueError, match=r"score_baseline must be in \[0, 1\)"):
        rescale_scores(0.5, 1.0)
    with pytest.raises(ValueError, match="score_baseline"):
        DHNMCallback(NegativePool(["q"], [["n"]], k=1), object(), score_baseline=-0.1)


@pytest.mark.parametrize("seed", range(3))
def test_apply_scores_with_a_score_baseline_matches_the_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = 30, 3
    pool = NegativePool(list(range(n)), [[f"c{i}-{j}" for j in range(8)] for i in range(n)], k=k)
    active, s0, cursor, fresh = pool.active.copy(), pool.s0.copy(), pool.cursor.copy(), pool.fresh.copy()
    reason = np.full(active.shape, "", dtype=object)
    totals = dict.fromkeys(("replaced_low_s0", "replaced_easy"), 0)
    for _ in range(6):
        rows = rng.choice(n, size=12, replace=False)
        negs = pool.active[rows].copy()
        scores = rng.uniform(0.85, 1.0, size=negs.shape)  # a model whose cosines bunch near 1
        counts = pool.apply_scores(rows, negs, scores, score_baseline=0.85)
        assert counts == naive_apply(active, s0, cursor, pool.pool_sizes, rows, negs, scores, fresh=fresh,
                                     reason=reason, score_baseline=0.85)
        np.testing.assert_array_equal(pool.active, active)
        np.testing.assert_array_equal(pool.s0, s0)  # S0 is kept as the raw cosine
        for key in totals:
            totals[key] += counts[key]
    assert totals["replaced_low_s0"] > 0 and totals["replaced_easy"] > 0  # both clauses acted
    untouched = NegativePool(list(range(n)), [[f"c{i}-{j}" for j in range(8)] for i in range(n)], k=k)
    assert untouched.apply_scores(rows, untouched.active[rows], scores)["replaced"] == 0  # paper rule: none


class _NoScores:
    def pop_hard_negative_scores(self):
        return []


def test_callback_keeps_the_paper_thresholds_unless_a_baseline_is_set():
    pool = NegativePool(["q"], [["n"]], k=1)
    assert DHNMCallback(pool, _NoScores()).thresholds == {"s0_min": 0.4, "drop_ratio": 1.2, "s_max": 0.7}
    assert DHNMCallback(pool, _NoScores(), score_baseline=0.8).thresholds["score_baseline"] == 0.8


def test_unrelated_score_baseline_is_the_median_off_diagonal_cosine(st_model):
    from sentence_transformers import util

    queries = [f"the {s} sleeps on the" for s in dhnm_helpers.SUBJECTS]
    documents = [f"the {s} sleeps on the {p}" for s, p in zip(dhnm_helpers.SUBJECTS, dhnm_helpers.PLACES)]
    matrix = util.cos_sim(st_model.encode(queries), st_model.encode(documents)).numpy()
    off_diagonal = [matrix[i, j] for i in range(len(queries)) for j in range(len(documents)) if i != j]
    assert unrelated_score_baseline(st_model, queries, documents) == pytest.approx(np.median(off_diagonal), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        unrelated_score_baseline(st_model, queries[:1], documents[:1])
