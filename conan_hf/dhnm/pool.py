"""The DHNM pool state (Conan-Embedding-v2 §3.4): per example a ranked candidate pool, ``k`` active hard negatives
with their scores ``S_0`` at activation, and eq. 6 (:func:`dhnm_should_replace`) to replace those that became easy.

:class:`NegativePool` holds the state and applies the scores a loss computed (:meth:`NegativePool.apply_scores`);
:class:`~conan_hf.dhnm.collator.DHNMDataCollator` reads it to fill each batch's negatives and
:class:`~conan_hf.dhnm.callback.DHNMCallback` feeds it the scores after every step (overview: :mod:`conan_hf.dhnm`).
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from .score_scale import rescale_scores
from .state import NegativePoolStateMixin
from .table import CandidateTexts, ExampleIndex, TextTable

__all__ = ["COUNT_KEYS", "NegativePool", "dhnm_should_replace"]

#: The counts :meth:`NegativePool.apply_scores` returns (and :class:`~conan_hf.dhnm.callback.DHNMCallback` logs).
#: ``replaced`` and ``used`` are also split by the clause of eq. 6 that made the replacement: ``_low_s0``
#: (``S_0 < s0_min``) and ``_easy`` (``drop_ratio * S < S_0`` and ``S < s_max``, with ``S_0 >= s0_min``).
COUNT_KEYS = ("checked", "replaced", "used", "pool_exhausted", "nan_scores", "stale",
              "replaced_low_s0", "replaced_easy", "used_low_s0", "used_easy")


def dhnm_should_replace(s0: Any, s: Any, s0_min: float = 0.4, drop_ratio: float = 1.2, s_max: float = 0.7,
                        score_baseline: float = 0.0) -> Any:
    r"""Eq. 6 of the paper: whether an active hard negative is replaced.

    .. math:: \text{replace} \iff S_0 < 0.4 \;\lor\; (1.2\,S_i < S_0 \land S_i < 0.7)

    ``S_0`` is the query–negative cosine score when the negative entered the active set and ``S_i`` its score now.
    A negative that was never hard (``S_0 < s0_min``) is dropped; a negative is also dropped once its score has
    fallen by more than the factor ``drop_ratio`` *and* is below ``s_max`` (it has become easy). This implements
    the equation on the signed cosine scores; the paper's prose mentions absolute values, which the equation does
    not use (a negative score satisfies ``S < 0.7``, and ``S_0 < 0`` already triggers the first clause).

    ``score_baseline`` b (opt-in, default 0 = the paper's rule) applies the rule to the rescaled scores
    ``(S - b) / (1 - b)`` instead, for models whose cosines bunch near 1: with b the typical cosine of *unrelated*
    texts, an unrelated pair scores about 0 and an identical one 1 after rescaling, the scale eq. 6's thresholds
    assume (see ``docs/dhnm.md``).

    Vectorised and pure: ``s0`` and ``s`` are scalars, numpy arrays or torch tensors (broadcast together); the
    result is a boolean array/tensor of the same kind. **NaN**: every comparison with NaN is false, so a NaN in
    either score means *keep* (no decision is made from a missing or broken score).

    Args:
        s0: score(s) when the negative entered the active set.
        s: current score(s).
        s0_min: first threshold (0.4 in the paper).
        drop_ratio: relative drop factor (1.2 in the paper).
        s_max: upper bound on the current score for the drop clause (0.7 in the paper).
        score_baseline: b in [0, 1): the cosine taken as "unrelated" (0: the paper's rule, unchanged).

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
    if score_baseline:
        s0, s = rescale_scores(s0, score_baseline), rescale_scores(s, score_baseline)
    return (s0 < s0_min) | ((drop_ratio * s < s0) & (s < s_max))



class NegativePool(NegativePoolStateMixin):
    """Per-example state of DHNM: a ranked candidate pool, ``k`` active negatives, their ``S_0`` and a cursor.

    Candidates are identified by their rank in the example's pool (``0`` = the hardest); these ranks are the
    *negative ids* the collator passes to the loss. Initially the first ``min(k, len(pool))`` candidates are active
    and the cursor points at the next unused one.

    **The pools are row ids, not texts.** ``candidate_ids`` is a ``(num_examples, max_pool_size)`` integer array
    (``int64``; an ``int32`` array given to :meth:`from_ids` is kept as is), ``candidate_ids[e, r]`` the row of the
    ``r``-th candidate of example ``e`` in a *text table*, ``-1`` after the last candidate. The text table is a
    ``datasets.Dataset`` column or a ``pyarrow`` string array — memory-mapped when it comes from
    ``Dataset.load_from_disk`` / ``Dataset.from_file`` (a corpus, or the table stage 4 writes) — and texts are only
    looked up for the rows of a batch (:meth:`negative_texts`, used by
    :class:`~conan_hf.dhnm.collator.DHNMDataCollator`). ``candidate_ids`` may itself be memory-mapped (``np.load(path,
    mmap_mode="r")``): the pool never writes to it, and only the collator reads it, one batch of rows at a time. Build a
    pool with:

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
        self._setup(ids, candidate_ids, TextTable(texts), k, validate=False)

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
        table = TextTable(texts, text_column)
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

    def _setup(self, ids: list | None, candidate_ids: np.ndarray, texts: TextTable, k: int, validate: bool) -> None:
        self.k = k
        self.ids = ids
        self._num_examples = int(candidate_ids.shape[0])
        self.candidate_ids = candidate_ids
        self._texts = texts
        self._fingerprint = None
        self._index = ExampleIndex(ids, self._num_examples)
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
        # Sorted keys ``row * k + slot`` of the fresh slots whose replacement the "became easy" clause made (the
        # others were made by the S0 clause): grows with the replacements not yet carried, not with the pools.
        self.easy_keys = np.zeros(0, dtype=np.int64)
        #: Pool rows that received a replacement in the last :meth:`apply_scores` call (sorted).
        self.replaced_rows = np.zeros(0, dtype=np.int64)

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

    def _lookup(self, example_id: Hashable) -> int:
        """Row of ``example_id`` or -1."""
        return self._index.lookup(example_id)

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
        index (:class:`~conan_hf.dhnm.table.ExampleIndex`: int64 hashes and int32 rows, none when keyed by row
        index; 75 + 12 = 87 bytes per example at ``k = 7`` with an index, 75 without)."""
        return self.state_nbytes() + self._index.nbytes

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
        score_baseline: float = 0.0,
    ) -> dict[str, int]:
        """Judge scored active negatives with :func:`dhnm_should_replace` and advance the pools.

        Args:
            example_rows: ``(n,)`` pool rows of the scored examples (one entry per row of ``negative_ids``).
            negative_ids: ``(n, m)`` candidate ranks that were scored; ``-1`` entries are ignored.
            scores: ``(n, m)`` their query–negative cosine scores.
            s0_min / drop_ratio / s_max: the thresholds of eq. 6.
            score_baseline: opt-in rescaling of the scores before eq. 6 (see :func:`dhnm_should_replace`).

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
            NaN scores) and ``stale``; ``replaced`` and ``used`` split by the clause that made the replacement
            (``replaced_low_s0`` / ``replaced_easy``, ``used_low_s0`` / ``used_easy``, see :data:`COUNT_KEYS`).
            The rows that received a replacement are left in :attr:`replaced_rows` (read by
            :class:`~conan_hf.dhnm.requeue.RequeueSchedule`).
        """
        self.replaced_rows = np.zeros(0, dtype=np.int64)
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
        counts = dict.fromkeys(COUNT_KEYS, 0)
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
        used_easy = self._pop_easy(carried_rows[used].astype(np.int64) * self.k + carried_slots[used])
        counts["used_easy"] = used_easy
        counts["used_low_s0"] = counts["used"] - used_easy
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
        replace = dhnm_should_replace(s0, vals, s0_min=s0_min, drop_ratio=drop_ratio, s_max=s_max,
                                      score_baseline=score_baseline)
        # Of the replaced: made by the "became easy" clause (eq. 6 checks S0 < s0_min first).
        easy = ~(rescale_scores(s0, score_baseline) < s0_min)

        r_rows, r_slots, r_easy = rows[replace], slots[replace], easy[replace]
        order = np.argsort(r_rows, kind="stable")
        r_rows, r_slots, r_easy = r_rows[order], r_slots[order], r_easy[order]
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
        counts["replaced_easy"] = int((ok & r_easy).sum())
        counts["replaced_low_s0"] = counts["replaced"] - counts["replaced_easy"]
        counts["pool_exhausted"] = int((~ok).sum())
        new_easy = r_rows[ok & r_easy].astype(np.int64) * self.k + r_slots[ok & r_easy]
        if new_easy.size:
            self.easy_keys = np.union1d(self.easy_keys, new_easy)
        self.replaced_rows = np.unique(r_rows[ok]).astype(np.int64)
        return counts

    def _pop_easy(self, keys: np.ndarray) -> int:
        """Remove ``keys`` (``row * k + slot`` of replacements now carried) from :attr:`easy_keys`; returns how many
        were there (O(fresh easy replacements), nothing when there are none)."""
        if not self.easy_keys.size or not keys.size:
            return 0
        position = np.searchsorted(self.easy_keys, keys)
        hit = position < self.easy_keys.size
        hit[hit] = self.easy_keys[position[hit]] == keys[hit]
        if hit.any():
            self.easy_keys = np.delete(self.easy_keys, position[hit])
        return int(hit.sum())


def _check_k(k: Any) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (active negatives per example) must be a positive integer, got {k!r}")
