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

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from conan_hf.errors import DataError, DataFileNotFoundError, finite_float

logger = logging.getLogger(__name__)

__all__ = [
    "QRELS_HEADER",
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
    "read_table",
]

OnError = Literal["raise", "skip"]


class DataFormatError(DataError):
    """A data file holds a row that cannot be read; the message starts with ``file:line`` (just ``file`` when the
    problem is the whole file, ``line=None``)."""

    def __init__(self, path: str | os.PathLike, line: int | str | None, message: str, hint: str | None = None) -> None:
        self.path, self.line = str(path), line
        super().__init__(message, where=str(path) if line is None else f"{path}:{line}", hint=hint)


class Row(dict):
    """A data row: a plain dict plus ``location``, where it was read (``"file:line"``, ``"demo row 3"``, ...)."""

    def __init__(self, data: Any = (), location: str | None = None) -> None:
        super().__init__(data)
        self.location = location

    def copy(self) -> Row:
        return Row(self, self.location)


class Rows(list):
    """A list of row dicts, plus ``skipped``: ``(file, line, reason)`` for every bad row left out."""

    def __init__(self, rows: Iterable[dict] = (), skipped: Iterable[tuple[str, int | str, str]] = ()) -> None:
        super().__init__(rows)
        self.skipped: list[tuple[str, int | str, str]] = list(skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class _ErrorPolicy:
    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[tuple[str, int | str, str]] = []

    def bad(self, path: Path, line: int | str, message: str) -> None:
        if self.on_error == "raise":
            raise DataFormatError(path, line, message)
        self.skipped.append((str(path), line, message))

    def finish(self, rows: list[dict], what: str, kept: int | None = None) -> Rows:
        if self.skipped:
            first = self.skipped[0]
            logger.warning(
                "%s: skipped %d bad row(s), kept %d (first: %s:%s: %s)",
                what, len(self.skipped), len(rows) if kept is None else kept, first[0], first[1], first[2],
            )  # fmt: skip
        return Rows(rows, self.skipped)


COMPRESSED_SUFFIXES = (".gz",)
TABLE_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


def _format_suffix(path: Path) -> str:
    """The extension that names the format: ``.jsonl`` for ``x.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def open_text(path: Path, encoding: str = "utf-8", newline: str | None = None):
    """Open a (possibly gzip-compressed) text file for reading."""
    if path.suffix.lower() == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding=encoding, newline=newline)
    return path.open(encoding=encoding, newline=newline)


def undecodable(path: Path, encoding: str, error: UnicodeDecodeError) -> DataFormatError:
    """The `DataFormatError` for a file that is not ``encoding`` text: ``file:line`` of the first line that does not
    decode (found by reading the file again as bytes), the bad byte and its column."""
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as bad:
                byte = raw[bad.start:bad.start + 1].hex()
                return DataFormatError(path, line_no, f"not {encoding} text (byte 0x{byte} at column {bad.start + 1})",
                                       hint=f"convert the file to {encoding}, e.g. `iconv -f latin1 -t utf-8`")
    return DataFormatError(path, None, f"not {encoding} text ({error.reason})",
                           hint=f"convert the file to {encoding}")


def invalid_json(path: Path, error: json.JSONDecodeError, line: int | None = None) -> DataFormatError:
    """The `DataFormatError` of a JSON syntax error: Python's line (or ``line``, the file line of a JSON-lines record)
    and column."""
    return DataFormatError(path, line or error.lineno, f"invalid JSON ({error.msg} at column {error.colno})")


def _detect_format(path: Path) -> str:
    suffix = _format_suffix(path)
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        # Many ".json" files are JSON lines (e.g. SimCLUE). The first line tells them apart without reading the file:
        # JSON lines start with a complete object on line one; a JSON array or a pretty-printed object does not.
        with open_text(path) as handle:
            first = ""
            try:
                for first in handle:
                    if first.strip():
                        break
            except UnicodeDecodeError as error:
                raise undecodable(path, "utf-8", error) from None
        first = first.strip()
        if first.startswith("{"):
            try:
                json.loads(first)
            except json.JSONDecodeError:
                return "json"
            return "jsonl"
        return "json"
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".txt", ".tab"):
        return "tsv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataFormatError(path, None, f"cannot tell the format from the extension {suffix!r}",
                          hint="name it .jsonl/.json/.csv/.tsv/.parquet (optionally .gz) or pass format: "
                               "jsonl|json|csv|tsv|parquet")


def splittable(path: Path, fmt: str) -> bool:
    """Whether byte ranges of the file can be read independently (one record per physical line, uncompressed)."""
    return fmt in ("jsonl", "tsv") and path.suffix.lower() not in COMPRESSED_SUFFIXES


def _lines_before(path: Path, offset: int) -> int:
    """Line breaks in the first ``offset`` bytes (counted, not parsed), so a byte range knows its 1-based lines."""
    count, left = 0, offset
    with path.open("rb") as handle:
        while left > 0:
            chunk = handle.read(min(left, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


def _iter_lines(path: Path, encoding: str, byte_range: tuple[int, int] | None):
    """Yield ``(line_no, text)`` for the physical lines of the file, or of those starting inside ``byte_range``."""
    if byte_range is None:
        with open_text(path, encoding=encoding) as handle:
            yield from enumerate(handle, 1)
        return
    start, end = byte_range
    with path.open("rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                handle.readline()  # this line started before the range: the previous range owns it
        position = handle.tell()
        line_no = None
        while position < end:
            raw = handle.readline()
            if not raw:
                break
            if line_no is None:
                line_no = _lines_before(path, position) + 1
            else:
                line_no += 1
            position += len(raw)
            yield line_no, raw.decode(encoding)


def _iter_records(path: Path, fmt: str, header: bool, delimiter: str | None, policy: _ErrorPolicy, encoding: str,
                  byte_range: tuple[int, int] | None = None):
    """Yield ``(line, record)``; record is a dict (named columns) or a list (positional columns). ``byte_range``
    (JSONL/TSV only) reads just the lines that start inside it, with their true line numbers."""
    if fmt == "jsonl":
        for line_no, line in _iter_lines(path, encoding, byte_range):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                policy.bad(path, line_no, invalid_json(path, err, line_no).reason)
                continue
            if not isinstance(record, dict):
                policy.bad(path, line_no, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record
    elif fmt == "json":
        with open_text(path, encoding=encoding) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise invalid_json(path, err) from None
        if isinstance(data, dict) and "data" in data:
            raise DataFormatError(path, None, "SQuAD-format JSON, not a table of rows",
                                  hint="read it with read_squad() (load_rows does so for SQuAD files)")
        if not isinstance(data, list):
            raise DataFormatError(path, 1, "expected a JSON array of objects (or JSON lines)")
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                policy.bad(path, f"[{index}]", f"expected a JSON object, got {type(record).__name__}")
                continue
            yield f"[{index}]", record
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield f"row {number}", record
    elif fmt == "tsv" and byte_range is not None:
        delimiter = delimiter or "\t"
        names = None
        if header:
            with path.open("rb") as handle:
                names = [v.strip() for v in handle.readline().decode(encoding).rstrip("\r\n").split(delimiter)]
        for line_no, line in _iter_lines(path, encoding, byte_range):
            values = line.rstrip("\r\n").split(delimiter)
            if line_no == 1 and header or not line.strip():
                continue
            if names is not None:
                if len(values) != len(names):
                    policy.bad(path, line_no, f"expected {len(names)} fields ({', '.join(names)}), got {len(values)}")
                    continue
                yield line_no, dict(zip(names, values))
            else:
                yield line_no, values
    elif fmt in ("csv", "tsv"):
        delimiter = delimiter or ("," if fmt == "csv" else "\t")
        # TSV files from NLP corpora contain stray quote characters that are text, not quoting.
        quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
        with open_text(path, encoding=encoding, newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
            names: list[str] | None = None
            line_no = 1
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    policy.bad(path, line_no, f"unreadable CSV ({err})")
                    line_no = reader.line_num + 1
                    continue
                start, line_no = line_no, reader.line_num + 1
                if not values or all(not v.strip() for v in values):
                    continue
                if header and names is None:
                    names = [v.strip() for v in values]
                    continue
                if names is not None:
                    if len(values) != len(names):
                        policy.bad(path, start, f"expected {len(names)} fields ({', '.join(names)}), got {len(values)}")
                        continue
                    yield start, dict(zip(names, values))
                else:
                    yield start, values
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(TABLE_FORMATS)}")


def _decoded(records: Iterator[Any], path: Path, encoding: str) -> Iterator[Any]:
    """``records``, with a `UnicodeDecodeError` of the file reported as :func:`undecodable` (file:line)."""
    try:
        yield from records
    except UnicodeDecodeError as error:
        raise undecodable(path, encoding, error) from None


def iter_table(
    path: str | os.PathLike,
    columns: Mapping[str, str | int] | None = None,
    *,
    format: Literal["jsonl", "json", "csv", "tsv", "parquet"] | None = None,
    header: bool | None = None,
    delimiter: str | None = None,
    types: Mapping[str, Callable[[Any], Any]] | None = None,
    allow_empty: Iterable[str] = (),
    on_error: OnError = "raise",
    encoding: str = "utf-8",
    byte_range: tuple[int, int] | None = None,
    policy: _ErrorPolicy | None = None,
) -> Iterator[Row]:
    """The rows of :func:`read_table`, one at a time (memory does not grow with the file). ``byte_range`` reads only
    the lines starting inside it (JSONL/TSV; see :func:`splittable`); ``policy`` collects skipped rows."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such data file", where=str(path), hint="check the path")
    fmt = format or _detect_format(path)
    positional = columns is not None and any(isinstance(v, int) for v in columns.values())
    if header is None:
        header = not positional
    if positional and fmt in ("json", "jsonl", "parquet"):
        raise DataError("integer column indices only apply to header-less CSV/TSV files", where=str(path),
                        hint="map JSON/Parquet columns by name")
    types = dict(types or {})
    allow_empty = set(allow_empty)
    unknown = set(types) - set(columns or types)
    if columns is not None and unknown:
        raise ValueError(f"types given for columns not in the mapping: {sorted(unknown)}")
    policy = policy or _ErrorPolicy(on_error)
    location = f"{path}:" if fmt != "parquet" else f"{path} "
    for line, record in _decoded(_iter_records(path, fmt, header, delimiter, policy, encoding, byte_range), path,
                                 encoding):
        if isinstance(record, list):
            mapping = columns or {str(i): i for i in range(len(record))}
            if max(mapping.values()) >= len(record):
                policy.bad(path, line, f"expected at least {max(mapping.values()) + 1} fields, got {len(record)}")
                continue
            row = {name: record[index] for name, index in mapping.items()}
        else:
            mapping = columns or {name: name for name in record}
            missing = [src for src in mapping.values() if src not in record]
            if missing:
                policy.bad(path, line, f"missing column(s) {missing}; the row has {sorted(record)}")
                continue
            row = {name: record[src] for name, src in mapping.items()}
        empty = [
            name for name, value in row.items()
            if name not in allow_empty and (value is None or (isinstance(value, str) and not value.strip()))
        ]  # fmt: skip
        if empty:
            policy.bad(path, line, f"empty value in column(s) {empty}")
            continue
        try:
            for name, convert in types.items():
                row[name] = convert(row[name])
        except (TypeError, ValueError, OverflowError) as err:
            policy.bad(path, line, f"column {name!r}: cannot convert {row[name]!r} ({err})")
            continue
        yield Row(row, f"{location}{line}")


