"""Readers for local training and evaluation data: SQuAD/XQuAD JSON, BEIR folders, JSONL/CSV/TSV with a column mapping.

Every reader returns a :class:`Rows` list of :class:`Row` dicts; each row remembers where it was read
(``row.location``: ``"file:line"`` with the 1-based line of JSONL files and the physical line of CSV/TSV files, header
included; the JSON position for nested JSON), so later checks (training stages, the CLR builder) can name it.
A malformed row raises :class:`DataFormatError` naming the file and the line; with ``on_error="skip"`` it is left out
instead, and recorded in ``rows.skipped`` (file, line, reason) with a logged count — rows are never dropped silently.

Example::

    >>> from conan_hf.data.readers import read_table, read_beir, beir_pairs
    >>> rows = read_table("stsb-en-dev.csv", columns={"sentence1": 0, "sentence2": 1, "score": 2},
    ...                   types={"score": float})  # doctest: +SKIP
    >>> rows = read_table("simclue_train_rank_1w.json", columns={"query": "query", "positive": "title",
    ...                   "negative": "neg_title"})  # doctest: +SKIP
    >>> pairs = beir_pairs(read_beir("retrieval/scifact", split="train"))  # doctest: +SKIP
    >>> pairs[0].keys()  # doctest: +SKIP
    dict_keys(['id', 'query', 'positive', 'positive_id', 'score'])
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError, DataFileNotFoundError

from .corpora import (
    QRELS_HEADER,
    BeirData,
    SquadRows,
    beir_pairs,
    beir_splits,
    read_beir,
    read_beir_corpus,
    read_bitext,
    read_qrels,
    read_squad,
    read_stsb_multi_mt,
)
from .tables import (
    COMPRESSED_SUFFIXES,
    TABLE_FORMATS,
    DataFormatError,
    OnError,
    Row,
    Rows,
    iter_table,
    open_text,
    read_table,
)
from .tables import splittable as splittable

__all__ = [
    "COMPRESSED_SUFFIXES",
    "QRELS_HEADER",
    "TABLE_FORMATS",
    "BeirData",
    "DataFormatError",
    "Row",
    "Rows",
    "SquadRows",
    "beir_pairs",
    "beir_splits",
    "load_rows",
    "read_beir",
    "read_beir_corpus",
    "read_bitext",
    "read_qrels",
    "read_squad",
    "read_stsb_multi_mt",
    "iter_table",
    "open_text",
    "read_table",
]


def load_rows(
    source: str | os.PathLike,
    columns: Mapping[str, str | int] | None = None,
    *,
    split: str = "train",
    on_error: OnError = "raise",
    **kwargs: Any,
) -> Rows:
    """Rows from a BEIR folder, a SQuAD JSON file, a JSONL/JSON/CSV/TSV file, or a Hugging Face Hub dataset name.

    Args:
        source: a BEIR folder (with ``corpus.jsonl``), a SQuAD JSON file, a table file, or a Hub dataset name (a
            path that looks local is never looked up on the Hub).
        columns: ``{wanted: source column}`` renames and selects columns (see :func:`read_table`; for Hub datasets
            only names are allowed).
        split: the BEIR qrels file (``qrels/{split}.tsv``) or the Hub split.
        on_error: ``"raise"`` (a bad row raises :class:`DataFormatError` at its ``file:line``) or ``"skip"``.
        **kwargs: further :func:`read_table` options for table files.

    Returns:
        :class:`Rows` of :class:`Row` dicts, each with its ``location``.
    """
    path = Path(source)
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return _rename(beir_pairs(read_beir(path, split=split, on_error=on_error)), columns)
        raise DataError("a folder but not a BEIR dataset (no corpus.jsonl)", where=str(path),
                        hint="give a data file, or a BEIR folder with corpus.jsonl, queries.jsonl and qrels/")
    if path.is_file():
        if path.suffix.lower() == ".json" and _is_squad(path):
            return _rename(read_squad(path, on_error=on_error), columns)
        return read_table(path, columns, on_error=on_error, **kwargs)
    if not _HUB_NAME.match(str(source)) or path.suffix.lower() in _FILE_SUFFIXES:
        raise DataFileNotFoundError("no such file or folder", where=str(source), hint="check the path")
    from datasets import load_dataset

    dataset = load_dataset(str(source), split=split)
    rows = [Row(r, f"{source} (Hub dataset, split {split}) row {index}") for index, r in enumerate(dataset, 1)]
    return _rename(Rows(rows), columns)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = {".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".txt", ".tab", ".parquet", ".pq", ".gz"}


def _is_squad(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as handle:  # only looks for two keys
        head = handle.read(4096)
    return '"data"' in head and '"paragraphs"' in head


def _rename(rows: Rows, columns: Mapping[str, str | int] | None) -> Rows:
    if not columns:
        return rows
    renamed = []
    for row in rows:
        missing = [src for src in columns.values() if src not in row]
        if missing:
            raise DataError(f"no column(s) {missing}; the row has {sorted(row)}", where=getattr(row, "location", None),
                            hint="fix the column mapping (`columns: {wanted: source column}`)")
        renamed.append(Row({name: row[src] for name, src in columns.items()}, getattr(row, "location", None)))
    return Rows(renamed, rows.skipped)
