"""Tables: JSONL, JSON, CSV, TSV and Parquet files (optionally ``.gz``) read row by row with a column mapping, every
row carrying the ``file:line`` it was read from.

Example::

    >>> from conan_hf.data.tables import read_table
    >>> rows = read_table("stsb-en-dev.csv", columns={"sentence1": 0, "sentence2": 1, "score": 2},
    ...                   types={"score": float})  # doctest: +SKIP
    >>> rows[0].location  # doctest: +SKIP
    'stsb-en-dev.csv:1'
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from conan_hf.errors import DataError, DataFileNotFoundError

# Records go to the logger of the public module, conan_hf.data.readers.
logger = logging.getLogger("conan_hf.data.readers")

__all__ = [
    "COMPRESSED_SUFFIXES",
    "TABLE_FORMATS",
    "DataFormatError",
    "OnError",
    "Row",
    "Rows",
    "iter_table",
    "open_text",
    "read_table",
    "splittable",
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