def read_table(
    path: str | os.PathLike,
    columns: Mapping[str, str | int] | None = None,
    *,
    format: Literal["jsonl", "json", "csv", "tsv", "parquet"] | None = None,
    header: bool | None = None,
    delimiter: str | None = None,
    types: Mapping[str, Callable[[Any], Any]] | None = None,
    allow_empty: Iterable[str] = (),
    on_error: OnError = "raise",
    encoding: str = "utf-8",
) -> Rows:
    """Read JSONL / JSON-array / CSV / TSV / Parquet rows (optionally ``.gz``), renaming columns through ``columns``.

    For large files use :func:`iter_table` (one row at a time) or :func:`conan_hf.data.sources.load_source`
    (memory-mapped or streamed ``datasets``); this returns a list.

    Args:
        path: the file. The format comes from the extension unless ``format`` is given
            (``.json`` holding JSON lines is recognised from its first line).
        columns: ``{output_name: source_column}``; a source column is a name, or an int index for header-less
            CSV/TSV. ``None`` keeps all columns under their own names (``"0"``, ``"1"``, ... without a header).
        header: whether CSV/TSV files start with a header row; default: yes, unless ``columns`` uses int indices.
        types: converters per output column, e.g. ``{"score": float}``; a failing conversion is a bad row.
        allow_empty: output columns that may be empty strings / null (all mapped columns must be non-empty otherwise).
        on_error: ``"raise"`` (default) or ``"skip"`` (bad rows are recorded in ``rows.skipped``).

    Raises:
        DataFormatError: ``file:line: reason`` for the first bad row when ``on_error="raise"``.
    """
    policy = _ErrorPolicy(on_error)
    rows = list(iter_table(path, columns, format=format, header=header, delimiter=delimiter, types=types,
                           allow_empty=allow_empty, encoding=encoding, policy=policy))
    return policy.finish(rows, str(path))


