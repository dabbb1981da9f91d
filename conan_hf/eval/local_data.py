"""Evaluation data read from local files by :mod:`conan_hf.data.readers` (the readers training uses): same formats,
same ``file:line`` errors.

Each reader returns plain Python data that the task builders of :mod:`conan_hf.eval.tasks` hand to mteb:
:func:`read_sts` / :func:`read_pairs` a :class:`PairData`, :func:`beir_retrieval_data` /
:func:`squad_retrieval_data` a :class:`RetrievalData`, :func:`bitext_sentences` two aligned lists and
:func:`read_labelled` texts with their labels.

Example::

    >>> from conan_hf.eval.local_data import read_sts
    >>> data = read_sts("data/sts/stsb-multi-mt/stsb-en-dev.csv", limit=5)
    >>> len(data.sentence1), data.score[:2]
    (5, [5.0, 4.75])
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conan_hf.data import readers
from conan_hf.data.readers import DataFormatError, OnError, Row, Rows
from conan_hf.errors import (
    DataError,
    DataFileNotFoundError,
    check_score_range,
    finite_float,
    location_of,
)

logger = logging.getLogger(__name__)


def _fail(path: Path, line: int | str | None, message: str, hint: str | None = None) -> DataFormatError:
    """The error for a bad file (``line=None``) or a bad row: ``file:line: message; hint``."""
    return DataFormatError(path, line, message, hint=hint or "fix or remove it")


def _row_error(row: Row, message: str, hint: str | None = None) -> DataFormatError:
    """The error for a bad row read by :mod:`conan_hf.data.readers`, at the row's ``file:line``."""
    path, _, line = (row.location or "").rpartition(":")
    return _fail(Path(path), line, message, hint)


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError("data file not found", where=str(path), hint="check the path")
    return path


def _string(value: Any) -> str:
    """A text column (a ``read_table`` type): numbers and lists are not silently turned into text."""
    if not isinstance(value, str):
        raise TypeError(f"must be a text, got {type(value).__name__}")
    return value


def _pair_label(value: Any) -> float:
    """A pair-classification label (a ``read_table`` type): 0 or 1."""
    if isinstance(value, bool) or str(value).strip() not in {"0", "1"}:
        raise ValueError("a pair label must be 0 or 1")
    return float(str(value).strip())


def _header_fields(path: Path, delimiter: str) -> list[str]:
    """The fields of the first non-empty line: tells header-less files from files with a header (the rows themselves
    are read by :func:`conan_hf.data.readers.read_table`)."""
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    with path.open(encoding="utf-8", newline="") as handle:
        for fields in csv.reader(handle, delimiter=delimiter, quoting=quoting):
            if any(field.strip() for field in fields):
                return [field.strip() for field in fields]
    return []



@dataclass
class PairData:
    """Sentence pairs with a score (STS) or a 0/1 label (pair classification)."""

    sentence1: list[str] = field(default_factory=list)
    sentence2: list[str] = field(default_factory=list)
    score: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.score)

    def add(self, s1: str, s2: str, score: float) -> None:
        self.sentence1.append(s1)
        self.sentence2.append(s2)
        self.score.append(score)


#: The columns of an STS row, as stage 4 reads them (``conan_hf.stages.supervised.task_rows``).
STS_COLUMNS = ("sentence1", "sentence2", "score")

#: Each STS file format as the :func:`~conan_hf.data.readers.read_table` format and column mapping that read it.
STS_FORMATS: dict[str, tuple[str, dict[str, str | int]]] = {
    "stsb": ("csv", {"sentence1": 0, "sentence2": 1, "score": 2}),
    "tsv": ("tsv", {"sentence1": 0, "sentence2": 1, "score": 2}),
    "sick": ("tsv", {"sentence1": "sentence_A", "sentence2": "sentence_B", "score": "relatedness_score"}),
    "jsonl": ("jsonl", {column: column for column in STS_COLUMNS}),
}

#: Column types of an STS or pair row: texts must be strings, scores finite numbers (as in training).
_STS_TYPES = {"sentence1": _string, "sentence2": _string, "score": finite_float}


