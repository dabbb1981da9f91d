"""Multi-task training with a ``DatasetDict`` (one dataset and one loss per task), as stage 4 trains: a batch size and a
batch sampler per task (:class:`MultiTaskTrainer`, :class:`ProportionalTaskSampler`, :class:`RoundRobinTaskSampler`),
and one collator that fills the negatives of the DHNM tasks' batches from the :class:`~conan_hf.dhnm.pool.NegativePool`
(:class:`MultiTaskCollator`). The scores of every task's InfoNCE loss reach
:class:`~conan_hf.dhnm.callback.DHNMCallback` through :class:`~conan_hf.dhnm.contract.MultiTaskScores`.

Example:
    ::

        from datasets import DatasetDict
        from sentence_transformers import SentenceTransformerTrainingArguments
        from conan_hf import CoSENTLoss, DHNMCallback, InfoNCELoss, MultiTaskScores
        from conan_hf.training.multitask import MultiTaskCollator, MultiTaskTrainer, ProportionalTaskSampler

        # "qa" rows: id, anchor, positive (ids are pool rows); "sts" rows: sentence1, sentence2, score
        losses = {"qa": InfoNCELoss(model), "sts": CoSENTLoss(model)}
        args = SentenceTransformerTrainingArguments(..., multi_dataset_batch_sampler=ProportionalTaskSampler)
        trainer = MultiTaskTrainer(
            model=model, args=args, train_dataset=DatasetDict({"qa": qa, "sts": sts}), loss=losses,
            data_collator=MultiTaskCollator(preprocess_fn=model.preprocess, pool=pool, pool_tasks=frozenset({"qa"})),
            callbacks=[DHNMCallback(pool, MultiTaskScores(losses))],
            task_batch_sizes={"qa": 4, "sts": 32}, no_duplicate_tasks={"qa"},
        )
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.base.sampler import (
    DefaultBatchSampler,
    NoDuplicatesBatchSampler,
    ProportionalBatchSampler,
    RoundRobinBatchSampler,
)
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from torch.utils.data import RandomSampler

from conan_hf.dhnm.collator import DHNMDataCollator
from conan_hf.dhnm.requeue import RequeueBatchSampler, RequeueSchedule
from conan_hf.training.checkpoints import MainProcessSaveMixin

__all__ = ["DHNMRequeueMixin", "MultiTaskCollator", "MultiTaskTrainer", "ProportionalTaskSampler",
           "RoundRobinTaskSampler"]


class _VariableSize:
    """accelerate shards batch samplers by whole batches, but only yields a group of batches whose last one has the
    sampler's ``batch_size``; with per-task sizes, or a task's last batch smaller than its size, that would silently
    drop batches, so the size is reported as ``None`` (accelerate's "dynamic batch size" mode)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = None


class ProportionalTaskSampler(_VariableSize, ProportionalBatchSampler):
    """sentence-transformers' proportional multi-dataset sampler, with per-task batch sizes."""


class RoundRobinTaskSampler(_VariableSize, RoundRobinBatchSampler):
    """sentence-transformers' round-robin multi-dataset sampler, with per-task batch sizes."""


class DHNMRequeueMixin:
    """A SentenceTransformerTrainer mixin that draws the *training* batches through
    :class:`~conan_hf.dhnm.requeue.RequeueBatchSampler` when a callback (a
    :class:`~conan_hf.dhnm.callback.DHNMCallback`) holds a :class:`~conan_hf.dhnm.requeue.RequeueSchedule` as
    ``requeue``: examples holding fresh DHNM replacements are re-visited by later batches of the same epoch (see
    :mod:`conan_hf.dhnm.requeue`). Evaluation batches are left as they are. Without such a callback nothing changes.

    Example:
        ::

            class MyTrainer(DHNMRequeueMixin, SentenceTransformerTrainer):
                pass

            trainer = MyTrainer(..., data_collator=DHNMDataCollator(...), callbacks=[DHNMCallback(pool, loss)])
    """

    _building_train_loader = False

    def get_train_dataloader(self):
        self._building_train_loader = True
        try:
            return super().get_train_dataloader()
        finally:
            self._building_train_loader = False

    def _requeue(self, sampler, dataset):
        if not self._building_train_loader:
            return sampler
        holder = next((c for c in self.callback_handler.callbacks
                       if isinstance(getattr(c, "requeue", None), RequeueSchedule)), None)
        if holder is None:
            return sampler
        collator = self.data_collator
        id_column = getattr(collator, "id_column", "id")
        names = list(self.train_dataset) if hasattr(self.train_dataset, "keys") else None
        pool_tasks = getattr(collator, "pool_tasks", None)
        pool_datasets = [name in pool_tasks for name in names] if names is not None and pool_tasks else None
        return RequeueBatchSampler(sampler, holder.requeue, dataset, holder.pool, pool_datasets, id_column)

    def get_multi_dataset_batch_sampler(self, dataset, batch_samplers, generator=None, seed=0):
        sampler = super().get_multi_dataset_batch_sampler(dataset, batch_samplers, generator=generator, seed=seed)
        return self._requeue(sampler, dataset)

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        sampler = super().get_batch_sampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        return self._requeue(sampler, dataset) if dataset is self.train_dataset else sampler


class MultiTaskTrainer(DHNMRequeueMixin, MainProcessSaveMixin, SentenceTransformerTrainer):
    """SentenceTransformerTrainer with a batch size and a batch sampler per task of the training DatasetDict
    (sentence-transformers uses one batch size for all datasets), and DHNM re-queueing (:class:`DHNMRequeueMixin`).

    Args:
        task_batch_sizes: per-device batch size of each task (``{name: size}``, every dataset of the DatasetDict).
        no_duplicate_tasks: tasks batched with sentence-transformers' ``NoDuplicatesBatchSampler`` (tasks with
            in-batch negatives, where a repeated text would be a false negative); the others are sampled at random.
        *args, **kwargs: as for ``SentenceTransformerTrainer``; give ``args.multi_dataset_batch_sampler`` a
            :class:`ProportionalTaskSampler` or :class:`RoundRobinTaskSampler` so tasks may differ in batch size.
    """

    def __init__(self, *args, task_batch_sizes: dict[str, int], no_duplicate_tasks: set[str], **kwargs):
        self.task_batch_sizes = task_batch_sizes
        self.no_duplicate_tasks = no_duplicate_tasks
        super().__init__(*args, **kwargs)

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        tasks = self.train_dataset if hasattr(self.train_dataset, "items") else {}
        name = next((n for n, d in tasks.items() if d is dataset), None)
        if name is None:
            return super().get_batch_sampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        # A task's last, smaller batch is kept (every row trains each epoch), whatever the DataLoader's drop_last.
        kwargs = dict(batch_size=self.task_batch_sizes[name], drop_last=False,
                      valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if name in self.no_duplicate_tasks:
            # In-batch negatives: a repeated text in the batch would be a false negative.
            return NoDuplicatesBatchSampler(dataset, **kwargs)
        return DefaultBatchSampler(RandomSampler(dataset, generator=generator), **kwargs)


@dataclass
class MultiTaskCollator(DHNMDataCollator):
    """Batches of pool tasks get their negatives from the NegativePool (DHNM); other tasks (STS) are batched as plain
    sentence-transformers batches. A batch always comes from a single task (its ``dataset_name`` column, which
    sentence-transformers adds for a DatasetDict, names it).

    Args:
        pool_tasks: names of the tasks whose rows have an ``id`` in ``pool`` (the rows of all pool tasks share one
            :class:`~conan_hf.dhnm.pool.NegativePool`, so their ids must be distinct across tasks).
        preprocess_fn, pool, id_column, negative_prefix, ...: as for :class:`~conan_hf.dhnm.DHNMDataCollator`.
    """

    pool_tasks: frozenset = frozenset()
    #: rows collated per task (this process): a row trained in a batch is counted once per visit
    rows_collated: dict = field(default_factory=dict, init=False)

    def __call__(self, features):
        if features:
            name = features[0].get("dataset_name")
            self.rows_collated[name] = self.rows_collated.get(name, 0) + len(features)
        if features and features[0].get("dataset_name") in self.pool_tasks:
            return super().__call__(features)
        return SentenceTransformerDataCollator.__call__(self, features)