class SquadRows(Rows):
    """The question rows of a SQuAD file, plus ``paragraphs``: ``{paragraph_id: {"title", "text"}}`` of every paragraph
    with a context, in file order (paragraphs without questions included: they are retrieval distractors)."""

    def __init__(self, rows: Iterable[dict] = (), skipped: Iterable[tuple[str, int | str, str]] = (),
                 paragraphs: Mapping[str, dict[str, str]] | None = None) -> None:
        super().__init__(rows, skipped)
        self.paragraphs: dict[str, dict[str, str]] = dict(paragraphs or {})


def read_squad(path: str | os.PathLike, on_error: OnError = "raise") -> SquadRows:
    """Question–paragraph pairs from a SQuAD-format file (SQuAD 1.1/2.0, XQuAD, MLQA, CMRC2018).

    Each question becomes ``{"id", "query", "positive" (its paragraph), "answers" (answer texts), "title",
    "paragraph_id"}``; the paragraph id is ``"{article}-{paragraph}"``, the paragraph's position, so it is the same in
    every language of XQuAD. Unanswerable SQuAD 2.0 questions are kept with an empty ``answers`` list. Bad entries are
    reported by their JSON position, e.g. ``xquad.de.json:data[3].paragraphs[0].qas[5]``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such SQuAD file", where=str(path), hint="check the path")
    with path.open(encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise invalid_json(path, err) from None
        except UnicodeDecodeError as err:
            raise undecodable(path, "utf-8", err) from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataFormatError(path, 1, "not SQuAD format: expected an object with a 'data' list")
    policy = _ErrorPolicy(on_error)
    rows: list[dict] = []
    paragraph_table: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    for i, article in enumerate(data["data"]):
        title = article.get("title", "") if isinstance(article, dict) else ""
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            policy.bad(path, f"data[{i}]", "article without a 'paragraphs' list")
            continue
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                policy.bad(path, where, "paragraph without a 'context' text")
                continue
            paragraph_id = f"{i}-{j}"
            paragraph_table[paragraph_id] = {"title": title if isinstance(title, str) else "", "text": context}
            for k, qa in enumerate(paragraph.get("qas") or []):
                qwhere = f"{where}.qas[{k}]"
                if not isinstance(qa, dict) or not str(qa.get("id", "")).strip():
                    policy.bad(path, qwhere, "question without an 'id'")
                    continue
                qid, question = str(qa["id"]), qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    policy.bad(path, qwhere, f"question {qid!r} has no text")
                    continue
                if qid in seen:
                    policy.bad(path, qwhere, f"duplicate question id {qid!r}")
                    continue
                seen.add(qid)
                answers = [a["text"] for a in qa.get("answers", []) if isinstance(a, dict) and "text" in a]
                rows.append(Row({"id": qid, "query": question, "positive": context, "answers": answers,
                                 "title": title, "paragraph_id": paragraph_id}, f"{path}:{qwhere}"))
    finished = policy.finish(rows, str(path))
    return SquadRows(finished, finished.skipped, paragraph_table)


def read_stsb_multi_mt(
    folder: str | os.PathLike, language: str, split: str = "dev", on_error: OnError = "raise"
) -> Rows:
    """One language of STS-B multi-mt (``stsb-{language}-{split}.csv``: ``s1,s2,score`` without header).

    Rows: ``{"id": "{split}-{row}", "sentence1", "sentence2", "score"}`` with the 0-5 score as float; the id is the
    row position, which is what aligns the languages.
    """
    path = Path(folder) / f"stsb-{language}-{split}.csv"
    rows = read_table(path, {"sentence1": 0, "sentence2": 1, "score": 2}, types={"score": finite_float},
                      on_error=on_error)
    if rows.skipped:
        # Ids are row positions; skipping rows would silently misalign the languages.
        raise DataFormatError(path, rows.skipped[0][1], "STS-B multi-mt rows are aligned by position: fix the file")
    for index, row in enumerate(rows):
        row["id"] = f"{split}-{index}"
    return rows


def read_bitext(path1: str | os.PathLike, path2: str | os.PathLike, limit: int | None = None) -> Rows:
    """Two line-aligned text files (Tatoeba, one sentence a line): line i of one translates line i of the other.

    Rows: ``{"id": "<line>", "sentence1", "sentence2"}``, located at ``path1:line``. The files must have the same number
    of lines and no empty line (an empty line would silently shift every later pair); ``limit`` keeps the first pairs.
    """
    texts = []
    for path in (Path(path1), Path(path2)):
        if not path.is_file():
            raise DataFileNotFoundError("no such bitext file", where=str(path), hint="check the path")
        texts.append(path.read_text(encoding="utf-8").splitlines())
    lines1, lines2 = texts
    if len(lines1) != len(lines2):
        raise DataFormatError(path1, None, f"has {len(lines1)} lines but {path2} has {len(lines2)}",
                              hint="bitext files must be line-aligned")
    rows = []
    for line, (a, b) in enumerate(zip(lines1, lines2), start=1):
        if not a.strip() or not b.strip():
            raise DataFormatError(path1 if not a.strip() else path2, line,
                                  "empty sentence in a line-aligned bitext file", hint="fix or remove the pair")
        rows.append(Row({"id": str(line), "sentence1": a, "sentence2": b}, f"{path1}:{line}"))
    return Rows(rows[:limit])


@dataclass
class BeirData:
    """A BEIR dataset: ``corpus`` (``{doc_id: {"title", "text"}}``), ``queries`` (``{query_id: text}``) and ``qrels``
    (``{query_id: {doc_id: score}}``) of one split."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    skipped: list[tuple[str, int | str, str]] = field(default_factory=list)
    #: ``{(query_id, doc_id): "qrels/<split>.tsv:<line>"}``, where each judgement was read.
    qrels_locations: dict[tuple[str, str], str] = field(default_factory=dict)


