"""Shared helpers of the DHNM tests (tests/test_dhnm_*.py): the loop reference of eq. 6, a toy pool and dataset,
and the tiny SentenceTransformer fixture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conan_hf.dhnm import (
    NegativePool,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


COUNTS = ("checked", "replaced", "used", "pool_exhausted", "nan_scores", "stale", "replaced_low_s0", "replaced_easy",
          "used_low_s0", "used_easy")


def naive_apply(active, s0, cursor, pool_sizes, rows, negs, scores, s0_min=0.4, drop_ratio=1.2, s_max=0.7,
                fresh=None, reason=None, score_baseline=0.0):
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
            b = score_baseline  # eq. 6 on (S - b) / (1 - b); b = 0 is the paper's rule on S itself
            first, score = (s0[row, slot] - b) / (1 - b), (score - b) / (1 - b)
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