def infer_sts_format(path: str | Path) -> str:
    """``"jsonl"`` for ``.jsonl`` / ``.ndjson``; ``"stsb"`` for ``.csv``; ``"sick"`` for a TSV whose header names
    ``relatedness_score``; ``"tsv"`` otherwise."""
    path = _check_file(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix.lower() == ".csv":
        return "stsb"
    if "relatedness_score" in _header_fields(path, "\t"):
        return "sick"
    return "tsv"


def _pairs(rows: Rows, score: str, limit: int | None, path: Path) -> PairData:
    data = PairData()
    for row in rows[:limit]:
        data.add(row["sentence1"], row["sentence2"], row[score])
    if not len(data):
        raise _fail(path, None, "no sentence pairs found")
    return data


def read_sts(
    path: str | Path,
    fmt: str | None = None,
    limit: int | None = None,
    columns: dict[str, str | int] | None = None,
    on_error: OnError = "raise",
    score_range: Sequence[float] | None = None,
) -> PairData:
    """Read an STS file (STS-B CSV, SICK TSV, ``s1\\ts2\\tscore`` TSV, or the JSONL / table files training reads)
    into :class:`PairData`, through :func:`conan_hf.data.readers.read_table` (a bad row: ``file:line: column ...``).

    Args:
        path: The file.
        fmt: ``"stsb"``, ``"sick"``, ``"tsv"`` or ``"jsonl"`` (see :data:`STS_FORMATS`); inferred when None.
        limit: Keep only the first ``limit`` pairs (in file order).
        columns: ``{"sentence1": ..., "sentence2": ..., "score": ...}`` naming the file's columns (names, or indices
            of a header-less CSV/TSV), exactly as a stage-4 ``sts`` task's ``columns:``; the format then comes from
            the file's extension (``fmt="jsonl"`` forces JSON lines).
        on_error: ``"raise"`` or ``"skip"`` (bad rows are logged and counted), as for training sources.
        score_range: ``(low, high)``: a score outside it is an error naming its file:line (None: not checked).
    """
    path = _check_file(path)
    fmt = fmt or infer_sts_format(path)
    if fmt not in STS_FORMATS:
        raise ValueError(f"Unknown STS format {fmt!r}; expected one of {sorted(STS_FORMATS)}.")
    table_format: str | None
    if columns is not None:
        missing = [c for c in STS_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: columns= must map {list(STS_COLUMNS)}; missing {missing}")
        table_format, mapping = ("jsonl" if fmt == "jsonl" else None), {c: columns[c] for c in STS_COLUMNS}
    else:
        table_format, mapping = STS_FORMATS[fmt]
    rows = readers.read_table(path, mapping, format=table_format, types=_STS_TYPES,  # type: ignore[arg-type]
                              on_error=on_error)
    if score_range is not None:
        for row in rows[:limit]:
            check_score_range(row["score"], score_range, location_of(row, str(path)), "--score-range LOW HIGH")
    return _pairs(rows, "score", limit, path)


#: Column names of a pair-classification file with a header (PAWS-X).
PAIR_COLUMNS = ("sentence1", "sentence2", "label")


def read_pairs(
    path: str | Path,
    limit: int | None = None,
    columns: dict[str, str | int] | None = None,
    on_error: OnError = "raise",
) -> PairData:
    """Read a pair-classification file through :func:`conan_hf.data.readers.read_table`: ``s1\\ts2\\tlabel``
    (label 0/1), a TSV with the header ``sentence1``/``sentence2``/``label`` (PAWS-X), JSON lines with those keys, or
    any table with a ``columns`` mapping of those three names. Scores of :class:`PairData` hold the 0/1 labels."""
    path = _check_file(path)
    if columns is not None:
        missing = [c for c in PAIR_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: columns= must map {list(PAIR_COLUMNS)}; missing {missing}")
        mapping = {c: columns[c] for c in PAIR_COLUMNS}
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        mapping = {c: c for c in PAIR_COLUMNS}
    elif set(PAIR_COLUMNS) <= set(_header_fields(path, "," if path.suffix.lower() == ".csv" else "\t")):
        mapping = {c: c for c in PAIR_COLUMNS}
    else:
        mapping = {c: i for i, c in enumerate(PAIR_COLUMNS)}
    types = {"sentence1": _string, "sentence2": _string, "label": _pair_label}
    rows = readers.read_table(path, mapping, types=types, on_error=on_error)
    return _pairs(rows, "label", limit, path)


@dataclass
class RetrievalData:
    """A retrieval collection: ``corpus`` id -> {"title", "text"}, ``queries`` id -> text, ``qrels`` query -> doc ->
    graded relevance."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def choose_beir_split(folder: str | Path, split: str | None = None) -> str:
    """The qrels split to evaluate: ``split`` if given, else ``test`` if present, else ``dev``, ``validation``, or the
    only ``qrels/*.tsv`` file."""
    folder = Path(folder)
    for required in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / required).exists():
            raise DataFileNotFoundError(f"not a BEIR folder: {required} is missing", where=str(folder),
                                        hint="a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    available = readers.beir_splits(folder)
    if not available:
        raise DataFileNotFoundError("holds no <split>.tsv qrels file", where=str(folder / "qrels"),
                                    hint="add qrels/test.tsv (query-id, corpus-id, score)")
    if split is None:
        split = next((s for s in ("test", "dev", "validation") if s in available), None)
        if split is None:
            if len(available) > 1:
                raise DataError(f"several qrels splits {available}", where=str(folder),
                                hint="choose one with --split / split=")
            split = available[0]
    if split not in available:
        raise DataError(f"no qrels for split {split!r}", where=str(folder), hint=f"use one of {available}")
    return split


def beir_retrieval_data(
    folder: str | Path,
    split: str | None = None,
    limit_queries: int | None = None,
    limit_corpus: int | None = None,
    on_error: OnError = "raise",
) -> tuple[RetrievalData, str]:
    """A BEIR folder (read by :func:`conan_hf.data.readers.read_beir`) as an evaluation collection. Returns the data and
    the split whose qrels were used.

    Args:
        folder: Folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` (header line optional).
        split: The qrels split; see :func:`choose_beir_split`.
        limit_queries: Keep the first N queries (file order) that have at least one relevant document.
        limit_corpus: Keep every relevant document of the kept queries plus the first documents of the corpus up to
            this many in total (a smaller, still realistic, distractor set for quick runs).
    """
    split = choose_beir_split(folder, split)
    beir = readers.read_beir(folder, split=split, on_error=on_error)
    queries: dict[str, str] = {}
    for qid, text in beir.queries.items():  # file order
        if any(score > 0 for score in beir.qrels.get(qid, {}).values()):
            queries[qid] = text
            if limit_queries is not None and len(queries) >= limit_queries:
                break
    if not queries:
        raise DataError(f"no query of queries.jsonl has a relevant document in qrels/{split}.tsv", where=str(folder),
                        hint="check that the qrels query ids match queries.jsonl")
    qrels = {qid: beir.qrels[qid] for qid in queries}
    relevant = {doc for docs in qrels.values() for doc, score in docs.items() if score > 0}
    corpus: dict[str, dict[str, str]] = {}
    for doc_id, doc in beir.corpus.items():  # file order
        if limit_corpus is None or doc_id in relevant or len(corpus) < limit_corpus:
            corpus[doc_id] = doc
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels), split


def squad_retrieval_data(
    path: str | Path, limit_queries: int | None = None, on_error: OnError = "raise"
) -> RetrievalData:
    """A SQuAD-format file (read by :func:`conan_hf.data.readers.read_squad`) as a retrieval collection: every
    paragraph is a document (id ``"<article>-<paragraph>"``, no title) and each question retrieves its paragraph."""
    rows = readers.read_squad(path, on_error=on_error)
    questions = rows[:limit_queries]
    return RetrievalData(
        corpus={pid: {"title": "", "text": paragraph["text"]} for pid, paragraph in rows.paragraphs.items()},
        queries={row["id"]: row["query"] for row in questions},
        qrels={row["id"]: {row["paragraph_id"]: 1} for row in questions},
    )


def bitext_sentences(path1: str | Path, path2: str | Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """The two sides of a line-aligned bitext (:func:`conan_hf.data.readers.read_bitext`) as two lists."""
    rows = readers.read_bitext(path1, path2, limit=limit)
    return [row["sentence1"] for row in rows], [row["sentence2"] for row in rows]


def tatoeba_files(path: str | Path) -> tuple[Path, Path, str, str]:
    """Resolve a Tatoeba pair from ``.../tatoeba.deu-eng`` (prefix) or one of its two files.

    Returns the two files and their language codes (e.g. ``deu``, ``eng``).
    """
    path = Path(path)
    match = re.search(r"([a-z]{3})-([a-z]{3})(?:\.([a-z]{3}))?$", path.name)
    if not match:
        raise DataError("expected a Tatoeba name like 'tatoeba.deu-eng' or 'tatoeba.deu-eng.deu'", where=str(path),
                        hint="name the file pair after the two languages")
    lang1, lang2 = match.group(1), match.group(2)
    prefix = path.with_name(path.name[: match.end(2)])
    return _check_file(f"{prefix}.{lang1}"), _check_file(f"{prefix}.{lang2}"), lang1, lang2


#: Column names tried, in order, for the text and the label of a labelled CSV file with a header.
TEXT_COLUMNS = ("text", "sentence", "title", "sentence1")
LABEL_COLUMNS = ("label", "category", "class", "labels")


def read_labelled(
    path: str | Path,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> tuple[list[str], list[str]]:
    """Read texts with class labels through :func:`conan_hf.data.readers.read_table`.

    * CSV with a header: the text column is ``text_column`` or the first of ``text``/``sentence``/``title``/
      ``sentence1``; the label column is ``label_column`` or the first of ``label``/``category``/``class``/``labels``.
    * TSV/TXT without header: the last field is the label, the one before it the text (THUCNews ``title\\tlabel``,
      CSL ``task\\ttitle\\tlabel``); integer ``text_column``/``label_column`` pick other fields.
    """
    path = _check_file(path)
    texts: list[str] = []
    labels: list[str] = []
    if path.suffix.lower() == ".csv":
        header = _header_fields(path, ",")
        text_name = header[_column_index(path, header, text_column, TEXT_COLUMNS)]
        label_name = header[_column_index(path, header, label_column, LABEL_COLUMNS)]
        rows = readers.read_table(path, {"text": text_name, "label": label_name}, format="csv", header=True,
                          types={"text": _string}, on_error=on_error)
        for row in rows[:limit]:
            texts.append(row["text"])
            labels.append(row["label"])
    else:
        text_index = -2 if text_column is None else int(text_column)
        label_index = -1 if label_column is None else int(label_column)
        # All fields, so that the label is the *last* field of each row, however many the row has.
        for row in readers.read_table(path, None, format="tsv", header=False, on_error=on_error):
            fields = list(row.values())
            needed = max([2, *(i + 1 for i in (text_index, label_index) if i >= 0)])
            if len(fields) < needed:
                if on_error == "skip":
                    logger.warning("%s: skipped a row with %d field(s), %d needed", row.location, len(fields), needed)
                    continue
                raise _row_error(row, f"expected at least {needed} tab-separated fields '...<TAB>text<TAB>label', "
                                      f"got {len(fields)}")
            texts.append(fields[text_index])
            labels.append(fields[label_index].strip())
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise _fail(path, None, "no labelled rows found")
    return texts, labels


def _column_index(path: Path, header: list[str], wanted: str | int | None, candidates: Sequence[str]) -> int:
    if isinstance(wanted, int):
        if not 0 <= wanted < len(header):
            raise _fail(path, 1, f"column index {wanted} is out of range for the header {header}")
        return wanted
    names = [wanted] if wanted else list(candidates)
    for name in names:
        if name in header:
            return header.index(name)
    raise _fail(path, 1, f"header {header} has none of the columns {names}")


__all__ = ["LABEL_COLUMNS", "PAIR_COLUMNS", "STS_COLUMNS", "STS_FORMATS", "TEXT_COLUMNS", "DataFormatError",
           "PairData", "RetrievalData", "beir_retrieval_data", "bitext_sentences", "choose_beir_split",
           "infer_sts_format", "read_labelled", "read_pairs", "read_sts", "squad_retrieval_data", "tatoeba_files"]