#: The columns of a BEIR qrels header line.
QRELS_HEADER = ("query-id", "corpus-id", "score")


def _integer_score(value: str) -> int:
    """A relevance grade: an integer (``"2"``, ``"2.0"``). ``"2.5"``, NaN, inf or text raise a `ValueError` whose
    message completes "score ..." (a grade is never rounded)."""
    try:
        number = finite_float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a finite number") from None
    if not number.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(number)


def _read_qrels(path: Path, policy: _ErrorPolicy) -> list[tuple[int, Row]]:
    """``(line, row)`` for each judgement of ``path``; see :func:`read_qrels`."""
    rows: list[tuple[int, Row]] = []
    columns: tuple[int, ...] | None = None  # positions of query-id, corpus-id and score
    width = 0
    for line, fields in _iter_records(path, "tsv", False, None, policy, "utf-8"):
        fields = [value.strip() for value in fields]
        if columns is None:
            # The first line decides the layout: it is a header when its score field is not an integer.
            width = len(fields)
            is_header = set(QRELS_HEADER) <= set(fields)
            if width not in (3, 4) and not is_header:
                raise DataFormatError(path, line, f"expected 3 tab-separated fields 'query-id<TAB>corpus-id<TAB>score' "
                                                  f"(or 4 TREC fields 'query-id<TAB>0<TAB>corpus-id<TAB>score'), "
                                                  f"got {width}")
            score_field = fields[3 if width == 4 else 2]
            try:
                _integer_score(score_field)
            except ValueError as err:
                if not is_header:
                    raise DataFormatError(path, line, f"neither the header '{' '.join(QRELS_HEADER)}' nor a "
                                                      f"judgement: score {err}") from None
                columns = tuple(fields.index(name) for name in QRELS_HEADER)
                continue
            columns = (0, 2, 3) if width == 4 else (0, 1, 2)
        if len(fields) != width:
            policy.bad(path, line, f"expected {width} tab-separated fields like the first line, got {len(fields)}")
            continue
        qid, did, raw_score = (fields[i] for i in columns)
        if not qid or not did:
            policy.bad(path, line, "empty query-id or corpus-id")
            continue
        try:
            score = _integer_score(raw_score)
        except ValueError as err:
            policy.bad(path, line, f"score {err}")
            continue
        rows.append((line, Row({"query_id": qid, "corpus_id": did, "score": score}, f"{path}:{line}")))
    return rows


