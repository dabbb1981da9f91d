"""Re-queueing of DHNM replacements: a replacement made at an example's visit trains later in the same epoch.

**What.** After every optimizer step :class:`~conan_hf.dhnm.callback.DHNMCallback` applies eq. 6 and hands the pool rows
that just received a replacement (``NegativePool.replaced_rows``) to :meth:`RequeueSchedule.schedule`. The schedule
assigns each of them to an upcoming batch *of the example's own task* in the current epoch, at most ``max_rows`` rows
per batch (default: the task's batch size, so a batch at most doubles). :class:`RequeueBatchSampler` wraps the
training batch sampler and appends the rows assigned to a batch when it draws that batch; the collator reads the live
pool, so the re-visited example carries its new negatives and the loss scores them (counted as ``used``). Each
replacement gets at most one re-visit; one that finds no batch of its task left in the epoch (``requeue_late``) waits
for the example's next ordinary visit. The number of batches per epoch is unchanged (batches grow instead), so the
learning-rate schedule and ``max_steps`` are those of a run without re-queueing.

**How resume stays exact and ranks agree.** The dataloader draws batches ahead of training (accelerate collates one
batch ahead, the Trainer fetches a whole gradient-accumulation step), and a resumed run redraws, without training,
the batches its checkpoint already trained. So a row is only ever assigned to a batch that *no* run has drawn yet: the
schedule counts, per task, the batches the sampler drew in this epoch (``drawn``) and assigns to batch ``drawn`` or
later; what a drawn batch holds is fixed from then on. The assignments are part of the DHNM state in every checkpoint
(``dhnm_state.npz``); the callback makes them from the gathered scores, identically on every rank, and every rank's
sampler draws the same batch sequence (accelerate hands each rank its share of it), so every rank appends the same
rows to the same batches. A row already assigned to a batch not yet drawn is not assigned again: that batch will carry
its newest negatives too.

Example:
    ::

        from conan_hf.training.multitask import MultiTaskTrainer

        callback = DHNMCallback(pool, losses)  # requeue=True: callback.requeue is a RequeueSchedule
        trainer = MultiTaskTrainer(..., callbacks=[callback])  # wraps its training batch sampler with the schedule
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["REQUEUE_COUNT_KEYS", "RequeueBatchSampler", "RequeueSchedule"]

#: Counts of :meth:`RequeueSchedule.schedule`: rows assigned to a later batch of the epoch, and replacements that
#: found no batch of their task left in the epoch.
REQUEUE_COUNT_KEYS = ("requeued", "requeue_late")


class RequeueSchedule:
    """Which upcoming batch of the epoch re-visits each example that holds a fresh replacement.

    Args:
        max_rows: re-queued rows per batch at most; ``None``: the batch size of the batch's task.

    Attributes:
        epoch: the epoch the assignments belong to (``-1``: none yet).
        assigned: ``{(task, batch): [pool rows]}``; ``task`` indexes the training datasets (the tasks of a
            ``DatasetDict`` in order; ``0`` for a single dataset), ``batch`` counts that task's batches in the epoch.
        attached: whether a :class:`RequeueBatchSampler` serves the schedule (without one nothing is assigned).

    Example:
        >>> schedule = RequeueSchedule(max_rows=1)
        >>> schedule.attach(offsets=[0], index_of_row=np.arange(4), caps=[2], num_batches=[2])
        >>> schedule.start_iteration()
        >>> schedule.draw([0, 1])  # batch 0 drawn
        [0, 1]
        >>> schedule.schedule(np.array([0, 2]), epoch=0)  # rows 0 and 2 got replacements: batch 1 has room for one
        {'requeued': 1, 'requeue_late': 1}
        >>> schedule.draw([3, 1])
        [3, 1, 0]
    """

    def __init__(self, max_rows: int | None = None) -> None:
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows (re-queued rows per batch) must be a positive integer or None, got {max_rows!r}")
        self.max_rows = max_rows
        self.attached = False
        self.epoch = -1
        self.assigned: dict[tuple[int, int], list[int]] = {}
        self._row_batch: dict[int, int] = {}  # latest batch each row is assigned to (derived from `assigned`)
        self._next_free: list[int] = []  # per task: no batch below it (and at or after `drawn`) has room
        self._drawn: list[int] = []  # per task: batches drawn by the sampler in its current iteration (not saved)

    # ---- wiring (RequeueBatchSampler) ------------------------------------------------------------------------------
    def attach(self, offsets: list[int], index_of_row: np.ndarray, caps: list[int], num_batches: list[int]) -> None:
        """Connect the sampler's layout: each task's first index in the concatenated dataset (``offsets``), the
        dataset index of each pool row (``-1``: not trained), each task's batch size and batches per epoch."""
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._index_of_row = np.asarray(index_of_row, dtype=np.int64)
        self._caps = [self.max_rows or cap for cap in caps]
        self._num_batches = list(num_batches)
        self._drawn = [0] * len(offsets)
        self._next_free = [0] * len(offsets)
        self.attached = True

    def start_iteration(self) -> None:
        """The sampler starts drawing an epoch's batches."""
        self._drawn = [0] * len(self._drawn)

    def task_of(self, index: int) -> int:
        """Task of a concatenated-dataset index."""
        return int(np.searchsorted(self._offsets, index, side="right")) - 1

    def draw(self, batch: list[int]) -> list[int]:
        """The sampler draws ``batch`` (dataset indices): returns it with the indices of the rows assigned to it
        appended (those not in it already)."""
        task = self.task_of(batch[0]) if batch else 0
        number = self._drawn[task]
        self._drawn[task] += 1
        rows = self.assigned.get((task, number))
        if not rows:
            return batch
        present = set(batch)
        extra = [int(i) for i in self._index_of_row[np.asarray(rows, dtype=np.int64)] if int(i) not in present]
        return [*batch, *extra]

    # ---- decisions (DHNMCallback, identical on every rank) --------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """Drop the assignments of an earlier epoch (their batches are gone)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.assigned.clear()
            self._row_batch.clear()
            self._next_free = [0] * len(self._next_free)

    def schedule(self, rows: np.ndarray, epoch: int) -> dict[str, int]:
        """Assign ``rows`` (pool rows that just got a replacement, in a fixed order) to undrawn batches of epoch
        ``epoch``; returns the counts of :data:`REQUEUE_COUNT_KEYS`."""
        counts = dict.fromkeys(REQUEUE_COUNT_KEYS, 0)
        if not self.attached or len(rows) == 0:
            return counts
        self.begin_epoch(epoch)
        rows = np.asarray(rows, dtype=np.int64)
        indices = self._index_of_row[rows]
        for row, index in zip(rows[indices >= 0].tolist(), indices[indices >= 0].tolist()):
            task = self.task_of(index)
            drawn = self._drawn[task]
            if self._row_batch.get(row, -1) >= drawn:
                continue  # an undrawn batch re-visits the row already and will carry this replacement too
            number, cap = max(self._next_free[task], drawn), self._caps[task]
            while number < self._num_batches[task] and len(self.assigned.get((task, number), ())) >= cap:
                number += 1
            self._next_free[task] = number
            if number >= self._num_batches[task]:
                counts["requeue_late"] += 1
                continue
            self.assigned.setdefault((task, number), []).append(row)
            self._row_batch[row] = number
            counts["requeued"] += 1
        return counts

    # ---- persistence -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and the assignments as three ``int64`` arrays (``task``, ``batch``, ``row``), in order."""
        triples = [(task, number, row) for (task, number), rows in self.assigned.items() for row in rows]
        array = np.array(triples, dtype=np.int64).reshape(-1, 3)
        return {"epoch": self.epoch, "task": array[:, 0], "batch": array[:, 1], "row": array[:, 2]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.assigned, self._row_batch = {}, {}
        for task, number, row in zip(*(np.asarray(state[name], dtype=np.int64).tolist()
                                       for name in ("task", "batch", "row"))):
            self.assigned.setdefault((task, number), []).append(row)
            self._row_batch[row] = max(number, self._row_batch.get(row, -1))
        self._next_free = [0] * len(self._next_free)  # derivable: batches between `drawn` and it are full


class RequeueBatchSampler:
    """The training batch sampler with the re-queued rows of :class:`RequeueSchedule` appended to its batches.

    Wraps a batch sampler over one dataset or a multi-dataset sampler over a ``ConcatDataset`` (one task per
    dataset, a batch from one task). The batches keep their number (``len``) and order; a batch with re-queued rows is
    larger, so ``batch_size`` is ``None`` (accelerate's variable-size mode).

    Args:
        inner: the batch sampler (sentence-transformers' ``DefaultBatchSampler`` / ``NoDuplicatesBatchSampler``, or a
            ``MultiDatasetDefaultBatchSampler`` such as :class:`conan_hf.training.multitask.ProportionalTaskSampler`).
        schedule: the :class:`RequeueSchedule` of the :class:`~conan_hf.dhnm.callback.DHNMCallback`.
        dataset: the dataset the indices point into (a ``datasets.Dataset`` or a ``ConcatDataset`` of them).
        pool: the :class:`~conan_hf.dhnm.pool.NegativePool`.
        pool_datasets: which datasets have rows in the pool (by position); ``None``: those with ``id_column``.
        id_column: the example id column.
    """

    def __init__(self, inner: Any, schedule: RequeueSchedule, dataset: Any, pool: Any,
                 pool_datasets: list[bool] | None = None, id_column: str = "id") -> None:
        self.inner = inner
        self.schedule = schedule
        datasets = list(getattr(dataset, "datasets", [dataset]))
        samplers = list(getattr(inner, "batch_samplers", [inner]))
        if len(samplers) != len(datasets):
            raise ValueError(f"RequeueBatchSampler: {len(samplers)} batch samplers for {len(datasets)} datasets")
        offsets = np.cumsum([0] + [len(d) for d in datasets[:-1]]).tolist()
        index_of_row = np.full(len(pool), -1, dtype=np.int64)
        for position, (data, offset) in enumerate(zip(datasets, offsets)):
            wanted = pool_datasets[position] if pool_datasets is not None else id_column in data.column_names
            if wanted:
                index_of_row[pool.rows(list(data[id_column]))] = offset + np.arange(len(data), dtype=np.int64)
        lengths = [len(s) for s in samplers]
        if type(inner).__name__.startswith("RoundRobin"):  # every task gets as many batches as the smallest
            lengths = [min(lengths)] * len(lengths)
        schedule.attach(offsets, index_of_row, [s.batch_size for s in samplers], lengths)
        self.batch_size = None
        self.drop_last = getattr(inner, "drop_last", False)

    @property
    def sampler(self) -> Any:
        return getattr(self.inner, "sampler", None)

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self.inner.sampler = value

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        self.schedule.start_iteration()
        for batch in self.inner:
            yield self.schedule.draw(list(batch))
