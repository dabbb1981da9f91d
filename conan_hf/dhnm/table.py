"""The lookup tables of a :class:`~conan_hf.dhnm.pool.NegativePool`: the text table its candidate ids point into
(:class:`TextTable`, viewed per example as texts by :class:`CandidateTexts`) and the index from example ids to pool
rows (:class:`ExampleIndex`).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .pool import NegativePool

__all__ = ["CandidateTexts", "ExampleIndex", "TextTable"]


class CandidateTexts(Sequence):
    """Read-only sequence view of a :class:`~conan_hf.dhnm.pool.NegativePool`'s pools as lists of texts
    (``pool.candidates``).

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


class TextTable:
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


class ExampleIndex:
    """Example id -> pool row, as sorted hashes (8 B) and their rows (4 B) per example instead of a dict (~100 B).

    ``hash()`` is per process (string hashing is salted), which is all an in-memory index needs. Equal ids have
    equal hashes, so duplicates are found among equal hashes; distinct ids whose hashes collide (rare) are kept in
    the small dict ``collided``. ``ids=None`` keys the examples by their row index ``0 .. num_examples - 1`` (no
    index at all).

    Args:
        ids: one hashable id per example (kept by reference), or ``None``.
        num_examples: number of examples (rows).

    Raises:
        ValueError: duplicated ids (named with their rows).
        TypeError: an unhashable id.

    Example:
        >>> index = ExampleIndex(["a", "b"], 2)
        >>> index.lookup("b"), index.lookup("c")
        (1, -1)
    """

    def __init__(self, ids: list | None, num_examples: int) -> None:
        self.ids = ids
        self._num_examples = num_examples
        self.collided: dict[Hashable, int] = {}
        if ids is None:
            self.sorted_keys = np.zeros(0, dtype=np.int64)
            self.key_rows = np.zeros(0, dtype=np.int32)
            return
        try:
            keys = np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))
        except TypeError:
            row = next(r for r, i in enumerate(ids) if not _is_hashable(i))
            raise TypeError(f"example ids must be hashable; row {row} has id {ids[row]!r}") from None
        order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[order]
        del keys
        self.key_rows = order.astype(np.int32 if len(ids) < np.iinfo(np.int32).max else np.int64)
        del order
        duplicates: dict[Hashable, list[int]] = {}
        same = np.flatnonzero(self.sorted_keys[1:] == self.sorted_keys[:-1])
        if same.size:
            group_starts = same[np.r_[True, np.diff(same) != 1]]  # first index of each run of equal keys
            for start in group_starts:
                stop = start + 1
                while stop < len(self.sorted_keys) and self.sorted_keys[stop] == self.sorted_keys[start]:
                    stop += 1
                seen: dict[Hashable, int] = {}
                for row in sorted(int(r) for r in self.key_rows[start:stop]):
                    first = seen.setdefault(ids[row], row)
                    if first != row:
                        duplicates.setdefault(ids[row], [first]).append(row)
                if len(seen) > 1:  # a hash collision between different ids
                    self.collided.update(seen)
        if duplicates:
            ordered = sorted(duplicates.items(), key=lambda item: item[1][0])
            shown = "; ".join(f"{i!r} at rows {rows}" for i, rows in ordered[:5])
            raise ValueError(
                f"example ids must be unique, found {len(duplicates)} duplicated id(s): {shown}. DHNM keeps one pool "
                "per id, so duplicated rows would share (and fight over) one set of negatives; give each row its "
                "own id or deduplicate the data."
            )

    @property
    def nbytes(self) -> int:
        """Bytes of the index arrays (12 per example; 0 when keyed by row index)."""
        return self.sorted_keys.nbytes + self.key_rows.nbytes

    def lookup(self, example_id: Hashable) -> int:
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
        if self.collided and example_id in self.collided:
            return self.collided[example_id]
        position = int(np.searchsorted(self.sorted_keys, key))
        if position < len(self.sorted_keys) and self.sorted_keys[position] == key:
            row = int(self.key_rows[position])
            if self.ids[row] == example_id:
                return row
        return -1


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
