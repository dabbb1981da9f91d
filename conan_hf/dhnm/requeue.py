"""Re-queueing of DHNM replacements: a replacement made at an example's visit trains later in the same epoch.

**What.** After every optimizer step :class:`~conan_hf.dhnm.callback.DHNMCallback` applies eq. 6 and hands the pool rows
that just received a replacement (``NegativePool.replaced_rows``) to :meth:`RequeueSchedule.schedule`, which enters each
for a re-visit by an upcoming batch *of the example's own task* in the current epoch. :class:`RequeueBatchSampler`
wraps the training batch sampler and appends the entered rows to the batches it draws, at most ``max_rows`` per batch
(default: the task's batch size, so a batch at most doubles; the others wait for the task's next batch). The collator
reads the live pool, so the re-visited example carries its new negatives and the loss scores them (counted as
``used``); the re-visit also re-scores its other active negatives. One entry per replacement (one re-visit); an entry
that no batch of its task resolves before the epoch ends counts as ``requeue_late`` and waits for the example's next
ordinary visit. The number of batches per epoch is unchanged (batches grow instead), so the learning-rate schedule
and ``max_steps`` are those of a run without re-queueing.

**How resume stays exact and ranks agree.** The dataloader draws batches ahead of training (accelerate collates one
batch ahead on every rank; the Trainer fetches a whole gradient-accumulation step), and a resumed run redraws, without
training, the batches its checkpoint trained. So an entry made after optimizer step ``n`` of the epoch may only be
resolved at sampler positions ``>= (n + 1) * G`` (``G`` = world size x gradient accumulation steps: the first batch of
step ``n + 2``), which no layout has drawn by then; the *boundary* depends only on ``n`` and ``G``, so 2 processes x 1
micro-batch and 1 process x 2 micro-batches make the same batches. Only the callback makes entries (from the scores
gathered from all ranks, so every rank makes the same ones), and the sampler resolves them as a pure function of the
entries and its own batch sequence, which is the same on every rank (accelerate hands each rank its share of it). The
entries of the epoch are saved in every checkpoint (``dhnm_state.npz``), what was resolved is not: a resumed run
redraws the trained batches, which resolves the same entries again (an entry made later than a batch was drawn has a
boundary beyond it, so it cannot change that batch).

Example:
    ::

        from conan_hf.training.multitask import MultiTaskTrainer

        callback = DHNMCallback(pool, losses)  # requeue=True: callback.requeue is a RequeueSchedule
        trainer = MultiTaskTrainer(..., callbacks=[callback])  # wraps its training batch sampler with the schedule
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["REQUEUE_COUNT_KEYS", "RequeueBatchSampler", "RequeueSchedule"]

#: Counts logged by :class:`~conan_hf.dhnm.callback.DHNMCallback`: rows entered for a re-visit later in the epoch, and
#: entries no batch of their task resolved before the epoch (or training) ended.
REQUEUE_COUNT_KEYS = ("requeued", "requeue_late")


class RequeueSchedule:
    """Which upcoming batch of the epoch re-visits each example that holds a fresh replacement.

    An *entry* ``(boundary, task, row)`` says: pool row ``row`` (of training dataset ``task``) joins the first batch
    of its task drawn at a sampler position ``>= boundary`` that has room (positions count the batches of the epoch in
    the sampler's order, over all ranks). Entries are made only by :meth:`schedule`; the sampler resolves them when it
    draws (:meth:`draw`), in entry order, at most ``max_rows`` per batch (the others wait for the task's next batch).

    Args:
        max_rows: re-queued rows per batch at most; ``None``: the batch size of the batch's task.

    Attributes:
        epoch / epoch_start_step: the epoch the entries belong to (``-1``: none yet) and the global step it began at.
        entries: every entry of the epoch, in the order made (saved in checkpoints).
        attached: whether a :class:`RequeueBatchSampler` serves the schedule (without one nothing is entered).

    Example:
        >>> schedule = RequeueSchedule(max_rows=1)
        >>> schedule.attach(offsets=[0], index_of_row=np.arange(4), caps=[2])
        >>> schedule.start_iteration()
        >>> schedule.draw([0, 1])  # position 0
        [0, 1]
        >>> schedule.schedule(np.array([0, 2]), boundary=1)  # rows 0 and 2 got replacements: from position 1 on
        {'requeued': 2}
        >>> schedule.draw([3, 1]), schedule.draw([1, 3])  # one row per batch
        ([3, 1, 0], [1, 3, 2])
    """

    def __init__(self, max_rows: int | None = None) -> None:
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError("max_rows (re-queued rows per batch) must be a positive integer or None, "
                             f"got {max_rows!r}")
        self.max_rows = max_rows
        self.attached = False
        self.epoch = -1
        self.epoch_start_step = 0
        self.entries: list[tuple[int, int, int]] = []
        self._waiting: dict[int, deque] = {}  # per task: entries not resolved yet, in order (derived, not saved)
        self._position = 0  # sampler position of the next batch drawn (not saved: a resumed run redraws)

    # ---- wiring (RequeueBatchSampler) ------------------------------------------------------------------------------
    def attach(self, offsets: list[int], index_of_row: np.ndarray, caps: list[int]) -> None:
        """Connect the sampler's layout: each task's first index in the concatenated dataset (``offsets``), the
        dataset index of each pool row (``-1``: not trained) and each task's batch size."""
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._index_of_row = np.asarray(index_of_row, dtype=np.int64)
        self._caps = [self.max_rows or cap for cap in caps]
        self.attached = True

    def start_iteration(self) -> None:
        """The sampler starts drawing an epoch's batches (from position 0)."""
        self._position = 0

    def task_of(self, index: int) -> int:
        """Task of a concatenated-dataset index."""
        return int(np.searchsorted(self._offsets, index, side="right")) - 1

    def draw(self, batch: list[int]) -> list[int]:
        """The sampler draws ``batch`` (dataset indices): returns it with the indices of the rows whose entries it
        resolves appended (an entry whose row is in the batch already is resolved without a second copy)."""
        position = self._position
        self._position += 1
        task = self.task_of(batch[0]) if batch else 0
        waiting = self._waiting.get(task)
        if not waiting:
            return batch
        present, extra = set(batch), []
        while waiting and waiting[0][0] <= position and len(extra) < self._caps[task]:
            index = int(self._index_of_row[waiting.popleft()[2]])
            if index not in present:
                present.add(index)
                extra.append(index)
        return [*batch, *extra]

    # ---- decisions (DHNMCallback, identical on every rank) --------------------------------------------------------
    def begin_epoch(self, epoch: int, global_step: int) -> int:
        """Start the entries of ``epoch`` (begun at ``global_step``) unless they are that epoch's already; returns the
        number of entries of the previous epoch that no batch resolved (``requeue_late``)."""
        if epoch == self.epoch:
            return 0
        late = self.unresolved()
        self.epoch, self.epoch_start_step = epoch, global_step
        self.entries, self._waiting = [], {}
        return late

    def unresolved(self) -> int:
        """Entries no batch has resolved yet."""
        return sum(len(waiting) for waiting in self._waiting.values())

    def schedule(self, rows: np.ndarray, boundary: int) -> dict[str, int]:
        """Enter ``rows`` (pool rows that just got a replacement, in a fixed order) for the batches of their task at
        sampler positions ``>= boundary``; returns ``{"requeued": number of entries}`` (rows not trained: none)."""
        if not self.attached or len(rows) == 0:
            return {"requeued": 0}
        rows = np.asarray(rows, dtype=np.int64)
        indices = self._index_of_row[rows]
        count = 0
        for row, index in zip(rows[indices >= 0].tolist(), indices[indices >= 0].tolist()):
            self._enter((int(boundary), self.task_of(index), row))
            count += 1
        return {"requeued": count}

    def _enter(self, entry: tuple[int, int, int]) -> None:
        self.entries.append(entry)
        self._waiting.setdefault(entry[1], deque()).append(entry)

    # ---- persistence -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``epoch``, ``epoch_start_step`` and the entries as three ``int64`` arrays (``boundary``, ``task``,
        ``row``), in order. What the sampler resolved is not saved: a resumed run redraws the batches its checkpoint
        trained, which resolves the same entries again."""
        array = np.array(self.entries, dtype=np.int64).reshape(-1, 3)
        return {"epoch": self.epoch, "epoch_start_step": self.epoch_start_step, "boundary": array[:, 0],
                "task": array[:, 1], "row": array[:, 2]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.epoch_start_step = int(state["epoch"]), int(state.get("epoch_start_step", 0))
        self.entries, self._waiting = [], {}
        for entry in zip(*(np.asarray(state[name], dtype=np.int64).tolist() for name in ("boundary", "task", "row"))):
            self._enter(entry)


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
        schedule.attach(offsets, index_of_row, [s.batch_size for s in samplers])
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