def read_qrels(path: str | os.PathLike, on_error: OnError = "raise") -> Rows:
    """BEIR / TREC relevance judgements: ``query-id<TAB>corpus-id<TAB>score`` lines, with or without the header line
    ``query-id corpus-id score`` (a header is recognised by its score field not being an integer), or the 4 TREC fields
    ``query-id<TAB>iteration<TAB>corpus-id<TAB>score``.

    Rows: ``{"query_id", "corpus_id", "score"}`` with an integer score. A line with a different number of fields, an
    empty id or a score that is not an integer (``"1.5"``, ``"inf"``) is a bad row, reported as ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such qrels file", where=str(path), hint="check the path")
    policy = _ErrorPolicy(on_error)
    return policy.finish([row for _, row in _read_qrels(path, policy)], str(path))


def _read_beir_texts(path: Path, policy: _ErrorPolicy, documents: bool) -> dict[str, Any]:
    """``corpus.jsonl`` (``{_id: {"title", "text"}}``) or ``queries.jsonl`` (``{_id: text}``)."""
    table: dict[str, Any] = {}
    for line, record in _iter_records(path, "jsonl", False, None, policy, "utf-8"):
        doc_id, text, title = str(record.get("_id", "")).strip(), record.get("text"), record.get("title") or ""
        if not doc_id:
            policy.bad(path, line, "no '_id'")
        elif not isinstance(text, str) or not text.strip():
            policy.bad(path, line, f"{doc_id!r} has no 'text' (a non-empty string)")
        elif documents and not isinstance(title, str):
            policy.bad(path, line, f"{doc_id!r}: 'title' must be a string, got {type(title).__name__} {title!r}")
        elif doc_id in table:
            policy.bad(path, line, f"duplicate _id {doc_id!r}")
        else:
            table[doc_id] = {"title": title, "text": text} if documents else text
    return table


def read_beir_corpus(path: str | os.PathLike, on_error: OnError = "raise") -> dict[str, dict[str, str]]:
    """A BEIR ``corpus.jsonl`` alone (``{"_id", "title", "text"}`` per line) as ``{doc_id: {"title", "text"}}``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such corpus file", where=str(path), hint="check the path")
    policy = _ErrorPolicy(on_error)
    corpus = _read_beir_texts(path, policy, documents=True)
    policy.finish([], str(path), kept=len(corpus))
    return corpus


