"""The data layer: every stage, the CLR builder and evaluation read their ``data:`` sources through here.

A stage config lists its sources under ``data``; each entry is one of

- ``"demo"``: the stage's part of the embedded demo corpus (:mod:`conan_hf.demo`);
- a file, a glob (``shards/*.jsonl.gz``), a folder (BEIR: ``corpus.jsonl`` + ``queries.jsonl`` + ``qrels/``) or a
  Hugging Face Hub dataset name;
- a mapping ``{path: ..., columns: {wanted: source}, split: train, on_error: raise|skip, limit: N, streaming: true,
  format/header/delimiter/allow_empty: ...}``.

Files are JSONL, JSON (array or JSON lines), CSV, TSV or Parquet, optionally gzip-compressed (``.jsonl.gz``).

Two ways to get the rows, both ``datasets`` objects, neither holding rows as Python objects:

- :func:`load_sources` (default): a memory-mapped :class:`datasets.Dataset`. The files are parsed once per node
  (local rank 0 first, the other ranks then open the same Arrow cache: ``main_process_first``); the cache is keyed
  by the files' paths, sizes and modification times, so an edited file is read again.
- ``streaming=True`` (or ``streaming: true`` on a source): a :class:`datasets.IterableDataset`, read lazily. Large
  uncompressed JSONL/TSV files are cut into line-aligned byte ranges and every file or range is a shard, so under
  ``torch.distributed`` each rank reads only its shards (:func:`datasets.distributed.split_dataset_by_node`) and
  no rank reads all rows.

``limit: N`` stops reading a source after N rows. Every row is checked as it is read: a needed column that is
missing, a text that is not a string, a score that is not a finite number raise a :class:`~conan_hf.errors.DataError`
naming the file and the 1-based line (rows in a byte range know their true line: the range counts the line breaks
before it, without parsing them); ``on_error: skip`` leaves out rows the reader cannot read and logs how many, never
silently. Each row carries where it was read in the column :data:`LOCATION`.

Example::

    >>> from conan_hf.data.sources import load_sources
    >>> pairs = load_sources([{"path": "weak/*.jsonl.gz", "columns": {"query": "title", "positive": "body"}}],
    ...                      required=["query", "positive"], what="stage 3 data")  # doctest: +SKIP
    >>> stream = load_sources("big.jsonl", required=["text"], streaming=True)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError, DataFileNotFoundError, finite_float

logger = logging.getLogger(__name__)

__all__ = ["LOCATION", "Source", "iter_sources", "load_sources", "main_process_first", "parse_sources",
           "progress_bars_on_terminals_only", "read_sources", "row_text", "split_holdout", "unwrap_data_error"]

#: The column in which every row carries where it was read (``"file:line"``, ``"demo row 3"``).
LOCATION = "_location"
#: Uncompressed JSONL/TSV files larger than this are cut into byte ranges when streamed, so ranks share one file.
SPLIT_BYTES = 4 << 20
#: Options of a source mapping that are the data layer's; the others go to the file reader.
_SOURCE_KEYS = ("path", "columns", "split", "on_error", "limit", "streaming")


@dataclass(frozen=True)
class Source:
    """One ``data:`` entry, parsed: where the rows are and how to read them."""

    path: str
    columns: Mapping[str, str | int] | None = None
    split: str = "train"
    on_error: str = "raise"
    limit: int | None = None
    streaming: bool | None = None
    reader: Mapping[str, Any] = field(default_factory=dict)  # format, header, delimiter, allow_empty, encoding

    @property
    def is_demo(self) -> bool:
        return self.path == "demo"

    def files(self) -> list[Path] | None:
        """The local files of the source (a glob expanded, sorted), ``None`` for folders, SQuAD files, Hub names and the
        demo (read whole: they are evaluation-sized)."""
        from conan_hf.data.readers import _HUB_NAME, _is_squad

        if self.is_demo:
            return None
        path = Path(self.path).expanduser()
        if any(ch in self.path for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataFileNotFoundError("the pattern matches no file", where=self.path, hint="check the glob")
            return matches
        if path.is_dir():
            return None
        if path.is_file():
            return None if path.suffix.lower() == ".json" and _is_squad(path) else [path]
        if _HUB_NAME.match(self.path) and not path.suffix:
            return None
        raise DataFileNotFoundError("no such file or folder", where=self.path, hint="check the path")


def _as_list(sources: Any) -> list[Any]:
    if sources is None:
        return []
    if isinstance(sources, (str, dict, Source)):
        return [sources]
    return list(sources)


def parse_sources(sources: Any, what: str = "data") -> list[Source]:
    """The ``data:`` entries as :class:`Source` objects; a clear error for an entry that is not one."""
    entries = _as_list(sources)
    if not entries:
        raise DataError(f"{what}: no data sources given", hint="list files, folders, Hub names or 'demo' under `data:`")
    parsed = []
    for entry in entries:
        if isinstance(entry, Source):
            parsed.append(entry)
            continue
        if isinstance(entry, (str, os.PathLike)):
            parsed.append(Source(str(entry)))
            continue
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise DataError(f"{what}: a data source mapping needs a 'path' (file, folder or Hub name): {entry!r}",
                            hint="write `{path: FILE, columns: {...}}`")
        spec = dict(entry)
        limit = spec.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataError(f"{what}: limit must be a positive integer, got {limit!r}", where=str(spec["path"]))
        parsed.append(Source(str(spec["path"]), spec.get("columns"), str(spec.get("split", "train")),
                             spec.get("on_error", "raise"), limit, spec.get("streaming"),
                             {k: v for k, v in spec.items() if k not in _SOURCE_KEYS}))
    return parsed


@dataclass(frozen=True)
class RowCheck:
    """What every row of a stage's data must satisfy (see :func:`load_sources`)."""

    what: str = "data"
    required: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    keep: tuple[str, ...] | None = None  # output columns (missing optional ones become None); None: as read

    def __call__(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        missing = [c for c in self.required if c not in row or row[c] is None]
        if missing:
            raise DataError(
                f"{self.what}: no {missing} column (the row has {sorted(k for k in row if k != LOCATION)})",
                where=where,
                hint=f"map the source's columns with `columns: "
                     f"{{{', '.join(f'{c}: <source column>' for c in missing)}}}`",
            )
        for column in self.text:
            if column in row and row[column] is not None:
                row_text(row, column, self.what, where)
        for column in self.numeric:
            try:
                row[column] = finite_float(row[column])
            except ValueError as error:
                raise DataError(f"{self.what}: column {column!r}: {error}", where=where,
                                hint="fix the value, or remove the row") from None
        if self.keep is not None:
            row = {column: row.get(column) for column in self.keep}
        row[LOCATION] = where
        return row


def _shards(source: Source, index: int, pieces: int) -> list[tuple[int, str | None, tuple[int, int] | None]]:
    """``(source index, file, byte range)`` units of reading; a limited source is one unit (it stops early)."""
    from conan_hf.data.tables import _detect_format, splittable

    files = source.files()
    if files is None:
        return [(index, None, None)]
    units = []
    for path in files:
        size = path.stat().st_size
        fmt = source.reader.get("format") or _detect_format(path)
        n = pieces if source.limit is None and splittable(path, fmt) and size > SPLIT_BYTES else 1
        if n == 1:
            units.append((index, str(path), None))
        else:
            bounds = [size * i // n for i in range(n + 1)]
            units.extend((index, str(path), (bounds[i], bounds[i + 1])) for i in range(n))
    return units


def _source_rows(source: Source, check: RowCheck, demo: Callable[[], list[dict]] | None,
                 unit: tuple[str | None, tuple[int, int] | None] = (None, None),
                 skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Checked rows of one source (or of one of its files / byte ranges), stopping at ``limit``."""
    from conan_hf.data.readers import load_rows
    from conan_hf.data.tables import _ErrorPolicy, iter_table

    file, byte_range = unit
    if source.is_demo:
        if demo is None:
            raise DataError(f"{check.what}: this stage has no demo data", where="demo")
        rows = ((dict(r), f"demo row {i}") for i, r in enumerate(demo(), 1))
    elif file is not None:
        policy = _ErrorPolicy(source.on_error)
        table = iter_table(file, source.columns, policy=policy, byte_range=byte_range, **source.reader)
        rows = ((dict(r), r.location) for r in table)
    elif not Path(source.path).exists():  # a Hub dataset: streamed from the Hub (or its local cache), row by row
        policy = None
        rows = _hub_rows(source, check.what)
    else:  # BEIR folder, SQuAD file: read whole by the readers (evaluation-sized)
        policy = None
        part = load_rows(source.path, source.columns, split=source.split, on_error=source.on_error, **source.reader)
        if skipped is not None:
            skipped.append(part.num_skipped)
        if part.num_skipped:
            logger.warning("%s: skipped %d bad row(s) of %s (on_error=skip)", check.what, part.num_skipped,
                           source.path)
        rows = ((dict(r), getattr(r, "location", None) or f"{source.path} row {i}") for i, r in enumerate(part, 1))
    count = 0
    for row, where in rows:
        if source.limit is not None and count >= source.limit:
            break
        count += 1
        yield check(row, where)
    if file is not None and skipped is not None:
        skipped.append(len(policy.skipped))
    if file is not None and policy.skipped:
        first = policy.skipped[0]
        logger.warning("%s: skipped %d bad row(s) of %s (on_error=skip; first: %s:%s: %s)", check.what,
                       len(policy.skipped), file, first[0], first[1], first[2])


def _hub_rows(source: Source, what: str) -> Iterator[tuple[dict[str, Any], str]]:
    from datasets import load_dataset

    rows = load_dataset(source.path, split=source.split, streaming=True, **source.reader)
    for index, row in enumerate(rows, 1):
        where = f"{source.path} (Hub dataset, split {source.split}) row {index}"
        if source.columns:
            missing = [src for src in source.columns.values() if src not in row]
            if missing:
                raise DataError(f"{what}: no column(s) {missing}; the row has {sorted(row)}", where=where,
                                hint="fix the column mapping (`columns: {wanted: source column}`)")
            row = {name: row[src] for name, src in source.columns.items()}
        yield row, where


def _generate(units: list, sources: tuple[Source, ...], check: RowCheck, demo: Callable | None,
              stamps: tuple = (), skipped: list[int] | None = None, uniform: bool = True) -> Iterator[dict[str, Any]]:
    """The rows of ``units`` (``(source index, file, byte range)``), in order. ``stamps`` (file sizes and
    modification times) only key the ``datasets`` cache. ``uniform``: every row gets the first row's columns (an Arrow
    table has one set of columns)."""
    del stamps
    counts: dict[int, int] = {}
    columns: list[str] | None = None  # a table has one set of columns: the first row's, absent ones become None
    for index, file, byte_range in units:
        source = sources[index]
        left = None if source.limit is None else source.limit - counts.get(index, 0)
        if left is not None and left <= 0:
            continue
        limited = source if left is None else Source(**{**source.__dict__, "limit": left})
        for row in _source_rows(limited, check, demo, (file, byte_range), skipped):
            counts[index] = counts.get(index, 0) + 1
            if not uniform:
                pass
            elif columns is None:
                columns = list(row)
            elif list(row) != columns:
                extra = [c for c in row if c not in columns]
                if extra:
                    raise DataError(
                        f"{check.what}: column(s) {extra} first appear here, after rows without them",
                        where=row[LOCATION],
                        hint="give the first row every column (null where empty), or read only the columns the "
                             "stage uses (columns: {...})")
                row = {column: row.get(column) for column in columns}
            yield row


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Local rank 0 of each node runs the block first (it fills the ``datasets`` cache); the others then run it
    (they find the cache). Without ``torch.distributed`` it just runs."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if distributed and not first:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and first:
            dist.barrier()


@contextlib.contextmanager
def progress_bars_on_terminals_only() -> Iterator[None]:
    """``datasets``' progress bars (building the cache, a ``map``) only when stderr is a terminal: in a log or a pipe
    they are carriage-return noise, and an error then stays the single line ``cli_errors`` prints."""
    import sys

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            enable_progress_bars()


def unwrap_data_error(error: BaseException) -> BaseException:
    """``datasets`` wraps errors raised while generating or mapping; the user should see the `DataError` itself."""
    cause = error
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__ or cause.__context__
    return cause or error


def load_sources(
    sources: Any,
    demo: Callable[[], list[dict[str, Any]]] | None = None,
    required: Sequence[str] = (),
    numeric: Sequence[str] = (),
    what: str = "data",
    text: Sequence[str] = (),
    *,
    keep: Sequence[str] | None = None,
    streaming: bool | None = None,
    cache_dir: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
):
    """Every row of ``sources`` as a memory-mapped ``datasets.Dataset``, or a rank-sharded ``IterableDataset``.

    Args:
        sources: the ``data:`` entries (see the module docstring).
        demo: returns the demo rows for ``"demo"``.
        required: columns every row must have (after the column mapping).
        numeric: columns converted to float (e.g. an STS ``score``); a value that is not a finite number raises.
        what: used in messages (e.g. ``"stage 2 (SFT) data"``).
        text: columns holding texts; where a row has them (required ones always) they must be strings.
        keep: the columns the stage reads (optional ones become ``None`` where a source lacks them), so sources with
            different extra columns concatenate; default: the columns as read (then they must agree across sources).
        streaming: read lazily (``IterableDataset``); default: streamed if any source says ``streaming: true``.
        cache_dir: the ``datasets`` cache for the memory-mapped form.
        rank / world_size: the shard of a stream this process reads; default: ``torch.distributed``'s.

    Returns:
        a ``datasets.Dataset`` (memory-mapped, with a :data:`LOCATION` column) or ``datasets.IterableDataset``.

    Raises:
        DataError: naming the file and 1-based line (``"demo row N"`` for demo data) of the first bad row, or a
            source without rows (memory-mapped form).
    """
    from datasets import Dataset, IterableDataset
    from datasets.distributed import split_dataset_by_node

    parsed = tuple(parse_sources(sources, what))
    check = RowCheck(what, tuple(required), tuple(text), tuple(numeric), None if keep is None else tuple(keep))
    if streaming is None:
        streaming = any(s.streaming for s in parsed)
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    if streaming:
        pieces = max(world_size, 1) * 4
        units = [u for i, s in enumerate(parsed) for u in _shards(s, i, pieces)]
        stream = IterableDataset.from_generator(_generate, gen_kwargs={"units": units, "sources": parsed,
                                                                       "check": check, "demo": demo})
        if world_size > 1:
            if len(units) % world_size:
                logger.warning("%s: %d shard(s) do not divide among %d ranks: every rank reads all rows and keeps "
                               "1/%d (use more files, or larger uncompressed JSONL/TSV files, to shard by file)",
                               what, len(units), world_size, world_size)
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        return stream
    datasets = []
    for index, source in enumerate(parsed):
        units = _shards(source, index, 1)
        stamps = tuple((u[1], *_stat(u[1])) for u in units if u[1] is not None)
        try:
            with main_process_first(), progress_bars_on_terminals_only():
                if source.is_demo or units[0][1] is None:
                    rows = list(_generate(units, parsed, check, demo))
                    part = Dataset.from_list(rows) if rows else Dataset.from_dict({})
                else:
                    part = Dataset.from_generator(
                        _generate, gen_kwargs={"units": units, "sources": parsed, "check": check, "demo": None,
                                               "stamps": stamps}, cache_dir=cache_dir)
        except Exception as error:  # noqa: BLE001 - re-raised, unwrapped from datasets' generation error
            cause = unwrap_data_error(error)
            if isinstance(cause, DataError) or _has_rows(units, parsed, check, demo):
                raise cause from None
            part = None  # datasets cannot build a table without rows
        if part is None or len(part) == 0:
            skipped: list[int] = []
            _has_rows(units, parsed, check, demo, skipped)
            raise _no_rows(what, source, sum(skipped))
        logger.info("%s: %d rows from %s", what, len(part), source.path)
        datasets.append(part)
    if len(datasets) == 1:
        return datasets[0]
    from datasets import concatenate_datasets

    return concatenate_datasets(datasets)


def _has_rows(units, parsed, check, demo, skipped: list[int] | None = None) -> bool:
    """Whether the units yield any row (the error path only: it reads the source again)."""
    return any(True for _ in _generate(units, parsed, check, demo, skipped=skipped))


def _no_rows(what: str, source: Source, skipped: int) -> DataError:
    why = f"all {skipped} rows were bad and skipped" if skipped else "the source is empty"
    return DataError(f"{what}: no rows ({why})", where=source.path,
                     hint="give a source with at least one row, or remove it from `data:`")


def _stat(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def iter_sources(
    sources: Any,
    demo: Callable[[], list[dict[str, Any]]] | None,
    required: Sequence[str],
    numeric: Sequence[str] = (),
    what: str = "data",
    text: Sequence[str] = (),
) -> Iterator[dict[str, Any]]:
    """The checked rows of every source, read lazily in this process, one at a time (rows of one source may differ
    in their optional columns). Each row carries its place in :data:`LOCATION`; a source without rows raises."""
    check = RowCheck(what, tuple(required), tuple(text), tuple(numeric))
    for source in parse_sources(sources, what):
        skipped: list[int] = []
        count = 0
        for row in _generate(_shards(source, 0, 1), (source,), check, demo, skipped=skipped, uniform=False):
            count += 1
            yield row
        if not count:
            raise _no_rows(what, source, sum(skipped))
        logger.info("%s: %d rows from %s", what, count, source.path)


def read_sources(
    sources: Any,
    demo: Callable[[], list[dict[str, Any]]] | None,
    required: Sequence[str],
    numeric: Sequence[str] = (),
    what: str = "data",
    text: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The rows of :func:`iter_sources` as a list of :class:`conan_hf.data.readers.Row` (``row.location``) — for
    small data only (demo runs, tests, evaluation sets); training stages use :func:`load_sources` or
    :func:`iter_sources`."""
    from conan_hf.data.readers import Row

    return [Row({k: v for k, v in row.items() if k != LOCATION}, row[LOCATION])
            for row in iter_sources(sources, demo, required, numeric, what, text)]


def row_text(row: dict[str, Any], column: str, what: str, where: str | None = None, optional: bool = False) -> str:
    """The text in ``row[column]``, refusing anything that is not a string (a number or a list is not silently turned
    into text). A missing or ``None`` value is ``""`` when ``optional``, else an error. Errors name ``where``
    (default: the row's location)."""
    from conan_hf.errors import location_of

    where = location_of(row, where)
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{what}: no {column!r} column (the row has {sorted(row)})", where=where,
                        hint=f"map a source column to it with `columns: {{{column}: <source column>}}`")
    if not isinstance(value, str):
        raise DataError(f"{what}: column {column!r} must be a text, got {type(value).__name__} {value!r}", where=where,
                        hint="write it as a string in the data file (numbers and lists are not turned into text)")
    return value


def split_holdout(rows: list[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, held-out) split; ``fraction`` of the rows are held out (at least one if > 0)."""
    import random

    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
    held = set(order[:n_out])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


