"""Dynamic Hard Negative Mining (DHNM), Conan-Embedding-v2 §3.4, eq. 6.

Each training example has a stable id, a query, a positive and a *ranked pool* of candidate hard negatives, of
which ``k`` (default 7) are active at a time. While training, every active negative ``N_i`` is judged from the
query–negative cosine score ``S_i`` the loss has just computed and the score ``S_0`` it had when it first entered the
active set; it is replaced by the next unused candidate of the pool when it has become too easy (eq. 6).

The pieces, in the order a training step uses them:

1. :class:`DHNMDataCollator` fills the negative columns of each batch from the example's active negatives and
   passes the (example, negative) ids to the loss as labels.
2. :class:`conan_hf.losses.InfoNCELoss` computes eq. 1 and records the query–negative cosine scores it already has.
3. :class:`DHNMCallback` (``on_step_end``) gathers the recorded scores from all ranks, applies
   :func:`dhnm_should_replace` identically on every rank through :meth:`NegativePool.apply_scores`, and logs the
   counts; the next time an example is batched it carries its new negatives. The pool state is saved next to every
   Trainer checkpoint and restored on resume.

**When a replacement trains (the design).** A negative is judged from the score the loss computed on the example's
batch, so its replacement can only be trained at the example's *next* visit: with one pass over the data (each
example batched once) DHNM changes nothing at all. The paper (§3.4, App. A) states no epoch count; eq. 6 compares a
negative's score now with its score when it entered (``S_0``), which presumes that examples are seen repeatedly. So
stage 4 (:mod:`conan_hf.stages.supervised`) trains ``num_train_epochs: 2`` by default and warns when a run visits examples
fewer than twice. Replacements are consumed by the ordinary schedule: the collator reads the live pool when it builds
a batch, and every replacement made before an example's last visit is carried by that later visit. The ones made at
the last visit are reported as ``pending``. Counted per step and in :meth:`DHNMCallback.replacement_summary`:
``replaced`` (made) and ``used`` (a later batch carried the replacement; the loss scored it).

Re-queueing replaced examples into later batches of the same epoch was rejected: the Trainer fixes the number of
batches per epoch before training (learning-rate schedule, ``max_steps``), accelerate collates one batch ahead and
resumes by skipping batches at the sampler level, and ranks iterate the batch sampler in lock-step, so a sampler that
depends on decisions made during training would lose exact resume and identical ranks; a static multi-epoch schedule
keeps both (the batch order is a function of seed and epoch only, the content a function of the checkpointed pool).

**In-batch false negatives.** Pool negatives are added by the collator, after the no-duplicates batch sampler has
chosen the rows, so a row's negative can be another row's positive. :class:`conan_hf.losses.InfoNCELoss` masks any
document identical (same token ids) to a query's positive; :class:`FalseNegativeCountCallback` logs how many as
``infonce_false_negatives_masked``.

Example:
    ::

        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from conan_hf.losses import InfoNCELoss
        from conan_hf.dhnm.pool import DHNMCallback, DHNMDataCollator, NegativePool

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from array import array
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

__all__ = [
    "DHNM_STATE_NAME",
    "FALSE_NEGATIVES_STATE_NAME",
    "LEGACY_DHNM_STATE_NAME",
    "DHNMCallback",
    "DHNMDataCollator",
    "FalseNegativeCountCallback",
    "NegativePool",
    "dhnm_should_replace",
]

#: File written into each Trainer checkpoint folder (``checkpoint-<step>/``) with the pool state: an uncompressed
#: numpy ``.npz`` (the state arrays in their compact dtypes plus a ``meta`` JSON string), written atomically.
DHNM_STATE_NAME = "dhnm_state.npz"
#: The JSON state file of earlier versions (state versions 1 and 2); still read when resuming from such a checkpoint.
LEGACY_DHNM_STATE_NAME = "dhnm_state.json"
#: File written into each Trainer checkpoint folder with the running count of masked in-batch false negatives.
FALSE_NEGATIVES_STATE_NAME = "false_negatives_state.json"
_STATE_VERSION = 3  # 3: numpy arrays (.npz); 1 and 2: JSON lists (dhnm_state.json), still loaded
_STATE_ARRAYS = ("active", "s0", "cursor", "fresh_bits")
#: Prefix of the fingerprint of pools held as row ids (earlier states carry a bare sha256 hex of the texts).
_FINGERPRINT_PREFIX = "ids-v1:"
_COUNT_KEYS = ("checked", "replaced", "used", "pool_exhausted", "nan_scores", "stale")


def dhnm_should_replace(s0: Any, s: Any, s0_min: float = 0.4, drop_ratio: float = 1.2, s_max: float = 0.7) -> Any:
    r"""Eq. 6 of the paper: whether an active hard negative is replaced.

    .. math:: \text{replace} \iff S_0 < 0.4 \;\lor\; (1.2\,S_i < S_0 \land S_i < 0.7)

    ``S_0`` is the query–negative cosine score when the negative entered the active set and ``S_i`` its score now.
    A negative that was never hard (``S_0 < s0_min``) is dropped; a negative is also dropped once its score has
    fallen by more than the factor ``drop_ratio`` *and* is below ``s_max`` (it has become easy). This implements
    the equation on the signed cosine scores; the paper's prose mentions absolute values, which the equation does
    not use (a negative score satisfies ``S < 0.7``, and ``S_0 < 0`` already triggers the first clause).

    Vectorised and pure: ``s0`` and ``s`` are scalars, numpy arrays or torch tensors (broadcast together); the
    result is a boolean array/tensor of the same kind. **NaN**: every comparison with NaN is false, so a NaN in
    either score means *keep* (no decision is made from a missing or broken score).

    Args:
        s0: score(s) when the negative entered the active set.
        s: current score(s).
        s0_min: first threshold (0.4 in the paper).
        drop_ratio: relative drop factor (1.2 in the paper).
        s_max: upper bound on the current score for the drop clause (0.7 in the paper).

    Example:
        >>> dhnm_should_replace([0.3, 0.8, 0.8], [0.3, 0.6, 0.7]).tolist()
        [True, True, False]
    """
    if isinstance(s0, torch.Tensor) or isinstance(s, torch.Tensor):
        ref = s0 if isinstance(s0, torch.Tensor) else s
        s0 = torch.as_tensor(s0, device=ref.device)
        s = torch.as_tensor(s, device=ref.device)
    else:
        s0 = np.asarray(s0, dtype=np.float64)
        s = np.asarray(s, dtype=np.float64)
    return (s0 < s0_min) | ((drop_ratio * s < s0) & (s < s_max))


class NegativePool:
    """Per-example state of DHNM: a ranked candidate pool, ``k`` active negatives, their ``S_0`` and a cursor.

    Candidates are identified by their rank in the example's pool (``0`` = the hardest); these ranks are the
    *negative ids* the collator passes to the loss. Initially the first ``min(k, len(pool))`` candidates are active
    and the cursor points at the next unused one.

    **The pools are row ids, not texts.** ``candidate_ids`` is a ``(num_examples, max_pool_size)`` integer array
    (``int64``; an ``int32`` array given to :meth:`from_ids` is kept as is), ``candidate_ids[e, r]`` the row of the
    ``r``-th candidate of example ``e`` in a *text table*, ``-1`` after the last candidate. The text table is a
    ``datasets.Dataset`` column or a ``pyarrow`` string array — memory-mapped when it comes from
    ``Dataset.load_from_disk`` / ``Dataset.from_file`` (a corpus, or the table stage 4 writes) — and texts are only
    looked up for the rows of a batch (:meth:`negative_texts`, used by :class:`DHNMDataCollator`). ``candidate_ids``
    may itself be memory-mapped (``np.load(path, mmap_mode="r")``): the pool never writes to it, and only the
    collator reads it, one batch of rows at a time. Build a pool with:

    - :meth:`from_ids` — candidate row ids into a text table (what a miner returns: a corpus and the top ids per
      query); nothing is copied;
    - the constructor ``NegativePool(ids, candidates, k)`` with per-example lists of texts (kept for small data
      and tests): the distinct texts become an in-memory Arrow text table (deduplicated, in order of first use) and
      the lists are not kept, so the caller may drop them; :meth:`from_columns` and :meth:`from_mining` use it.

    **Example ids.** ``ids=None`` (only :meth:`from_ids`) keys the examples by their *row index*: the collator's
    ``id`` value ``e`` is pool row ``e``, with no per-example index at all. This is how pools relate to memory-mapped
    and streamed data: the training table carries, in its ``id`` column, the row index of the example in the table
    the pools were built from (stage 4 writes it, :mod:`conan_hf.stages.supervised`), and a streamed (iterable) dataset
    must carry that same column, since a stream has no stable position of its own. Other ids (any hashables, e.g.
    strings) are looked up through an index of their sorted hashes and rows (12 bytes per example) and the id
    sequence is kept by reference.

    The DHNM state lives in compact numpy arrays (``rank`` is ``int16`` when every pool has fewer than 32767
    candidates, else ``int32``):

    - ``active``: ``(num_examples, k)`` ``rank`` array, candidate rank in each slot, ``-1`` for an empty slot;
    - ``s0``: ``(num_examples, k)`` ``float64`` score of each active negative at its first scoring, ``NaN`` until
      scored (kept in float64 so that eq. 6 is decided on exactly the scores given);
    - ``cursor``: ``(num_examples,)`` ``rank`` array, rank of the next unused candidate;
    - ``pool_sizes``: ``(num_examples,)`` ``rank`` array, number of candidates;
    - ``fresh``: ``(num_examples, k)`` whether the slot holds a replacement that no batch has carried yet (it
      becomes ``False`` — counted as ``used`` — the first time the loss scores that negative). Stored bit-packed
      (``fresh_bits``, ``(num_examples, ceil(k / 8))`` ``uint8``); ``fresh`` unpacks a copy for inspection.

    With ``k = 7`` that is 14 + 56 + 2 + 2 + 1 = 75 bytes per example (93 with ``int32`` ranks), and one update
    (:meth:`apply_scores`) touches only the rows it was given. Memory per example beyond the data (text table and
    ``candidate_ids`` on disk, row-index ids) is these 75 bytes; ``candidate_ids`` in RAM adds 8 bytes per pool slot
    (``benchmarks/scale.py`` measures both against pools of Python strings).

    Bad input, by design:

    - duplicate example ids raise ``ValueError`` naming them (a pool could not tell the examples apart);
    - candidate ids outside the text table, or a ``-1`` before a candidate, raise ``ValueError`` naming the row;
    - an example without negatives, or with fewer than ``k``, keeps empty slots: the collator fills those columns
      with a placeholder and the loss masks them out of the softmax, so the example trains on the negatives it has;
    - when a negative should be replaced but the pool is used up, the current negative stays active (counted as
      ``pool_exhausted``);
    - NaN scores are ignored (no ``S_0`` is taken from them, no decision is made; counted as ``nan_scores``).

    Args:
        ids: one stable, hashable id per example (e.g. the dataset's ``id`` column).
        candidates: per example, the ranked candidate negative texts (hardest first).
        k: number of active negatives per example (7 in the paper).

    Example:
        >>> pool = NegativePool(["q1", "q2"], [["n1", "n2", "n3"], []], k=2)
        >>> pool.active_negatives("q1"), pool.active_negatives("q2")
        (['n1', 'n2'], [])
        >>> pool.candidate_ids.tolist(), pool.text_table.to_pylist()
        ([[0, 1, 2], [-1, -1, -1]], ['n1', 'n2', 'n3'])
    """

    def __init__(self, ids: Sequence[Hashable], candidates: Sequence[Sequence[str]], k: int = 7) -> None:
        import pyarrow as pa

        _check_k(k)
        ids = ids if type(ids) is list else list(ids)  # a list is kept by reference (not copied)
        if len(ids) != len(candidates):
            raise ValueError(f"NegativePool got {len(ids)} ids but {len(candidates)} candidate lists")
        # Distinct texts -> text table row. The dict references the caller's strings (no copies) and is dropped once
        # the Arrow table is built: the pool keeps no Python object per candidate (only the ids list, by reference).
        text_rows: dict[str, int] = {}
        flat = array("q")
        sizes = np.zeros(len(candidates), dtype=np.int64)
        for row, pool in enumerate(candidates):
            if isinstance(pool, str):
                raise TypeError(f"candidates[{row}] (id {ids[row]!r}) must be a list of texts, got a single string")
            before = len(flat)
            for text in pool:
                if not isinstance(text, str):
                    raise TypeError(f"candidate {len(flat) - before} of example {ids[row]!r} is "
                                    f"{type(text).__name__}, expected str: {text!r:.80}")
                flat.append(text_rows.setdefault(text, len(text_rows)))
            sizes[row] = len(flat) - before
        texts = pa.array(list(text_rows), type=pa.large_string())
        del text_rows
        width = int(sizes.max(initial=0))
        candidate_ids = np.full((len(ids), width), -1, dtype=np.int64)
        candidate_ids[np.arange(width)[None, :] < sizes[:, None]] = np.frombuffer(flat, dtype=np.int64)  # row-major
        del flat
        self._setup(ids, candidate_ids, _TextTable(texts), k, validate=False)

    @classmethod
    def from_ids(
        cls,
        ids: Sequence[Hashable] | None,
        candidate_ids: Any,
        texts: Any,
        k: int = 7,
        text_column: str = "text",
    ) -> NegativePool:
        """Pools given as row ids into a text table (a mined corpus, or the table of the data's own negatives).

        Args:
            ids: ``None`` (examples keyed by their row index ``0 .. n-1``: no per-example index) or one hashable id
                per example.
            candidate_ids: ``(num_examples, max_pool_size)`` integer array: ``candidate_ids[e, r]`` is the text
                table row of example ``e``'s ``r``-th candidate (hardest first), ``-1`` after its last one. Kept
                without a copy when it is ``int64`` or ``int32`` (a ``np.load(..., mmap_mode="r")`` array stays on
                disk); other integer dtypes are converted to ``int64``.
            texts: the text table: a ``datasets.Dataset`` (its ``text_column``; memory-mapped when loaded with
                ``load_from_disk`` / ``Dataset.from_file``), a ``pyarrow`` ``Array`` / ``ChunkedArray`` of strings,
                or a list of str (e.g. ``conan_hf.data.teacher``'s mined texts; copied into an Arrow array once, so
                the list can be dropped).
            k: active negatives per example.
            text_column: the column of ``texts`` holding the texts, when it is a Dataset.

        Example:
            >>> import numpy as np, pyarrow as pa
            >>> corpus = pa.array(["doc a", "doc b", "doc c"])
            >>> pool = NegativePool.from_ids(None, np.array([[2, 0], [1, -1]]), corpus, k=1)
            >>> pool.active_negatives(0), pool.candidates[1]
            (['doc c'], ['doc b'])
        """
        _check_k(k)
        table = _TextTable(texts, text_column)
        array_ids = np.asanyarray(candidate_ids)  # a np.memmap stays one
        if array_ids.ndim != 2:
            raise ValueError(f"candidate_ids must be a 2-D (examples, pool size) array, got shape {array_ids.shape}")
        if array_ids.dtype.kind not in "iu":
            raise TypeError(f"candidate_ids must be an integer array (text table rows, -1 = none), got dtype "
                            f"{array_ids.dtype}")
        if array_ids.dtype not in (np.int64, np.int32):
            array_ids = array_ids.astype(np.int64)
        if ids is not None:
            ids = ids if type(ids) is list else list(ids)
            if len(ids) != array_ids.shape[0]:
                raise ValueError(f"NegativePool got {len(ids)} ids but {array_ids.shape[0]} rows of candidate_ids")
        pool = cls.__new__(cls)
        pool._setup(ids, array_ids, table, k, validate=True)
        return pool

    def _setup(self, ids: list | None, candidate_ids: np.ndarray, texts: _TextTable, k: int, validate: bool) -> None:
        self.k = k
        self.ids = ids
        self._num_examples = int(candidate_ids.shape[0])
        self.candidate_ids = candidate_ids
        self._texts = texts
        self._fingerprint = None
        if ids is None:
            self._sorted_keys = np.zeros(0, dtype=np.int64)
            self._key_rows = np.zeros(0, dtype=np.int32)
            self._collided: dict[Hashable, int] = {}
        else:
            self._build_id_index()
        sizes = self._pool_sizes_checked() if validate else (candidate_ids >= 0).sum(axis=1)
        self.max_pool_size = int(sizes.max(initial=0))  # cached: apply_scores must not scan all pools per step
        rank_dtype = np.int16 if max(self.max_pool_size, k) < np.iinfo(np.int16).max else np.int32
        self.pool_sizes = sizes.astype(rank_dtype)
        del sizes
        num_active = np.minimum(self.pool_sizes, k)
        slots = np.arange(k, dtype=rank_dtype)
        self.active = np.where(slots[None, :] < num_active[:, None], slots[None, :], -1).astype(rank_dtype)
        self.s0 = np.full((self._num_examples, k), np.nan, dtype=np.float64)
        self.cursor = num_active.astype(rank_dtype)
        self.fresh_bits = np.zeros((self._num_examples, (k + 7) // 8), dtype=np.uint8)

    def _pool_sizes_checked(self, block: int = 1 << 18) -> np.ndarray:
        """Candidates per example, checking ``candidate_ids`` block by block (bounded temporary memory)."""
        num_texts = len(self._texts)
        sizes = np.empty(self._num_examples, dtype=np.int64)
        for start in range(0, self._num_examples, block):
            part = np.asarray(self.candidate_ids[start:start + block])
            present = part >= 0
            bad = (part < -1) | (part >= num_texts)
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise ValueError(
                    f"candidate_ids[{start + row}, {col}] = {part[row, col]} is not a row of the text table "
                    f"({num_texts} texts) nor -1 (no candidate); example {self._describe(start + row)}"
                )
            gap = present[:, 1:] & ~present[:, :-1]
            if gap.any():
                row, col = np.argwhere(gap)[0]
                raise ValueError(
                    f"candidate_ids row {start + row} (example {self._describe(start + row)}) has a candidate at "
                    f"position {col + 1} after a -1: pools are ranked lists, padded with -1 at the end"
                )
            sizes[start:start + block] = present.sum(axis=1)
        return sizes

    def _describe(self, row: int) -> str:
        return f"row {row}" if self.ids is None else f"{self.ids[row]!r}"

    # ---- construction helpers ------------------------------------------------------------------------------------
    @classmethod
    def from_columns(
        cls,
        dataset: Any,
        id_column: str = "id",
        negative_columns: Sequence[str] | None = None,
        k: int = 7,
    ) -> NegativePool:
        """Build pools from negatives already in the data.

        Args:
            dataset: a ``datasets.Dataset`` (or anything with ``column_names`` and column access).
            id_column: column with the example ids.
            negative_columns: columns holding negatives, in rank order; each value is a text or a list of texts.
                Default: every column whose name starts with ``"negative"`` (``negative``, ``negative_1``, ...,
                ``negatives``), in dataset order. Empty strings and ``None`` are skipped; repeated texts within a
                row are kept once.
            k: active negatives per example.

        Example:
            >>> from datasets import Dataset
            >>> ds = Dataset.from_dict({"id": [1, 2], "anchor": ["a", "b"], "positive": ["p", "q"],
            ...                         "negative_1": ["x", "y"], "negative_2": ["z", ""]})
            >>> list(NegativePool.from_columns(ds, k=1).candidates)
            [['x', 'z'], ['y']]
        """
        columns = list(dataset.column_names)
        if id_column not in columns:
            raise ValueError(
                f"dataset has no {id_column!r} column (columns: {columns}); DHNM needs a stable id per row"
            )
        if negative_columns is None:
            negative_columns = [c for c in columns if c.startswith("negative")]
        missing = [c for c in negative_columns if c not in columns]
        if missing:
            raise ValueError(f"negative column(s) {missing} not in the dataset (columns: {columns})")
        values = [dataset[c] for c in negative_columns]
        candidates = []
        for row in range(len(dataset)):
            pool: list[str] = []
            for column, column_values in zip(negative_columns, values):
                value = column_values[row]
                for text in [value] if isinstance(value, str) or value is None else value:
                    if text is None or text == "":
                        continue
                    if not isinstance(text, str):
                        raise TypeError(f"row {row}, column {column!r}: negative must be text, got {text!r:.80}")
                    if text not in pool:
                        pool.append(text)
            candidates.append(pool)
        return cls(dataset[id_column], candidates, k=k)

    @classmethod
    def from_mining(
        cls,
        dataset: Any,
        model: Any,
        anchor_column: str = "anchor",
        positive_column: str = "positive",
        id_column: str = "id",
        k: int = 7,
        num_candidates: int = 32,
        relative_margin: float | None = 0.05,
        absolute_margin: float | None = None,
        corpus: list[str] | None = None,
        batch_size: int = 32,
        verbose: bool = True,
        **mine_kwargs: Any,
    ) -> NegativePool:
        """Build ranked pools by mining with a teacher embedder (:func:`conan_hf.data.teacher.mine_negative_ids`:
        FAISS search over memory-mapped embeddings, the rules of ``sentence_transformers.util.mine_hard_negatives``).

        Candidates are the teacher's top ``num_candidates`` documents for each query (from the positives of the
        dataset plus ``corpus``), hardest first, after the false-negative filter: with ``relative_margin=0.05`` a
        candidate scoring above 95% of the positive's score is dropped as a probable positive (NV-Retriever's
        TopK-PercPos); ``absolute_margin`` drops candidates within that distance of the positive's score. An
        example for which nothing survives gets an empty pool (see :class:`NegativePool` for how that trains). The
        pools are kept as row ids into the mined text table (:meth:`from_ids`).

        Args:
            dataset: ``datasets.Dataset`` with ``id_column``, ``anchor_column`` and ``positive_column``.
            model: the teacher SentenceTransformer.
            k: active negatives per example.
            num_candidates: pool size to mine per example.
            relative_margin / absolute_margin: false-negative margins.
            corpus: extra candidate documents.
            batch_size: teacher encoding batch size.
            verbose: print the mining statistics.
            **mine_kwargs: further :func:`conan_hf.data.teacher.mine_negative_ids` options (``range_min``,
                ``max_score``, prompt names, ``index``, ``chunk_size``).
        """
        from conan_hf.data.teacher import mine_negative_ids

        if id_column not in dataset.column_names:
            raise ValueError(f"dataset has no {id_column!r} column (columns: {dataset.column_names})")
        mine_kwargs.pop("use_faiss", None)  # always FAISS now
        mined, _ = mine_negative_ids(
            dataset.select_columns([anchor_column, positive_column]),
            model,
            pool_size=num_candidates,
            query_column=anchor_column,
            positive_column=positive_column,
            corpus=corpus,
            relative_margin=relative_margin,
            absolute_margin=absolute_margin,
            batch_size=batch_size,
            verbose=verbose,
            **mine_kwargs,
        )
        return cls.from_ids(dataset[id_column], mined.candidate_ids, mined.texts, k=k)

    # ---- lookups -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_examples

    @property
    def text_table(self) -> Any:
        """The text table the candidate ids point into (a ``pyarrow`` ChunkedArray, or the ``datasets.Dataset``
        given to :meth:`from_ids`)."""
        return self._texts.source

    @property
    def candidates(self) -> CandidateTexts:
        """Read-only view of the pools as texts: ``pool.candidates[e]`` is example ``e``'s ranked candidate texts,
        looked up in the text table on access (for inspection and tests; batches use :meth:`negative_texts`)."""
        return CandidateTexts(self)

    def _build_id_index(self) -> None:
        """Index id -> row as sorted hashes (8 B) and their rows (4 B) per example instead of a dict (~100 B).

        ``hash()`` is per process (string hashing is salted), which is all an in-memory index needs. Equal ids have
        equal hashes, so duplicates are found among equal hashes; distinct ids whose hashes collide (rare) are kept
        in the small dict ``_collided``.
        """
        ids = self.ids
        try:
            keys = np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))
        except TypeError:
            row = next(r for r, i in enumerate(ids) if not _is_hashable(i))
            raise TypeError(f"example ids must be hashable; row {row} has id {ids[row]!r}") from None
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        del keys
        self._key_rows = order.astype(np.int32 if len(ids) < np.iinfo(np.int32).max else np.int64)
        del order
        self._collided: dict[Hashable, int] = {}
        duplicates: dict[Hashable, list[int]] = {}
        same = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
        if same.size:
            group_starts = same[np.r_[True, np.diff(same) != 1]]  # first index of each run of equal keys
            for start in group_starts:
                stop = start + 1
                while stop < len(self._sorted_keys) and self._sorted_keys[stop] == self._sorted_keys[start]:
                    stop += 1
                seen: dict[Hashable, int] = {}
                for row in sorted(int(r) for r in self._key_rows[start:stop]):
                    first = seen.setdefault(ids[row], row)
                    if first != row:
                        duplicates.setdefault(ids[row], [first]).append(row)
                if len(seen) > 1:  # a hash collision between different ids
                    self._collided.update(seen)
        if duplicates:
            ordered = sorted(duplicates.items(), key=lambda item: item[1][0])
            shown = "; ".join(f"{i!r} at rows {rows}" for i, rows in ordered[:5])
            raise ValueError(
                f"example ids must be unique, found {len(duplicates)} duplicated id(s): {shown}. DHNM keeps one pool "
                "per id, so duplicated rows would share (and fight over) one set of negatives; give each row its "
                "own id or deduplicate the data."
            )


    def _lookup(self, example_id: Hashable) -> int:
        """Row of ``example_id`` or -1."""
        if self.ids is None:  # keyed by row index
            if isinstance(example_id, (int, np.integer)) and not isinstance(example_id, (bool, np.bool_)):
                row = int(example_id)
                return row if 0 <= row < self._num_examples else -1
            return -1
        try:
            key = hash(example_id)
        except TypeError:
            return -1
        if self._collided and example_id in self._collided:
            return self._collided[example_id]
        position = int(np.searchsorted(self._sorted_keys, key))
        if position < len(self._sorted_keys) and self._sorted_keys[position] == key:
            row = int(self._key_rows[position])
            if self.ids[row] == example_id:
                return row
        return -1

    def row(self, example_id: Hashable) -> int:
        """Row of ``example_id`` in the state arrays."""
        row = self._lookup(example_id)
        if row < 0:
            keyed = " (examples are keyed by their row index)" if self.ids is None else ""
            raise KeyError(
                f"example id {example_id!r} is not in the NegativePool ({len(self)} examples){keyed}; build the pool "
                "from the same dataset that is trained on"
            )
        return row

    def rows(self, example_ids: Sequence[Hashable]) -> np.ndarray:
        """``int64`` rows of several ids (vectorised when the examples are keyed by row index)."""
        if self.ids is None:
            values = np.asarray(example_ids)
            if values.dtype.kind in "iu" and values.ndim == 1:
                rows = values.astype(np.int64)
                outside = (rows < 0) | (rows >= self._num_examples)
                if outside.any():
                    self.row(values[np.argmax(outside)].item())  # raises, naming the id
                return rows
        return np.array([self.row(example_id) for example_id in example_ids], dtype=np.int64)

    @property
    def fresh(self) -> np.ndarray:
        """``(num_examples, k)`` bool copy of the bit-packed ``fresh_bits`` (for inspection; O(N))."""
        return np.unpackbits(self.fresh_bits, axis=1, count=self.k, bitorder="little").astype(bool)

    def state_nbytes(self) -> int:
        """Bytes held by the per-example state arrays (``active``, ``s0``, ``cursor``, ``pool_sizes``, flags)."""
        return sum(a.nbytes for a in (self.active, self.s0, self.cursor, self.pool_sizes, self.fresh_bits))

    def memory_nbytes(self) -> int:
        """Bytes held per pool beyond the ids, the candidate ids and the text table: the state arrays plus the id
        index (``_sorted_keys`` int64 and ``_key_rows`` int32, none when keyed by row index; 75 + 12 = 87 bytes
        per example at ``k = 7`` with an index, 75 without)."""
        return self.state_nbytes() + self._sorted_keys.nbytes + self._key_rows.nbytes

    def _fresh_at(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return ((self.fresh_bits[rows, slots >> 3] >> (slots & 7).astype(np.uint8)) & 1).astype(bool)

    def _set_fresh(self, rows: np.ndarray, slots: np.ndarray, value: bool) -> None:
        masks = np.left_shift(1, slots & 7).astype(np.uint8)
        index = (rows, slots >> 3)
        # ufunc.at: several slots of one example can share a byte in the same call.
        if value:
            np.bitwise_or.at(self.fresh_bits, index, masks)
        else:
            np.bitwise_and.at(self.fresh_bits, index, ~masks)

    def negative_texts(self, rows: np.ndarray, ranks: np.ndarray) -> list[list[str | None]]:
        """Texts of candidate ``ranks[i, j]`` of pool row ``rows[i]`` (``None`` where the rank is ``-1``): one lookup
        in the text table for the whole batch."""
        rows = np.asarray(rows, dtype=np.int64)
        ranks = np.asarray(ranks, dtype=np.int64)
        out: list[list[str | None]] = [[None] * ranks.shape[1] for _ in range(len(rows))]
        filled_rows, filled_slots = np.nonzero(ranks >= 0)
        if filled_rows.size:
            text_rows = np.asarray(self.candidate_ids[rows[filled_rows], ranks[filled_rows, filled_slots]])
            for i, j, text in zip(filled_rows.tolist(), filled_slots.tolist(), self._texts.take(text_rows)):
                out[i][j] = text
        return out

    def active_negatives(self, example_id: Hashable) -> list[str]:
        """The texts of the example's active negatives (filled slots only)."""
        row = self.row(example_id)
        ranks = self.active[row][None, :]
        return [text for text in self.negative_texts(np.array([row]), ranks)[0] if text is not None]

    # ---- eq. 6 ---------------------------------------------------------------------------------------------------
    def apply_scores(
        self,
        example_rows: Any,
        negative_ids: Any,
        scores: Any,
        s0_min: float = 0.4,
        drop_ratio: float = 1.2,
        s_max: float = 0.7,
    ) -> dict[str, int]:
        """Judge scored active negatives with :func:`dhnm_should_replace` and advance the pools.

        Args:
            example_rows: ``(n,)`` pool rows of the scored examples (one entry per row of ``negative_ids``).
            negative_ids: ``(n, m)`` candidate ranks that were scored; ``-1`` entries are ignored.
            scores: ``(n, m)`` their query–negative cosine scores.
            s0_min / drop_ratio / s_max: the thresholds of eq. 6.

        A negative scored for the first time takes that score as its ``S_0`` and is judged right away (so a
        candidate with ``S_0 < s0_min`` leaves at its first scoring). Replacements take the next unused candidates of
        the pool, in the order the scores are given. Entries are processed deterministically: a repeated
        (example, negative) pair keeps its first occurrence, and a pair whose negative is no longer active (scored
        on a batch built before an earlier replacement) is skipped as ``stale``.

        A scored pair whose negative is a replacement that no batch had carried before counts as ``used``: the
        replacement has now been trained on (this is counted before the NaN filter: a NaN score was still carried).

        Returns:
            counts: ``checked`` (pairs judged), ``replaced``, ``used`` (replacements carried for the first time),
            ``pool_exhausted`` (replacement due but no candidate left: the negative stays), ``nan_scores`` (ignored
            NaN scores) and ``stale``.
        """
        rows = np.asarray(example_rows, dtype=np.int64).reshape(-1)
        negs = np.asarray(negative_ids, dtype=np.int64)
        vals = np.asarray(scores, dtype=np.float64)
        if negs.ndim == 1:
            negs, vals = negs[:, None], vals.reshape(-1, 1)
        if negs.shape != vals.shape or negs.shape[0] != rows.shape[0]:
            raise ValueError(
                f"apply_scores: shapes do not match: rows {rows.shape}, negative_ids {negs.shape}, scores {vals.shape}"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"apply_scores: example rows must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        rows = np.repeat(rows, negs.shape[1])
        negs, vals = negs.reshape(-1), vals.reshape(-1)
        filled = negs >= 0
        rows, negs, vals = rows[filled], negs[filled], vals[filled]
        counts = dict.fromkeys(_COUNT_KEYS, 0)
        if rows.size == 0:
            return counts

        # One integer key per (example, negative) pair; 1-D unique is much cheaper than unique over rows.
        # (max_pool_size is cached at construction: no O(num_examples) scan per step.)
        keys = rows * (max(self.max_pool_size, int(negs.max())) + 1) + negs
        _, first = np.unique(keys, return_index=True)
        first.sort()
        rows, negs, vals = rows[first], negs[first], vals[first]

        # A replacement carried by this batch for the first time has been used (whatever its score).
        carried = self.active[rows] == negs[:, None]
        carried_rows, carried_slots = np.nonzero(carried)
        carried_rows = rows[carried_rows]
        used = self._fresh_at(carried_rows, carried_slots)
        counts["used"] = int(used.sum())
        self._set_fresh(carried_rows[used], carried_slots[used], False)

        nan = np.isnan(vals)
        counts["nan_scores"] = int(nan.sum())
        rows, negs, vals = rows[~nan], negs[~nan], vals[~nan]

        match = self.active[rows] == negs[:, None]
        current = match.any(axis=1)
        counts["stale"] = int((~current).sum())
        rows, vals, slots = rows[current], vals[current], match[current].argmax(axis=1)
        counts["checked"] = int(rows.size)

        s0 = self.s0[rows, slots]
        first_time = np.isnan(s0)
        self.s0[rows[first_time], slots[first_time]] = vals[first_time]
        s0 = np.where(first_time, vals, s0)
        replace = dhnm_should_replace(s0, vals, s0_min=s0_min, drop_ratio=drop_ratio, s_max=s_max)

        r_rows, r_slots = rows[replace], slots[replace]
        order = np.argsort(r_rows, kind="stable")
        r_rows, r_slots = r_rows[order], r_slots[order]
        # The j-th replacement of an example (in score order) takes the candidate j places after its cursor.
        _, start, per_row = np.unique(r_rows, return_index=True, return_counts=True)
        rank_in_row = np.arange(r_rows.size) - np.repeat(start, per_row)
        new_rank = self.cursor[r_rows] + rank_in_row
        ok = new_rank < self.pool_sizes[r_rows]
        self.active[r_rows[ok], r_slots[ok]] = new_rank[ok]
        self.s0[r_rows[ok], r_slots[ok]] = np.nan
        self._set_fresh(r_rows[ok], r_slots[ok], True)
        np.add.at(self.cursor, r_rows[ok], 1)
        counts["replaced"] = int(ok.sum())
        counts["pool_exhausted"] = int((~ok).sum())
        return counts


    # ---- persistence ---------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of the ids, candidate ids, text table and ``k``: a saved state only loads into the same pools.

        ``sha256`` over ``k``, the number of examples, the ids (their ``repr``; nothing for row-index ids), the
        candidate ids (as little-endian ``int64``) and the text table's content (every text's length and bytes,
        independent of how the table is chunked). Computed once (the pools never change): at 10M examples
        ``benchmarks/scale.py`` reports the time.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{_FINGERPRINT_PREFIX}k={self.k};n={len(self)};".encode())
            if self.ids is None:
                digest.update(b"ids=row index;")
            else:
                for start in range(0, len(self), 65536):
                    digest.update("\x00".join(map(repr, self.ids[start:start + 65536])).encode() + b"\x00")
            digest.update(f"candidates={self.candidate_ids.shape[1]};".encode())
            for start in range(0, len(self), 1 << 18):
                digest.update(np.ascontiguousarray(self.candidate_ids[start:start + (1 << 18)], dtype="<i8").data)
            digest.update(self._texts.content_digest())
            self._fingerprint = f"{_FINGERPRINT_PREFIX}{digest.hexdigest()}"
        return self._fingerprint

    def legacy_fingerprint(self) -> str:
        """The fingerprint of earlier versions (the ids' ``repr`` and every candidate's text, example by example),
        which states saved before candidates were row ids carry; row-index ids count as the ints ``0 .. n-1``.
        O(examples x candidates) in Python: computed only to check such a state."""
        digest = hashlib.sha256()
        digest.update(str(self.k).encode())
        ids = self.ids if self.ids is not None else range(len(self))
        for example_id, pool in zip(ids, self.candidates):
            digest.update(repr(example_id).encode())
            digest.update(b"\x00")
            digest.update("\x1f".join(pool).encode())
            digest.update(b"\x1e")
        return digest.hexdigest()

    def _matches_fingerprint(self, saved: str) -> bool:
        if saved == self.fingerprint():
            return True
        return not str(saved).startswith(_FINGERPRINT_PREFIX) and saved == self.legacy_fingerprint()

    def state_dict(self) -> dict[str, Any]:
        """The state: metadata plus the live state arrays (not copies; :meth:`DHNMCallback.save` writes them as is).

        Version 3. ``fresh_bits`` is the bit-packed ``fresh`` flag array (little bit order, slot ``j`` of an example
        is bit ``j % 8`` of byte ``j // 8``).
        """
        return {
            "version": _STATE_VERSION,
            "num_examples": len(self),
            "k": self.k,
            "fingerprint": self.fingerprint(),
            "active": self.active,
            "s0": self.s0,
            "cursor": self.cursor,
            "fresh_bits": self.fresh_bits,
        }

    def load_state_dict(self, state: dict[str, Any], copy: bool = True) -> None:
        """Restore :meth:`state_dict` output (version 3, arrays) or a version 1/2 JSON state (lists, from
        ``dhnm_state.json`` of earlier releases); raises ``ValueError`` if it was saved for different pools.

        Args:
            state: the state.
            copy: copy version-3 arrays (``False`` adopts them when their dtype and shape already match, e.g. arrays
                just read from a file, to avoid a second copy of the state at 10M examples).
        """
        version = state.get("version")
        if version not in (1, 2, _STATE_VERSION):
            raise ValueError(f"unsupported DHNM state version {version!r} (expected 1, 2 or {_STATE_VERSION})")
        if state["num_examples"] != len(self) or state["k"] != self.k or not self._matches_fingerprint(
                state["fingerprint"]):
            raise ValueError(
                f"the saved DHNM state belongs to other pools ({state['num_examples']} examples, k={state['k']}) than "
                f"this NegativePool ({len(self)} examples, k={self.k}) or their ids/candidates differ; build the pool "
                "from the same data and k as the interrupted run"
            )
        shape, rank_dtype = (len(self), self.k), self.active.dtype
        if version == _STATE_VERSION:
            arrays = {
                "active": (state["active"], rank_dtype, shape),
                "s0": (state["s0"], np.float64, shape),
                "cursor": (state["cursor"], rank_dtype, (len(self),)),
                "fresh_bits": (state["fresh_bits"], np.uint8, self.fresh_bits.shape),
            }
            loaded = {}
            for name, (value, dtype, expected) in arrays.items():
                value = np.asarray(value)
                if value.shape != expected:
                    raise ValueError(f"DHNM state array {name!r} has shape {value.shape}, expected {expected}")
                if value.dtype.kind != np.dtype(dtype).kind:
                    raise ValueError(f"DHNM state array {name!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
                loaded[name] = np.array(value, dtype=dtype, copy=True if copy else None)
            self.active, self.s0, self.cursor = loaded["active"], loaded["s0"], loaded["cursor"]
            self.fresh_bits = loaded["fresh_bits"]
            return
        # Versions 1 and 2: JSON lists, S0 NaN as null, `fresh` as flat indices into (num_examples, k).
        self.active = np.asarray(state["active"], dtype=np.int64).reshape(shape).astype(rank_dtype)
        self.s0 = np.asarray(
            [[np.nan if v is None else v for v in row] for row in state["s0"]], dtype=np.float64
        ).reshape(shape)
        self.cursor = np.asarray(state["cursor"], dtype=np.int64).astype(rank_dtype)
        # Version 1 states predate the used counter: their pending replacements are not known, none is counted.
        fresh = np.zeros(shape, dtype=bool)
        fresh.reshape(-1)[np.asarray(state.get("fresh", []), dtype=np.int64)] = True
        self.fresh_bits = np.packbits(fresh, axis=1, bitorder="little")


class CandidateTexts(Sequence):
    """Read-only sequence view of a :class:`NegativePool`'s pools as lists of texts (``pool.candidates``).

    Each access looks the texts up in the pool's text table; nothing is cached. Compares equal to any sequence of
    the same texts (``pool.candidates == [["a", "b"], []]``).
    """

    def __init__(self, pool: NegativePool) -> None:
        self._pool = pool

    def __len__(self) -> int:
        return len(self._pool)

    def __getitem__(self, row: Any) -> Any:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = operator.index(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"pool row {row} out of range ({len(self)} examples)")
        size = int(self._pool.pool_sizes[row])
        return self._pool._texts.take(np.asarray(self._pool.candidate_ids[row, :size]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(list(mine) == list(theirs) for mine, theirs in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(repr(self[i]) for i in range(min(len(self), 3)))
        return f"CandidateTexts([{shown}{', ...' if len(self) > 3 else ''}], {len(self)} examples)"


class _TextTable:
    """The texts candidate ids point into: a ``pyarrow`` string Array/ChunkedArray or a ``datasets.Dataset`` column.

    Memory-mapped tables stay memory-mapped: a Dataset without an indices mapping is read through its Arrow
    column's chunks (``dataset.data.column``), one with an indices mapping (after ``select``/``shuffle``) through
    ``dataset[rows]``.
    """

    def __init__(self, texts: Any, column: str = "text") -> None:
        import pyarrow as pa

        self.source = texts
        self._dataset = None
        if hasattr(texts, "column_names") and hasattr(texts, "features"):  # a datasets.Dataset
            if column not in texts.column_names:
                raise ValueError(f"the text table has no {column!r} column (columns: {texts.column_names})")
            if getattr(texts, "_indices", None) is not None:
                self._dataset, self._column = texts.select_columns([column]).with_format(None), column
                chunks = None
            else:
                chunks = list(texts.data.column(column).chunks)
        elif isinstance(texts, pa.ChunkedArray):
            chunks = list(texts.chunks)
        elif isinstance(texts, pa.Array):
            chunks = [texts]
        elif isinstance(texts, (list, tuple)):  # e.g. a miner's list of distinct texts: copied into Arrow once
            bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
            if bad is not None:
                raise TypeError(f"text table row {bad} is {type(texts[bad]).__name__}, expected str: "
                                f"{texts[bad]!r:.80}")
            chunks = [pa.array(texts, type=pa.large_string())]
            self.source = chunks[0]
        else:
            raise TypeError(f"the text table must be a datasets.Dataset, a pyarrow string array or a list of str, got "
                            f"{type(texts).__name__}")
        if chunks is not None:
            for chunk in chunks:
                if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
                    raise TypeError(f"the text table must hold strings, got Arrow type {chunk.type}")
            chunks = [chunk for chunk in chunks if len(chunk)]
            self._chunks = chunks
            self._starts = np.cumsum([0] + [len(chunk) for chunk in chunks], dtype=np.int64)
            self._length = int(self._starts[-1])
            nulls = [i for i, chunk in enumerate(chunks) if chunk.null_count]
            if nulls:
                first = int(np.flatnonzero(chunks[nulls[0]].is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"the text table has a missing (null) text at row {self._starts[nulls[0]] + first}")
        else:
            self._length = len(self._dataset)

    def __len__(self) -> int:
        return self._length

    def take(self, rows: np.ndarray) -> list[str]:
        """Texts at ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._dataset is not None:
            texts = self._dataset[rows.tolist()][self._column] if rows.size else []
            if any(text is None for text in texts):
                raise ValueError("the text table has a missing (null) text among rows "
                                 f"{rows[[t is None for t in texts]].tolist()}")
            return texts
        chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[chunk_of]
        return [self._chunks[c][i].as_py() for c, i in zip(chunk_of.tolist(), local.tolist())]

    def _arrow_chunks(self) -> Any:
        if self._dataset is None:
            yield from self._chunks
            return
        for batch in self._dataset.with_format("arrow").iter(batch_size=65536):
            yield from batch.column(self._column).chunks

    def content_digest(self) -> bytes:
        """``sha256`` of every text's length and bytes, the same however the table is chunked."""
        import pyarrow as pa

        lengths, data = hashlib.sha256(), hashlib.sha256()
        for chunk in self._arrow_chunks():
            if not len(chunk):
                continue
            offset_type = np.int32 if pa.types.is_string(chunk.type) else np.int64
            _, offsets_buffer, data_buffer = chunk.buffers()
            offsets = np.frombuffer(offsets_buffer, dtype=offset_type, count=chunk.offset + len(chunk) + 1)
            offsets = offsets[chunk.offset:].astype(np.int64)
            lengths.update(np.diff(offsets).astype("<i8").data)
            if data_buffer is not None and offsets[-1] > offsets[0]:
                data.update(memoryview(data_buffer)[offsets[0]:offsets[-1]])
        return lengths.digest() + data.digest()


def _check_k(k: Any) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (active negatives per example) must be a positive integer, got {k!r}")



@dataclass
class DHNMDataCollator(SentenceTransformerDataCollator):
    """sentence-transformers' data collator that fills each row's negatives from its :class:`NegativePool`.

    For every row it takes ``id_column`` out of the inputs (it is never tokenised), drops any column whose name
    starts with ``negative_prefix``, and appends ``k`` columns ``{negative_prefix}_1 .. _k`` with the example's
    *current* active negatives. Empty slots (an example with fewer than ``k`` candidates) get the row's positive as
    a placeholder text, and the loss masks them out. The ids reach the loss as ``labels``: an integer tensor
    ``(batch, 1 + k)`` = [pool row, candidate rank per negative column (``-1`` = empty)], which
    :class:`conan_hf.losses.InfoNCELoss` uses to mask empty slots and to key its score record.

    The pool is read at batching time, so replacements made by :class:`DHNMCallback` show up the next time the
    example is batched (train more than one epoch, see the module docstring). This needs the collator to run in the
    training process: keep ``dataloader_num_workers=0`` (the callback checks).

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
        batch["label"] = torch.from_numpy(np.concatenate([rows[:, None], negative_ids], axis=1))
        return batch


def _score_source(loss: torch.nn.Module) -> Any:
    """The module that records hard-negative scores: ``loss`` itself or one it wraps (e.g. MatryoshkaLoss)."""
    if hasattr(loss, "pop_hard_negative_scores"):
        return loss
    for module in loss.modules():
        if hasattr(module, "pop_hard_negative_scores"):
            return module
    raise TypeError(
        f"{type(loss).__name__} does not record hard-negative scores; use conan_hf.losses.InfoNCELoss "
        "(optionally inside MatryoshkaLoss)"
    )


def _all_gather_arrays(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Concatenate ``arrays`` from every rank in rank order (identical result on all ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return arrays
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return arrays
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered]) for i in range(len(arrays)))


class DHNMCallback(TrainerCallback):
    """Apply DHNM (eq. 6) after every optimizer step and keep the pool state in the checkpoints.

    ``on_step_end``: reads the scores :class:`conan_hf.losses.InfoNCELoss` recorded for the step's micro-batches,
    gathers them from all ranks (``torch.distributed.all_gather_object``, rank order), and calls
    :meth:`NegativePool.apply_scores` — every rank sees the same scores in the same order, so every rank makes the
    same decisions and the pools stay identical. The counts (``checked``, ``replaced``, ``used``,
    ``pool_exhausted``, ``nan_scores``, ``stale``) are summed since the previous log and added as ``dhnm_<name>`` to
    the Trainer's
    training log (``logs`` and ``state.log_history``); ``logging_steps=1`` gives per-step counts. Running totals
    are in :attr:`totals`, the last step's counts in :attr:`last_step_counts`.

    ``on_save``: writes ``dhnm_state.npz`` (pool state arrays, thresholds, totals, step) into the checkpoint folder the
    Trainer just wrote, ``<output_dir>/checkpoint-<global_step>``.

    ``on_train_begin``: restores that file when resuming. The Trainer gives callbacks no resume path, so it is
    taken from ``resume_from_checkpoint`` given here, else from ``args.resume_from_checkpoint``, else — when the
    Trainer has restored a state (``state.global_step > 0``, i.e. ``trainer.train(resume_from_checkpoint=...)``) —
    from ``<output_dir>/checkpoint-<global_step>``. Resuming without a matching state file raises (the pools would
    silently restart otherwise).

    Args:
        pool: the :class:`NegativePool` the collator reads.
        loss: the training loss (an :class:`~conan_hf.losses.InfoNCELoss`, possibly wrapped in MatryoshkaLoss).
        s0_min / drop_ratio / s_max: eq. 6 thresholds (0.4, 1.2, 0.7 in the paper).
        resume_from_checkpoint: checkpoint folder to restore the pools from (optional, see above).

    Example:
        ::

            callback = DHNMCallback(pool, loss, s0_min=0.4, drop_ratio=1.2, s_max=0.7)
            trainer = SentenceTransformerTrainer(..., callbacks=[callback])
            trainer.train(resume_from_checkpoint="out/checkpoint-500")
    """

    def __init__(
        self,
        pool: NegativePool,
        loss: torch.nn.Module,
        s0_min: float = 0.4,
        drop_ratio: float = 1.2,
        s_max: float = 0.7,
        resume_from_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        self.pool = pool
        self.score_source = _score_source(loss)
        self.thresholds = {"s0_min": float(s0_min), "drop_ratio": float(drop_ratio), "s_max": float(s_max)}
        self.resume_from_checkpoint = None if resume_from_checkpoint is None else os.fspath(resume_from_checkpoint)
        self.totals: dict[str, int] = dict.fromkeys(_COUNT_KEYS, 0)
        self.last_step_counts: dict[str, int] = dict.fromkeys(_COUNT_KEYS, 0)
        self._since_log: dict[str, int] = dict.fromkeys(_COUNT_KEYS, 0)

    # ---- training events -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_num_workers > 0:
            raise ValueError(
                f"DHNM needs dataloader_num_workers=0 (got {args.dataloader_num_workers}): worker processes would "
                "batch from copies of the NegativePool and never see the replacements"
            )
        path = self._resume_path(args, state)
        if path is not None:
            self.load(path, expected_step=state.global_step if state.global_step > 0 else None)

    def on_step_end(self, args, state, control, **kwargs):
        records = self.score_source.pop_hard_negative_scores()
        if records:
            rows = np.concatenate([r.example_ids.cpu().numpy().astype(np.int64) for r in records])
            width = max(r.negative_ids.shape[1] for r in records)
            # Micro-batches may differ in negative columns; pad to one width with empty (-1 / NaN) slots.
            negs = np.concatenate([_pad(r.negative_ids.cpu().numpy().astype(np.int64), width, -1) for r in records])
            scores = np.concatenate([_pad(r.scores.cpu().numpy().astype(np.float64), width, np.nan) for r in records])
        else:
            rows, negs, scores = np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float64)
        # Every rank takes part in the gather, also with nothing to add, so the collective always matches up.
        rows, negs, scores = _all_gather_arrays((rows, _pad(negs, self.pool.k, -1), _pad(scores, self.pool.k, np.nan)))
        counts = self.pool.apply_scores(rows, negs, scores, **self.thresholds)
        self.last_step_counts = counts
        for key, value in counts.items():
            self.totals[key] += value
            self._since_log[key] += value

    def on_train_end(self, args, state, control, **kwargs):
        # Per run, not per step: in multi-task training, steps on tasks without hard negatives (STS) have no scores.
        if self.totals["checked"] == 0 and state.global_step > 0:
            logger.warning(
                "DHNMCallback got no hard-negative scores in %d steps: batch with DHNMDataCollator and train with "
                "InfoNCELoss(record_scores=True) on hard negatives.",
                state.global_step,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        entry = {f"dhnm_{key}": value for key, value in self._since_log.items()}
        logs.update(entry)
        # Trainer.log appended a copy of `logs` to the history just before calling us: put the counts there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entry)
        self._since_log = dict.fromkeys(_COUNT_KEYS, 0)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(
                f"DHNMCallback: expected the Trainer checkpoint at {checkpoint} (hyper-parameter search run folders "
                "are not supported); the DHNM state could not be saved"
            )
        self.save(checkpoint, global_step=state.global_step)

    def replacement_summary(self) -> dict[str, Any]:
        """Totals plus how many replacements were made, how many a later batch carried, and that fraction.

        ``pending`` replacements were made at an example's last visit of the run: no batch carried them.
        """
        made, used = self.totals["replaced"], self.totals["used"]
        return {**self.totals, "pending": made - used, "used_fraction": (used / made) if made else None}

    # ---- persistence ---------------------------------------------------------------------------------------------
    def state_dict(self, global_step: int | None = None) -> dict[str, Any]:
        return {
            "global_step": global_step,
            "thresholds": self.thresholds,
            "totals": self.totals,
            "pool": self.pool.state_dict(),
        }

    def save(self, checkpoint_dir: str | os.PathLike, global_step: int | None = None) -> str:
        """Write ``dhnm_state.npz`` into ``checkpoint_dir``; returns its path.

        An uncompressed ``.npz`` holding the state arrays in their own dtypes and a ``meta`` array with the JSON of
        everything else (step, thresholds, totals, the pool's version, size, ``k`` and fingerprint). It is written
        to a temporary name and renamed, so a crash mid-write never leaves a truncated state behind. At 10M
        examples this is ~0.75 GB written at disk speed (``benchmarks/scale.py``); the JSON of earlier versions took
        minutes.
        """
        state = self.state_dict(global_step)
        pool_state = state.pop("pool")
        arrays = {name: pool_state.pop(name) for name in _STATE_ARRAYS}
        meta = {**state, "pool": pool_state}
        path = os.path.join(checkpoint_dir, DHNM_STATE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        return path

    def load(self, checkpoint_dir: str | os.PathLike, expected_step: int | None = None) -> None:
        """Restore the pools and totals from ``checkpoint_dir/dhnm_state.npz`` (or, for checkpoints of earlier
        versions, ``dhnm_state.json``)."""
        path = os.path.join(checkpoint_dir, DHNM_STATE_NAME)
        legacy = os.path.join(checkpoint_dir, LEGACY_DHNM_STATE_NAME)
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as saved:
                missing = [name for name in ("meta", *_STATE_ARRAYS) if name not in saved.files]
                if missing:
                    raise ValueError(f"{path} is not a DHNM state: it lacks {missing} (has {saved.files})")
                state = json.loads(str(saved["meta"]))
                state["pool"].update({name: saved[name] for name in _STATE_ARRAYS})
            copy = False  # the arrays were just read: adopt them rather than copy
        elif os.path.isfile(legacy):
            path = legacy
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            copy = True
        else:
            raise FileNotFoundError(
                f"no DHNM state at {path}: resuming needs the {DHNM_STATE_NAME} that DHNMCallback writes into each "
                "checkpoint (pass resume_from_checkpoint=<checkpoint folder> to DHNMCallback if it lives elsewhere)"
            )
        if expected_step is not None and state.get("global_step") not in (None, expected_step):
            raise ValueError(
                f"{path} holds the DHNM state of step {state['global_step']}, but training resumes at step "
                f"{expected_step}"
            )
        self.pool.load_state_dict(state["pool"], copy=copy)
        self.totals = {key: int(state.get("totals", {}).get(key, 0)) for key in _COUNT_KEYS}
        if state.get("thresholds") and state["thresholds"] != self.thresholds:
            logger.warning("DHNM thresholds changed on resume: %s -> %s", state["thresholds"], self.thresholds)

    def _resume_path(self, args, state) -> str | None:
        if self.resume_from_checkpoint is not None:
            return self.resume_from_checkpoint
        if state.global_step == 0:
            return None
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for candidate in candidates:
            if any(os.path.isfile(os.path.join(candidate, name)) for name in (DHNM_STATE_NAME, LEGACY_DHNM_STATE_NAME)):
                return candidate
        raise FileNotFoundError(
            f"training resumes at step {state.global_step} but no {DHNM_STATE_NAME} (or {LEGACY_DHNM_STATE_NAME}) was "
            f"found in {candidates}; pass "
            "resume_from_checkpoint=<checkpoint folder> to DHNMCallback"
        )


class FalseNegativeCountCallback(TrainerCallback):
    """Log how many in-batch false negatives :class:`conan_hf.losses.InfoNCELoss` masked.

    ``on_step_end`` pops each InfoNCE loss's count (:meth:`~conan_hf.losses.InfoNCELoss.pop_masked_false_negatives`)
    and sums it over ranks (``all_gather_object``, so every rank holds the same numbers); ``on_log`` adds the count
    since the previous log as ``infonce_false_negatives_masked`` to the training log. :attr:`total` is the running
    total; it is saved as ``false_negatives_state.json`` in each checkpoint and restored on resume (a checkpoint
    without the file, e.g. from an older run, restarts the total at 0 with a warning: it is a statistic only).

    Args:
        losses: the training losses (InfoNCE losses, possibly wrapped in MatryoshkaLoss; others are ignored).
    """

    LOG_KEY = "infonce_false_negatives_masked"

    def __init__(self, losses: Sequence[torch.nn.Module] | torch.nn.Module) -> None:
        losses = [losses] if isinstance(losses, torch.nn.Module) else list(losses)
        self.sources = [m for loss in losses for m in loss.modules() if hasattr(m, "pop_masked_false_negatives")]
        self.total = 0
        self._since_log = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        folder = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else os.path.join(
            args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, FALSE_NEGATIVES_STATE_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.total = int(json.load(f)["total"])
        else:
            logger.warning("no %s in %s: the count of masked false negatives restarts at 0", FALSE_NEGATIVES_STATE_NAME,
                           folder)

    def on_step_end(self, args, state, control, **kwargs):
        local = sum(source.pop_masked_false_negatives() for source in self.sources)
        (counts,) = _all_gather_arrays((np.array([local], dtype=np.int64),))
        self.total += int(counts.sum())
        self._since_log += int(counts.sum())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        logs[self.LOG_KEY] = self._since_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.LOG_KEY] = self._since_log
        self._since_log = 0

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            path = os.path.join(checkpoint, FALSE_NEGATIVES_STATE_NAME)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"global_step": state.global_step, "total": self.total}, f)
            os.replace(path + ".tmp", path)


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _pad(array: np.ndarray, width: int, value: float) -> np.ndarray:
    """Right-pad a 2-D array to ``width`` columns with ``value``."""
    if array.ndim == 1:
        array = array.reshape(-1, 0) if array.size == 0 else array[:, None]
    if array.shape[1] >= width:
        return array
    pad = np.full((array.shape[0], width - array.shape[1]), value, dtype=array.dtype)
    return np.concatenate([array, pad], axis=1)
