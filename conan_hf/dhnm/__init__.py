"""Dynamic Hard Negative Mining (DHNM), Conan-Embedding-v2 §3.4, eq. 6.

Each training example has a stable id, a query, a positive and a *ranked pool* of candidate hard negatives, of
which ``k`` (default 7) are active at a time. While training, every active negative ``N_i`` is judged from the
query–negative cosine score ``S_i`` the loss has just computed and the score ``S_0`` it had when it first entered the
active set; it is replaced by the next unused candidate of the pool when it has become too easy (eq. 6).

The pieces, one module each, in the order a training step uses them:

1. :class:`~conan_hf.dhnm.collator.DHNMDataCollator` fills the negative columns of each batch from the example's
   active negatives and passes the (example, negative) ids to the loss as labels (the layout, and the scores handed
   back, are the contract of :mod:`conan_hf.dhnm.contract`).
2. :class:`conan_hf.losses.InfoNCELoss` computes eq. 1 and records the query–negative cosine scores it already has.
3. :class:`~conan_hf.dhnm.callback.DHNMCallback` (``on_step_end``) gathers the recorded scores from all ranks,
   applies :func:`~conan_hf.dhnm.pool.dhnm_should_replace` identically on every rank through
   :meth:`~conan_hf.dhnm.pool.NegativePool.apply_scores` (the pool state, :mod:`conan_hf.dhnm.pool`; its text table
   and id index, :mod:`conan_hf.dhnm.table`), and logs the counts; the next time an example is batched it carries
   its new negatives. The pool state is saved next to every Trainer checkpoint and restored on resume
   (:mod:`conan_hf.dhnm.state`).

**When a replacement trains (the design).** A negative is judged from the score the loss computed on the example's
batch, so its replacement is trained at the example's next visit. Without more than that, one pass over the data
trains no replacement, and at the default two epochs the "became easy" clause of eq. 6 (which needs a negative scored
twice) would only fire in the last epoch, whose replacements never train. So the example is *re-queued*: the rows that
just received a replacement are assigned to upcoming batches of their task in the same epoch
(:mod:`conan_hf.dhnm.requeue`: :class:`~conan_hf.dhnm.requeue.RequeueSchedule` entered by the callback,
:class:`~conan_hf.dhnm.requeue.RequeueBatchSampler` appending the rows when it draws a batch; one re-visit per
replacement, at most ``requeue_rows`` re-queued rows per batch, the number of batches unchanged). Rows only join
batches that no rank has drawn yet, in any process layout, and the entries are saved in every checkpoint, so resume
stays exact and every rank appends the same rows (see the module; ``docs/dhnm_requeue.md`` gives the reasons). A trainer
must draw its training batches through the sampler: :class:`conan_hf.training.multitask.MultiTaskTrainer` (or
:class:`~conan_hf.training.multitask.DHNMRequeueMixin`) does; with a plain ``SentenceTransformerTrainer`` nothing is
re-queued (a warning says so). Counted per step and in ``DHNMCallback.replacement_summary()``: ``replaced`` (made),
``used`` (a later batch carried the replacement; the loss scored it), both also by the clause that made the
replacement (``_low_s0``, ``_easy``), ``requeued`` and ``requeue_late`` (no batch of the task left in the epoch: the
replacement waits for the next visit); replacements never carried are ``pending``.

**In-batch false negatives.** Pool negatives are added by the collator, after the no-duplicates batch sampler has
chosen the rows, so a row's negative can be another row's positive. :class:`conan_hf.losses.InfoNCELoss` masks any
document identical (same token ids) to a query's positive; :class:`FalseNegativeCountCallback` logs how many as
``infonce_false_negatives_masked``.

Example:
    ::

        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from conan_hf.losses import InfoNCELoss
        from conan_hf.dhnm import DHNMCallback, DHNMDataCollator, NegativePool

        # dataset columns: id, anchor, positive (+ optional negative columns used to build the pools)
        pool = NegativePool.from_mining(dataset, teacher, anchor_column="anchor", positive_column="positive", k=7)
        # or, at scale: pools as row ids into a memory-mapped corpus, examples keyed by their row index (the
        # dataset's `id` column holds 0 .. n-1); the collator looks up the texts of each batch only
        pool = NegativePool.from_ids(None, np.load("candidate_ids.npy", mmap_mode="r"), load_from_disk("corpus"), k=7)
        loss = InfoNCELoss(model, temperature=0.05)
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=dataset.select_columns(["id", "anchor", "positive"]),
            loss=loss,
            data_collator=DHNMDataCollator(preprocess_fn=model.preprocess, pool=pool),
            callbacks=[DHNMCallback(pool, loss)],
        )
        trainer.train()  # or trainer.train(resume_from_checkpoint=True): the pools resume too

    Multi-task (a ``DatasetDict`` with a loss per task): batch with
    :class:`conan_hf.training.multitask.MultiTaskCollator` and pass the loss mapping, ``DHNMCallback(pool, losses)``
    (read through :class:`MultiTaskScores`); train with :class:`conan_hf.training.multitask.MultiTaskTrainer`, which
    also re-queues examples holding fresh replacements (a plain ``SentenceTransformerTrainer`` does not).
"""

from .callback import DHNMCallback, FalseNegativeCountCallback
from .collator import DHNMDataCollator
from .contract import (
    EMPTY_SLOT,
    FalseNegativeCountSource,
    HardNegativeScores,
    HardNegativeScoreSource,
    MultiTaskScores,
    dhnm_labels,
    find_score_source,
    split_dhnm_labels,
)
from .pool import NegativePool, dhnm_should_replace
from .requeue import RequeueBatchSampler, RequeueSchedule
from .score_scale import rescale_scores, unrelated_score_baseline
from .state import DHNM_STATE_NAME, FALSE_NEGATIVES_STATE_NAME, LEGACY_DHNM_STATE_NAME
from .table import CandidateTexts, ExampleIndex, TextTable

__all__ = [
    "rescale_scores",
    "unrelated_score_baseline",
    "DHNM_STATE_NAME",
    "EMPTY_SLOT",
    "FALSE_NEGATIVES_STATE_NAME",
    "LEGACY_DHNM_STATE_NAME",
    "CandidateTexts",
    "DHNMCallback",
    "DHNMDataCollator",
    "ExampleIndex",
    "FalseNegativeCountCallback",
    "FalseNegativeCountSource",
    "HardNegativeScoreSource",
    "HardNegativeScores",
    "MultiTaskScores",
    "NegativePool",
    "RequeueBatchSampler",
    "RequeueSchedule",
    "TextTable",
    "dhnm_labels",
    "dhnm_should_replace",
    "find_score_source",
    "split_dhnm_labels",
]
