"""The data collator of DHNM: fills each batch's negative columns from the live
:class:`~conan_hf.dhnm.pool.NegativePool` and labels the rows with their (example, negative) ids, in the layout of
:mod:`conan_hf.dhnm.contract`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

from .contract import dhnm_labels
from .pool import NegativePool

__all__ = ["DHNMDataCollator"]


@dataclass
class DHNMDataCollator(SentenceTransformerDataCollator):
    """sentence-transformers' data collator that fills each row's negatives from its
    :class:`~conan_hf.dhnm.pool.NegativePool`.

    For every row it takes ``id_column`` out of the inputs (it is never tokenised), drops any column whose name starts
    with ``negative_prefix``, and appends ``k`` columns ``{negative_prefix}_1 .. _k`` with the example's *current*
    active negatives. Empty slots (an example with fewer than ``k`` candidates) get the row's positive as a placeholder
    text, and the loss masks them out. The ids reach the loss as ``labels``: an integer tensor ``(batch, 1 + k)`` =
    [pool row, candidate rank per negative column (``-1`` = empty)] (the layout of :mod:`conan_hf.dhnm.contract`), which
    :class:`conan_hf.losses.InfoNCELoss` uses to mask empty slots and to key its score record.

    The pool is read at batching time, so replacements made by :class:`~conan_hf.dhnm.callback.DHNMCallback` show up the
    next time the example is batched (a re-queued visit later in the epoch, or its next epoch; see
    :mod:`conan_hf.dhnm`).
    This needs the collator to run in the training process: keep ``dataloader_num_workers=0`` (the callback checks).

    Args:
        preprocess_fn: ``model.preprocess`` (as for ``SentenceTransformerDataCollator``).
        pool: the :class:`NegativePool` of the training dataset.
        id_column: column with the example ids.
        negative_prefix: prefix of the negative columns.

    Example:
        ::

            collator = DHNMDataCollator(preprocess_fn=model.preprocess, pool=pool)
            trainer = SentenceTransformerTrainer(..., data_collator=collator, callbacks=[DHNMCallback(pool, loss)])
    """

    pool: NegativePool | None = None
    id_column: str = "id"
    negative_prefix: str = "negative"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.pool is None:
            raise ValueError("DHNMDataCollator needs a NegativePool (pool=...)")
        if not features:
            return {}
        columns = list(features[0].keys())
        if self.id_column not in columns:
            raise ValueError(
                f"DHNMDataCollator: the rows have no {self.id_column!r} column (columns: {columns}); DHNM needs a "
                "stable example id per row"
            )
        labels = [c for c in columns if c in self.valid_label_columns]
        if labels:
            raise ValueError(
                f"DHNMDataCollator: column(s) {labels} would be read as labels, but with DHNM the labels carry the "
                "(example, negative) ids for InfoNCELoss; remove them from the training dataset"
            )
        kept = [c for c in columns if c != self.id_column and not c.startswith(self.negative_prefix)]
        texts = [c for c in kept if c != "dataset_name"]
        if len(texts) < 2:
            raise ValueError(f"DHNMDataCollator needs (anchor, positive) text columns besides the ids, got {texts}")
        positive_column = texts[1]

        try:
            rows = self.pool.rows([row[self.id_column] for row in features])
        except KeyError as exc:
            raise ValueError(f"DHNMDataCollator: {exc.args[0]}") from None
        negative_ids = self.pool.active[rows].copy()  # snapshot: these are the negatives this batch carries
        # The texts of this batch's negatives only, looked up in the (memory-mapped) text table in one go.
        negative_texts = self.pool.negative_texts(rows, negative_ids)

        batch_rows = []
        for example, texts in zip(features, negative_texts):
            out = {c: example[c] for c in kept}
            for slot, text in enumerate(texts):
                out[f"{self.negative_prefix}_{slot + 1}"] = text if text is not None else example[positive_column]
            batch_rows.append(out)
        batch = super().__call__(batch_rows)
        batch["label"] = dhnm_labels(rows, negative_ids)
        return batch