def beir_splits(folder: str | os.PathLike) -> list[str]:
    """The qrels splits of a BEIR folder (the names of ``qrels/*.tsv``), sorted."""
    return sorted(p.stem for p in (Path(folder) / "qrels").glob("*.tsv"))


def read_beir(folder: str | os.PathLike, split: str = "test", on_error: OnError = "raise") -> BeirData:
    """Read a BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv`` (see :func:`read_qrels`:
    the header line is optional, as in the MS MARCO and TREC qrels files).

    qrels lines naming a query or document that does not exist, or with a score that is not an integer, are bad rows.
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for required in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not required.is_file():
            splits = beir_splits(folder)
            hint = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
            if required == qrels_path and splits:
                hint = f"the qrels splits here are {splits}"
            raise DataFileNotFoundError(f"BEIR folder lacks {required.relative_to(folder)}", where=str(folder),
                                        hint=hint)
    policy = _ErrorPolicy(on_error)
    corpus = _read_beir_texts(folder / "corpus.jsonl", policy, documents=True)
    queries = _read_beir_texts(folder / "queries.jsonl", policy, documents=False)

    qrels: dict[str, dict[str, int]] = {}
    locations: dict[tuple[str, str], str] = {}
    for line, row in _read_qrels(qrels_path, policy):
        qid, did = row["query_id"], row["corpus_id"]
        if qid not in queries:
            policy.bad(qrels_path, line, f"query id {qid!r} is not in queries.jsonl")
            continue
        if did not in corpus:
            policy.bad(qrels_path, line, f"document id {did!r} is not in corpus.jsonl")
            continue
        qrels.setdefault(qid, {})[did] = row["score"]
        locations[qid, did] = row.location
    policy.finish([], str(folder), kept=len(corpus) + len(queries) + sum(map(len, qrels.values())))
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, skipped=policy.skipped, qrels_locations=locations)


def beir_pairs(data: BeirData, min_score: int = 1, title_separator: str | None = " ") -> Rows:
    """(query, relevant document) rows from :func:`read_beir`, one per qrels entry with ``score >= min_score``.

    Rows: ``{"id": "{query_id}:{doc_id}", "query_id", "query", "positive", "positive_id", "score"}``. The document text
    is ``title + title_separator + text`` (``title_separator=None`` drops titles).
    """
    rows = []
    for qid, docs in data.qrels.items():
        for did, score in docs.items():
            if score < min_score:
                continue
            doc = data.corpus[did]
            text = doc["text"]
            if title_separator is not None and doc["title"]:
                text = doc["title"] + title_separator + text
            rows.append(Row(
                {"id": f"{qid}:{did}", "query_id": qid, "query": data.queries[qid], "positive": text,
                 "positive_id": did, "score": score}, data.qrels_locations.get((qid, did))
            ))  # fmt: skip
    return Rows(rows, data.skipped)


def load_rows(
    source: str | os.PathLike,
    columns: Mapping[str, str | int] | None = None,
    *,
    split: str = "train",
    on_error: OnError = "raise",
    **kwargs: Any,
) -> Rows:
    """Rows from a BEIR folder, a SQuAD JSON file, a JSONL/JSON/CSV/TSV file, or a Hugging Face Hub dataset name.

    ``columns`` renames columns (see :func:`read_table`; for Hub datasets only names are allowed); ``split`` picks the
    BEIR qrels file or the Hub split.
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
