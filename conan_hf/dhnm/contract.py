"""The DHNM contract: what a batch tells the loss, and what the loss hands back to DHNM.

**Batch layout** (written by :class:`~conan_hf.dhnm.collator.DHNMDataCollator`, read by
:class:`conan_hf.losses.InfoNCELoss`). The text columns are ``anchor, positive, negative_1 .. negative_k``; the
labels are an integer tensor ``(batch, 1 + k)``: column 0 the example's row in its
:class:`~conan_hf.dhnm.pool.NegativePool`, column ``1 + j`` the pool rank of the candidate in ``negative_{j+1}``
(:data:`EMPTY_SLOT` = ``-1`` where the example has no candidate; that column holds a placeholder text and the loss
masks it out of the softmax). Build and read it with :func:`dhnm_labels` and :func:`split_dhnm_labels`.

**Scores** (handed by the loss to :class:`~conan_hf.dhnm.callback.DHNMCallback`). For every training micro-batch the
loss records one :class:`HardNegativeScores`: the query–negative cosine scores it already computed, keyed by the
label's ids. Any object with ``pop_hard_negative_scores()`` returning those records (and clearing them) is a
:class:`HardNegativeScoreSource`; :func:`find_score_source` finds it inside a wrapped loss (e.g. MatryoshkaLoss), and
:class:`MultiTaskScores` joins the sources of several losses (one per task of a ``DatasetDict``).

Example:
    >>> import numpy as np
    >>> labels = dhnm_labels(np.array([4, 9]), np.array([[0, 1], [2, EMPTY_SLOT]]))
    >>> labels.tolist()
    [[4, 0, 1], [9, 2, -1]]
    >>> [t.tolist() for t in split_dhnm_labels(labels)]
    [[4, 9], [[0, 1], [2, -1]]]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EMPTY_SLOT",
    "FalseNegativeCountSource",
    "HardNegativeScoreSource",
    "HardNegativeScores",
    "MultiTaskScores",
    "dhnm_labels",
    "find_score_source",
    "split_dhnm_labels",
]

#: Negative id of an empty slot (an example with fewer than ``k`` candidates).
EMPTY_SLOT = -1


def dhnm_labels(example_rows: np.ndarray, negative_ids: np.ndarray) -> Tensor:
    """The label tensor of a DHNM batch: ``(batch, 1 + k)`` = [example row, candidate rank of each negative column].

    Args:
        example_rows: ``(batch,)`` integer pool rows.
        negative_ids: ``(batch, k)`` integer candidate ranks, :data:`EMPTY_SLOT` for an empty slot.

    Returns:
        an integer tensor sharing the numpy dtype promotion of the two arrays.
    """
    return torch.from_numpy(np.concatenate([example_rows[:, None], negative_ids], axis=1))


def split_dhnm_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(example_ids, negative_ids)`` of a DHNM label tensor: its first column and the rest (views, no copy)."""
    return labels[:, 0], labels[:, 1:]


@dataclass
class HardNegativeScores:
    """Query–hard-negative cosine scores of one loss computation (one micro-batch).

    Attributes:
        example_ids: ``(batch,)`` integer ids of the examples (for DHNM: the row of the example in its
            :class:`~conan_hf.dhnm.pool.NegativePool`).
        negative_ids: ``(batch, num_negatives)`` integer ids of the negative in each negative column (for DHNM: the
            rank of the candidate in the example's pool); :data:`EMPTY_SLOT` marks an empty slot.
        scores: ``(batch, num_negatives)`` cosine similarity between each query and each of its own hard negatives,
            detached; ``NaN`` at empty slots.
        dim: embedding dimension the scores were computed at (MatryoshkaLoss calls the loss once per dimension;
            only the largest is kept).
    """

    example_ids: Tensor
    negative_ids: Tensor
    scores: Tensor
    dim: int

    def to_dict(self) -> dict[tuple[int, int], float]:
        """``{(example_id, negative_id): score}`` for every filled slot."""
        out = {}
        for ex, negs, scores in zip(self.example_ids.tolist(), self.negative_ids.tolist(), self.scores.tolist()):
            for neg, score in zip(negs, scores):
                if neg >= 0:
                    out[(ex, neg)] = score
        return out


@runtime_checkable
class HardNegativeScoreSource(Protocol):
    """What :class:`~conan_hf.dhnm.callback.DHNMCallback` reads after every optimizer step
    (:class:`conan_hf.losses.InfoNCELoss` is one)."""

    def pop_hard_negative_scores(self) -> list[HardNegativeScores]:
        """Return and clear the score records since the last call, oldest first."""
        ...


@runtime_checkable
class FalseNegativeCountSource(Protocol):
    """What :class:`~conan_hf.dhnm.callback.FalseNegativeCountCallback` reads after every optimizer step."""

    def pop_masked_false_negatives(self) -> int:
        """Return and reset the number of in-batch false negatives masked since the last call."""
        ...


def _sources(losses: Iterable[torch.nn.Module], protocol: type) -> list[Any]:
    return [module for loss in losses for module in loss.modules() if isinstance(module, protocol)]


def find_score_source(loss: Any) -> HardNegativeScoreSource:
    """The score source of ``loss``: the loss itself, or the first module it wraps that is one (MatryoshkaLoss).

    Raises:
        TypeError: no module of ``loss`` records hard-negative scores.
    """
    if isinstance(loss, HardNegativeScoreSource):
        return loss
    for module in loss.modules():
        if isinstance(module, HardNegativeScoreSource):
            return module
    raise TypeError(
        f"{type(loss).__name__} does not record hard-negative scores; use conan_hf.losses.InfoNCELoss "
        "(optionally inside MatryoshkaLoss)"
    )


class MultiTaskScores:
    """One :class:`HardNegativeScoreSource` over several losses: multi-task training with a loss per task.

    Every module of every loss that is a score source (each task's InfoNCELoss, also inside MatryoshkaLoss) is
    popped in turn, in the order of ``losses``; losses without one (CoSENT for STS) contribute nothing.

    Args:
        losses: the losses, or the ``{task: loss}`` mapping given to the Trainer.

    Example:
        ::

            losses = {"retrieval": InfoNCELoss(model), "sts": CoSENTLoss(model)}
            callback = DHNMCallback(pool, MultiTaskScores(losses))
    """

    def __init__(self, losses: Mapping[str, torch.nn.Module] | Iterable[torch.nn.Module]) -> None:
        self.sources = _sources(losses.values() if isinstance(losses, Mapping) else losses, HardNegativeScoreSource)

    def pop_hard_negative_scores(self) -> list[HardNegativeScores]:
        """The records of every source, source by source."""
        return [record for source in self.sources for record in source.pop_hard_negative_scores()]


def false_negative_sources(losses: Iterable[torch.nn.Module]) -> list[FalseNegativeCountSource]:
    """Every module of ``losses`` that counts masked in-batch false negatives."""
    return _sources(losses, FalseNegativeCountSource)
