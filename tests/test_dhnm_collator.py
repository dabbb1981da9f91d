"""DHNM's collator and score contract: negatives filled from the pool, ids passed on, every task loss's scores
routed to the callback, bad input."""

from __future__ import annotations

import dhnm_helpers
import numpy as np
import pytest
import torch
from dhnm_helpers import make_pool

from conan_hf.dhnm import (
    DHNMCallback,
    DHNMDataCollator,
    NegativePool,
)

st_model = dhnm_helpers.st_model  # the module-scoped SentenceTransformer fixture

# ---- collator -------------------------------------------------------------------------------------------------------


class _RecordedScores(torch.nn.Module):
    """A score source (conan_hf.dhnm.contract) handing over fixed records, as InfoNCELoss does after a step."""

    def __init__(self, records):
        super().__init__()
        self.records = list(records)

    def pop_hard_negative_scores(self):
        records, self.records = self.records, []
        return records


def test_contract_routes_the_scores_of_every_task_loss_to_the_callback(st_model):
    from conan_hf.dhnm import (
        HardNegativeScores,
        HardNegativeScoreSource,
        MultiTaskScores,
        find_score_source,
    )
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
