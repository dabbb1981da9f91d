"""The CLR builder's source rows: :class:`RowStream` (a file or dataset read lazily) and the two-pass scan that
counts the rows and checks them (non-empty query and positive, unique ids) before anything is translated."""

from __future__ import annotations

import itertools
import os
import pickle
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, location_of
from .sources import LOCATION

__all__ = ["RowStream"]


class RowStream:
    """The rows of a data file or dataset, read lazily each time it is iterated (the builder reads its source twice).

    Data files (JSONL, JSON, CSV, TSV, Parquet, optionally ``.gz``) are read row by row by
    :func:`conan_hf.data.readers.iter_table`, with its column mapping and checks: every row carries its ``file:line``
    and a bad line raises :class:`~conan_hf.data.readers.DataFormatError` naming it; memory does not depend on the
    file's size (JSON arrays excepted: they are parsed whole). SQuAD JSON files, BEIR folders and Hub names are read
    by :func:`~conan_hf.data.readers.load_rows`, which holds them in memory (they are evaluation-sized). A streamed
    ``datasets.IterableDataset`` from :func:`conan_hf.data.sources.load_sources` can be given to the builder directly.

    Args:
        source: a path or Hub dataset name.
        columns: ``{output_name: source_column}`` as in :func:`~conan_hf.data.readers.read_table`.
        split: BEIR qrels split / Hub split.
        limit: stop after this many rows.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        columns: Mapping[str, str | int] | None = None,
        *,
        split: str = "train",
        limit: int | None = None,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.source, self.columns, self.split, self.limit = source, columns, split, limit

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self._rows()
        return itertools.islice(rows, self.limit) if self.limit is not None else rows

    def __str__(self) -> str:
        return str(self.source)

    def _rows(self) -> Iterator[dict[str, Any]]:
        from .readers import _is_squad, iter_table, load_rows

        path = Path(self.source)
        if path.is_file() and not (path.suffix.lower() == ".json" and _is_squad(path)):
            yield from iter_table(path, self.columns)
        else:
            yield from load_rows(self.source, self.columns, split=self.split)


class _TwoPassSource:
    """Reads the builder's source twice: once to count and check the rows, once to translate them.

    A source that can be iterated again (a list, a ``datasets.Dataset`` or ``IterableDataset``, a :class:`RowStream`)
    is; a one-shot iterator (a generator) is spooled to a temporary file during the first pass, pickled in chunks.
    """

    SPOOL_CHUNK = 1000

    def __init__(self, source: Any, work_dir: str | os.PathLike | None) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = RowStream(source)
        self.source = source
        self.one_shot = iter(source) is source
        self.work_dir = work_dir
        self._spool: Any = None

    def first_pass(self) -> Iterator[Mapping[str, Any]]:
        if not self.one_shot:
            yield from self.source
            return
        self._spool = tempfile.TemporaryFile(dir=self.work_dir, prefix="clr-spool-")
        chunk: list[Any] = []
        for row in self.source:
            chunk.append(row)
            yield row
            if len(chunk) == self.SPOOL_CHUNK:
                pickle.dump(chunk, self._spool, protocol=pickle.HIGHEST_PROTOCOL)
                chunk = []
        if chunk:
            pickle.dump(chunk, self._spool, protocol=pickle.HIGHEST_PROTOCOL)

    def again(self) -> Iterator[Mapping[str, Any]]:
        if not self.one_shot:
            yield from self.source
            return
        self._spool.seek(0)
        while True:
            try:
                chunk = pickle.load(self._spool)
            except EOFError:
                return
            yield from chunk

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


@dataclass(frozen=True)
class _Columns:
    query: str
    positive: str
    negatives: str
    id: str


def _where(row: Mapping[str, Any], fallback: str | None = None) -> str | None:
    """Where a row was read: a reader :class:`~conan_hf.data.readers.Row`'s location, or the data layer's
    :data:`~conan_hf.data.sources.LOCATION` column."""
    return location_of(row) or row.get(LOCATION) or fallback


def _row_id(row: Mapping[str, Any], index: int, columns: _Columns) -> str:
    """The row's id; rows without one get their 0-based position."""
    return str(row[columns.id]) if columns.id in row else str(index)


def _check_row(row: Mapping[str, Any], index: int, columns: _Columns) -> None:
    for column in (columns.query, columns.positive):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            got = "nothing" if value is None or value == "" else f"{type(value).__name__} {value!r}"
            where = _where(row)  # file:line of rows read from a file; in-memory rows: their index
            raise DataError(f"{'' if where else f'source row {index} '}has no text in column {column!r} (got "
                            f"{got}; the row has {sorted(row)})", where=where,
                            hint="give every row a non-empty text there, or map another column")


def _scan_source(source: _TwoPassSource, columns: _Columns) -> tuple[int, bool]:
    """First pass: check every row, refuse duplicate ids; ``(number of rows, whether any row has negatives)``.

    Ids are compared by their 64-bit ``hash`` (8 bytes per row, not the id texts); rows whose hashes collide are
    compared by their ids in a second look at the source, which also finds the row to name in the error.
    """
    import numpy as np

    hashes = array("q")
    has_negatives = False
    num_rows = 0
    for index, row in enumerate(source.first_pass()):
        _check_row(row, index, columns)
        hashes.append(hash(_row_id(row, index, columns)))
        has_negatives = has_negatives or columns.negatives in row
        num_rows += 1
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64)) if num_rows else np.empty(0, np.int64)
    del hashes
    suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    del ordered
    if suspects:
        occurrences: dict[str, list[Any]] = {}  # id -> [count, second index, second row]; first-appearance order
        for index, row in enumerate(source.again()):
            row_id = _row_id(row, index, columns)
            if hash(row_id) in suspects:
                entry = occurrences.setdefault(row_id, [0, None, None])
                entry[0] += 1
                if entry[0] == 2:
                    entry[1], entry[2] = index, row
        for row_id, (count, second, row) in occurrences.items():
            if count > 1:
                raise DataError(f"duplicate id {row_id!r} in column {columns.id!r}",
                                where=_where(row, f"source row {second}"),
                                hint="ids must be unique: fix the ids or leave the column out "
                                "(row positions become ids)")
    return num_rows, has_negatives


def _batches(rows: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
