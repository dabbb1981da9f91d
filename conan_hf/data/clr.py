"""Cross-lingual retrieval (CLR) dataset builder (paper §3.3, App. A, Table 7).

The paper turns monolingual retrieval sets (MSMARCO, T2Retrieval) into a 26-language cross-lingual set by translating
**only the queries** (with Qwen2.5-7B): positives and negatives stay in the source language, so the model learns to
match a query in language X with passages in language Y. Each query gets one target language drawn from the mix of
Table 7.

**Table 7 sums to 106 %, not 100 %.** :data:`TABLE7` keeps the percentages exactly as printed; every use normalises
them by their sum, so English gets 25/106 = 23.58 % of the rows, Chinese 12/106 = 11.32 %, and so on. The relative
proportions between languages — the only information the table can carry — are preserved.

:func:`assign_languages` turns the mix into exact per-language counts by largest-remainder rounding (so the
proportions are exact up to one row per language at any size) and shuffles them with a seeded RNG.
:func:`write_clr_dataset` (and the ``conan-clr`` command) assigns, translates (with a cache), validates and appends
rows for the supervised stage to a JSONL file, batch by batch::

    {"id", "query" (language X), "positive" (source language), "negatives" (source language), "language" (X),
     "source_query", ...any other source columns}

Rows whose query is assigned the source language keep their query untranslated. Rejected translations are dropped
from the output, counted per reason in the :class:`CLRReport` and written to a file of rejected rows.
:func:`build_clr_dataset` does the same into an in-memory ``datasets.Dataset`` (rejected rows in
``report.rejected_examples``).

**Streaming.** The source is read twice, both times as a stream: a first pass counts and checks the rows (so a bad
row stops the build before anything is translated, and the number of rows fixes the language assignment), a second
one translates them ``batch_size`` rows at a time. Memory is bounded by the batches in flight plus one byte per row
for the assignment, whose shuffle equals that of :func:`assign_languages` for the same seed, whatever the batch size.
With an :class:`~conan_hf.data.translate.OpenAITranslator`, the requests of the next ``prefetch_batches`` batches run
while the oldest batch waits for its slowest one.

Example (parallel-corpus mode on XQuAD: human translations, nothing is translated)::

    >>> from conan_hf.data.clr import build_clr_dataset
    >>> from conan_hf.data.readers import read_squad
    >>> from conan_hf.data.translate import ParallelCorpusTranslator
    >>> xquad = "data/xling/xquad"
    >>> files = {lang: f"{xquad}/xquad.{lang}.json" for lang in ("de", "es", "zh")}
    >>> translator = ParallelCorpusTranslator.from_squad(files)  # doctest: +SKIP
    >>> dataset, report = build_clr_dataset(read_squad(f"{xquad}/xquad.en.json"), languages=["de", "es", "zh"],
    ...                                     translator=translator, seed=0)  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP

Command line (``conan-clr --help``)::

    conan-clr msmarco_triplets.jsonl -o clr.jsonl --backend openai --base-url http://localhost:8000/v1 \\
        --cache-dir clr-cache --columns query=query positive=pos negatives=neg --batch-size 1024 --max-workers 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import pickle
import random
import sys
import tempfile
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import DataError, OneLineArgumentParser, cli_errors, location_of
from .cache import RunMemo, TranslationCache
from .sources import LOCATION
from .translate import CompletedTranslation, ParallelCorpusTranslator, TranslationError, Translator
from .validate import TranslationValidator

logger = logging.getLogger(__name__)

__all__ = [
    "TABLE7",
    "CLRReport",
    "assign_languages",
    "RowStream",
    "build_clr_dataset",
    "language_counts",
    "language_shares",
    "main",
    "write_clr_dataset",
]

#: Table 7 of the paper: language code → percentage of CLR queries, exactly as printed. The values sum to 106;
#: they are normalised by their sum wherever they are used (see :func:`language_shares`).
TABLE7: dict[str, float] = {
    "en": 25, "zh": 12, "es": 8, "fr": 6, "ja": 6, "de": 5, "ru": 5, "it": 4, "pt": 4, "ar": 3, "ko": 3,
    "bn": 2, "da": 2, "sv": 2, "th": 2, "ms": 2, "tr": 2, "vi": 2, "nl": 2, "pl": 2, "hi": 2,
    "km": 1, "fi": 1, "he": 1, "hu": 1, "no": 1,
}  # fmt: skip

LanguageMix = Mapping[str, float] | Sequence[str] | str


def _weights(languages: LanguageMix) -> dict[str, float]:
    """``{code: weight}`` from a mapping, a list of codes (equal weights), or ``"table7"``."""
    if isinstance(languages, str):
        if languages.lower() != "table7":
            raise ValueError(f"languages must be a mapping, a list of codes or 'table7', got {languages!r}")
        languages = TABLE7
    if isinstance(languages, Mapping):
        weights = dict(languages)
    else:
        codes = list(languages)
        if len(set(codes)) != len(codes):
            raise ValueError(f"duplicate language codes in {codes}")
        weights = dict.fromkeys(codes, 1.0)
    if not weights:
        raise ValueError("no languages given")
    bad = {code: w for code, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
    if bad or sum(weights.values()) <= 0:
        raise ValueError(f"language weights must be non-negative numbers with a positive sum, got {weights}")
    return weights


def language_shares(languages: LanguageMix = TABLE7) -> dict[str, float]:
    """The mix normalised to fractions summing to 1 (Table 7: each percentage divided by 106)."""
    weights = _weights(languages)
    total = sum(weights.values())
    return {code: w / total for code, w in weights.items()}


def language_counts(n: int, languages: LanguageMix = TABLE7) -> dict[str, int]:
    """Exact per-language row counts for ``n`` rows by largest-remainder (Hamilton) rounding.

    Each language gets the floor of its quota ``n * w / sum(w)``; the rows left over go to the largest fractional
    parts (ties: table order). Counts sum to ``n`` and differ from the quota by less than one row. Exact rational
    arithmetic keeps the rounding independent of floating-point error.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    weights = {code: Fraction(w) for code, w in _weights(languages).items()}
    total = sum(weights.values())
    quotas = {code: n * w / total for code, w in weights.items()}
    counts = {code: int(q) for code, q in quotas.items()}
    order = list(weights)
    leftover = n - sum(counts.values())
    by_remainder = sorted(order, key=lambda c: (-(quotas[c] - counts[c]), order.index(c)))
    for code in by_remainder[:leftover]:
        counts[code] += 1
    return counts


def _shuffled_language_indices(n: int, seed: int, weights: Mapping[str, float]) -> tuple[list[str], array]:
    """``(codes, indices)``: row ``i`` gets ``codes[indices[i]]``, the assignment of :func:`assign_languages`.

    One byte per row (two beyond 255 languages) instead of a list of ``n`` references: 10M rows take 10 MB.
    ``random.shuffle`` permutes any mutable sequence by its length alone, so shuffling these indices with
    ``random.Random(seed)`` gives exactly the order the same shuffle gives to the list of codes.
    """
    counts = language_counts(n, weights)
    codes = list(counts)
    indices = array("B" if len(codes) <= 256 else "H")
    for index, count in enumerate(counts.values()):
        indices.extend(array(indices.typecode, [index]) * count)
    random.Random(seed).shuffle(indices)
    return codes, indices


def assign_languages(n: int, seed: int = 0, languages: LanguageMix = TABLE7) -> list[str]:
    """``n`` target-language codes in the proportions of ``languages`` (default Table 7, normalised), shuffled.

    The counts are those of :func:`language_counts` (exact proportions at any scale); the order is a shuffle by
    ``random.Random(seed)``, so the same ``(n, seed, languages)`` always gives the same list.

    Example::

        >>> from conan_hf.data.clr import assign_languages
        >>> codes = assign_languages(106_000, seed=0)
        >>> codes.count("en"), codes.count("zh"), codes.count("km")
        (25000, 12000, 1000)
    """
    codes, indices = _shuffled_language_indices(n, seed, _weights(languages))
    return [codes[i] for i in indices]


@dataclass
class CLRReport:
    """What :func:`build_clr_dataset` / :func:`write_clr_dataset` did. Every source row is counted: it is either an
    output row or a rejected one (``num_source_rows == num_output_rows + num_rejected``).

    Attributes:
        num_source_rows / num_output_rows: rows read / rows emitted.
        assigned: rows assigned to each language; ``kept`` the rows emitted per language.
        untranslated: rows assigned the source language (query kept as is).
        translated: distinct texts sent to the translator in this run (cache hits excluded).
        cache_hits / cache_misses: cache lookups of distinct (text, language) pairs in this run.
        rejected: rejected rows per reason (see :data:`conan_hf.data.validate.REJECTION_REASONS`);
            ``rejected_by_language`` the same per language; ``rejected_examples`` every rejected row
            (``id``, ``language``, ``source``, ``output``, ``reason``) in source order — kept in memory by
            :func:`build_clr_dataset` only; :func:`write_clr_dataset` writes them to ``rejected_file`` instead (JSONL).
    """

    num_source_rows: int = 0
    num_output_rows: int = 0
    translator: str = ""
    assigned: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    untranslated: int = 0
    translated: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_by_language: dict[str, int] = field(default_factory=dict)
    rejected_examples: list[dict[str, Any]] = field(default_factory=list)
    rejected_file: str | None = None

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"CLR build with {self.translator}: {self.num_source_rows} source rows -> {self.num_output_rows} rows "
            f"({self.untranslated} kept in the source language, {self.num_rejected} rejected)",
            f"  translator calls: {self.translated} texts; cache: {self.cache_hits} hits, {self.cache_misses} misses",
        ]
        if self.rejected:
            listed = f" (listed in {self.rejected_file})" if self.rejected_file else ""
            lines.append("  rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) + listed)
        lines.append("  per language (kept/assigned): " + ", ".join(
            f"{code} {self.kept.get(code, 0)}/{count}" for code, count in self.assigned.items()
        ))  # fmt: skip
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- row sources

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


# --------------------------------------------------------------------------------------------------------- build


#: What :meth:`Translator.submit` returns for one text (a string or ``None`` is an output already known).
_UNFINISHED = (Future, CompletedTranslation)


@dataclass
class _Batch:
    """One batch of source rows on its way through the translator: ``results[i]`` is row ``i``'s raw output, or the
    future that will hold it."""

    start: int
    rows: list[dict[str, Any]]
    languages: list[str]
    results: list[Any]


class _StreamingBuild:
    """The builder's state between batches: bounded by the batches in flight, never by the number of rows.

    Per batch, each (query text, language) pair is resolved once: from the run's memo of pairs already resolved (on
    disk), from a request still in flight for an earlier batch, from the translation cache, or by a new request.
    """

    def __init__(
        self,
        translator: Translator,
        validator: TranslationValidator,
        cache: TranslationCache | None,
        memo: RunMemo | None,
        report: CLRReport,
        codes: list[str],
        indices: array,
        source_language: str,
        columns: _Columns,
        has_negatives: bool,
    ) -> None:
        self.translator, self.validator, self.cache, self.memo = translator, validator, cache, memo
        self.report, self.codes, self.indices = report, codes, indices
        self.source_language, self.columns, self.has_negatives = source_language, columns, has_negatives
        # (language, text) -> its translation, until stored in the memo and the cache
        self.in_flight: dict[tuple[str, str], Future | CompletedTranslation] = {}
        self.kept: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.rejected_by_language: Counter[str] = Counter()

    def _prepare(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        # `row.copy()` keeps a reader Row's location (file:line).
        row = row.copy() if isinstance(row, dict) else dict(row)
        row.setdefault(self.columns.id, str(index))
        negatives = row.get(self.columns.negatives)
        if isinstance(negatives, str):
            row[self.columns.negatives] = [negatives]
        return row

    def submit(self, start: int, source_rows: list[Mapping[str, Any]]) -> _Batch:
        """Assign languages to a batch and start its translations (the results may still be futures)."""
        if start + len(source_rows) > len(self.indices):
            raise RuntimeError(f"the source yielded more than the {len(self.indices)} rows counted in the first pass "
                               "(it changed while being read)")
        cols, translator = self.columns, self.translator
        rows = [self._prepare(row, start + offset) for offset, row in enumerate(source_rows)]
        languages = [self.codes[self.indices[start + offset]] for offset in range(len(rows))]
        results: list[Any] = [None] * len(rows)
        groups: dict[str, list[int]] = {}
        for offset, language in enumerate(languages):
            if language == self.source_language:
                results[offset] = rows[offset][cols.query]
                self.report.untranslated += 1
            else:
                groups.setdefault(language, []).append(offset)
        for language, offsets in groups.items():
            if not translator.cacheable:
                texts = [rows[o][cols.query] for o in offsets]
                futures = translator.submit(texts, language, [str(rows[o][cols.id]) for o in offsets])
                if len(futures) != len(texts):
                    raise RuntimeError(f"{type(translator).__name__} returned {len(futures)} outputs for "
                                       f"{len(texts)} texts")
                for offset, future in zip(offsets, futures):
                    results[offset] = future
                continue
            # The same query text needs one translation per language, whichever rows carry it.
            first_id: dict[str, str] = {}
            for o in offsets:
                first_id.setdefault(rows[o][cols.query], str(rows[o][cols.id]))
            known: dict[str, Any] = self.memo.get_many(list(first_id), language) if self.memo is not None else {}
            pending = []
            for text in first_id:
                if text in known:
                    continue
                future = self.in_flight.get((language, text))
                if future is not None:  # requested for an earlier batch (and looked up in the cache then)
                    known[text] = future
                else:
                    pending.append(text)
            if self.cache is not None and pending:
                hits = self.cache.get_many(pending, language, translator.model_name, translator.cache_prompt)
                if hits:
                    known.update(hits)
                    if self.memo is not None:
                        self.memo.put_many((text, language, output) for text, output in hits.items())
                    pending = [text for text in pending if text not in hits]
            if pending:
                futures = translator.submit(pending, language, [first_id[text] for text in pending])
                if len(futures) != len(pending):
                    raise RuntimeError(f"{type(translator).__name__} returned {len(futures)} outputs for "
                                       f"{len(pending)} texts")
                for text, future in zip(pending, futures):
                    self.in_flight[(language, text)] = future
                    known[text] = future
                self.harvest()  # a translator that works synchronously has finished: store it before the next call
            for o in offsets:
                results[o] = known[rows[o][cols.query]]
        return _Batch(start, rows, languages, results)

    def harvest(self) -> None:
        """Store every finished translation in the memo and the cache (one transaction each)."""
        finished = [(key, future) for key, future in self.in_flight.items() if future.done()]
        if not finished:
            return
        items = []
        for (language, text), future in finished:
            items.append((text, language, future.result()))
            del self.in_flight[(language, text)]
        if self.memo is not None:
            self.memo.put_many(items)
        if self.cache is not None:
            self.cache.put_many(items, self.translator.model_name, self.translator.cache_prompt)

    def finish(self, batch: _Batch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Wait for a batch's translations, validate them; ``(output records, rejected rows)`` in source order."""
        outputs = [result.result() if isinstance(result, _UNFINISHED) else result for result in batch.results]
        self.harvest()  # the cache holds the batch's translations before the batch is written
        cols = self.columns
        records, rejects = [], []
        for row, language, output in zip(batch.rows, batch.languages, outputs):
            text = row[cols.query]
            if language != self.source_language:
                why = self.validator.check(text, output, language, failure_reason=self.translator.failure_reason)
                if why is not None:
                    self.rejected[why] += 1
                    self.rejected_by_language[language] += 1
                    rejects.append({"id": str(row[cols.id]), "language": language, "source": text, "output": output,
                                    "reason": why})
                    continue
            record = {"id": str(row[cols.id]), "query": output, "positive": row[cols.positive]}
            if self.has_negatives:
                record["negatives"] = list(row.get(cols.negatives) or [])
            record["language"] = language
            record["source_query"] = text
            taken = {cols.id, cols.query, cols.positive, cols.negatives, LOCATION}
            record.update({k: v for k, v in row.items() if k not in taken and k not in record})
            records.append(record)
            self.kept[language] += 1
        return records, rejects

    def cancel(self, batches: Iterable[_Batch]) -> None:
        for batch in batches:
            for result in batch.results:
                if isinstance(result, _UNFINISHED):
                    result.cancel()
        for future in self.in_flight.values():
            future.cancel()


def _run_build(
    source: Any,
    languages: LanguageMix,
    translator: Translator | None,
    write: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None],
    *,
    seed: int,
    cache_dir: str | os.PathLike | None,
    source_language: str,
    validator: TranslationValidator | None,
    columns: _Columns,
    batch_size: int,
    prefetch_batches: int,
    show_progress_bar: bool,
    work_dir: str | os.PathLike | None = None,
    before_writing: Callable[[int], None] | None = None,
) -> CLRReport:
    """The streaming build behind :func:`build_clr_dataset` and :func:`write_clr_dataset`: ``write(records,
    rejects)`` receives each batch in source order."""
    if translator is None:
        from .translate import TransformersTranslator

        translator = TransformersTranslator()
    if validator is None:
        validator = translator.default_validator()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch_batches < 0:
        raise ValueError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
    weights = _weights(languages)
    if isinstance(translator, ParallelCorpusTranslator):
        missing = sorted(set(weights) - set(translator.languages) - {source_language})
        if missing:
            raise ValueError(
                f"the parallel corpus has no {missing} side (it has {translator.languages}); "
                "restrict `languages` to those, e.g. {c: TABLE7[c] for c in available}"
            )

    rows = _TwoPassSource(source, work_dir)
    cache = memo = None
    pending: deque[_Batch] = deque()
    build: _StreamingBuild | None = None
    try:
        num_rows, has_negatives = _scan_source(rows, columns)
        if before_writing is not None:
            before_writing(num_rows)
        codes, indices = _shuffled_language_indices(num_rows, seed, weights)
        report = CLRReport(num_source_rows=num_rows, translator=translator.model_name)
        report.assigned = {code: count for code, count in language_counts(num_rows, weights).items() if count}
        if translator.cacheable:
            cache = TranslationCache(cache_dir) if cache_dir is not None else None
            memo = RunMemo(work_dir)
        build = _StreamingBuild(translator, validator, cache, memo, report, codes, indices, source_language, columns,
                                has_negatives)
        translated_before = translator.num_translated
        read = written = 0
        with tqdm(total=num_rows, desc="CLR", unit="row", disable=not show_progress_bar) as bar:
            for source_rows in _batches(rows.again(), batch_size):
                pending.append(build.submit(read, source_rows))
                read += len(source_rows)
                # Later batches' requests stay in flight while the oldest batch waits for its slowest translation.
                while len(pending) > prefetch_batches:
                    batch = pending.popleft()
                    write(*build.finish(batch))
                    written += len(batch.rows)
                    bar.update(len(batch.rows))
            while pending:
                batch = pending.popleft()
                write(*build.finish(batch))
                written += len(batch.rows)
                bar.update(len(batch.rows))
        if written != num_rows:
            raise RuntimeError(f"the source yielded {written} rows on the second pass but {num_rows} on the first "
                               "(it changed while being read)")
        report.translated = translator.num_translated - translated_before
    except BaseException:
        if build is not None:
            build.cancel(pending)
        raise
    finally:
        if cache is not None:
            cache.close()
        if memo is not None:
            memo.close()
        rows.close()
    if cache is not None:
        report.cache_hits, report.cache_misses = cache.hits, cache.misses
    report.rejected = dict(build.rejected)
    report.rejected_by_language = dict(build.rejected_by_language)
    report.kept = {code: build.kept.get(code, 0) for code in report.assigned}
    report.num_output_rows = sum(build.kept.values())
    return report


def build_clr_dataset(
    source: Iterable[Mapping[str, Any]] | str | os.PathLike,
    languages: LanguageMix = TABLE7,
    translator: Translator | None = None,
    *,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    source_language: str = "en",
    validator: TranslationValidator | None = None,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str = "negatives",
    id_column: str = "id",
    batch_size: int = 1024,
    prefetch_batches: int = 4,
    show_progress_bar: bool = True,
) -> tuple[Any, CLRReport]:
    """Build a cross-lingual retrieval set by translating queries into a language mix (paper §3.3), in memory.

    The rows are processed as :func:`write_clr_dataset` does, batch by batch, but the result is collected into an
    in-memory ``datasets.Dataset`` (and every rejected row into ``report.rejected_examples``): for large sets use
    :func:`write_clr_dataset` (or ``conan-clr``), whose memory does not grow with the number of rows.

    Args:
        source: rows with a query, a positive and optionally negatives (a list, or one string) — any iterable of
            dicts (read twice when it can be iterated twice; a generator is spooled to a temporary file), a
            ``datasets.Dataset`` / ``IterableDataset``, a :class:`RowStream`, or a path/Hub name (read by a
            :class:`RowStream`).
        languages: the target mix: ``{code: weight}`` (normalised by its sum), a list of codes (equal shares) or
            ``"table7"``. Default: Table 7 of the paper (sums to 106 %, normalised).
        translator: a :class:`~conan_hf.data.translate.Translator`. Default: a
            :class:`~conan_hf.data.translate.TransformersTranslator` with Qwen/Qwen2.5-7B-Instruct, as in the paper.
        seed: seeds the language assignment (the same seed and rows give the same assignment, whatever the batch
            size).
        cache_dir: folder of the on-disk translation cache; an interrupted build rerun with the same cache translates
            only what is missing. ``None``: no cache (each (text, language) pair is still translated once per run).
        source_language: the language of the source queries; rows assigned it keep their query untranslated.
        validator: checks each translation; default: ``translator.default_validator()``.
        query_column / positive_column / negatives_column / id_column: source column names. Rows without an id get
            their position as id.
        batch_size: source rows per batch: read, translated (one translator call per language in the batch) and
            emitted together; the cache is written as each call finishes.
        prefetch_batches: batches whose translations are started while the oldest one is still waiting for its
            own (an :class:`~conan_hf.data.translate.OpenAITranslator` keeps its request window full across batches).

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``id``, ``query``, ``positive``, [``negatives``],
        ``language``, ``source_query`` plus any other source columns, in source order; and a :class:`CLRReport`.
    """
    from datasets import Dataset

    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []

    def collect(batch_records: list[dict[str, Any]], batch_rejects: list[dict[str, Any]]) -> None:
        records.extend(batch_records)
        rejects.extend(batch_rejects)

    report = _run_build(
        source, languages, translator, collect, seed=seed, cache_dir=cache_dir, source_language=source_language,
        validator=validator, columns=_Columns(query_column, positive_column, negatives_column, id_column),
        batch_size=batch_size, prefetch_batches=prefetch_batches, show_progress_bar=show_progress_bar,
    )  # fmt: skip
    report.rejected_examples = rejects
    logger.info(report.summary())
    return Dataset.from_list(records), report


def write_clr_dataset(
    source: Iterable[Mapping[str, Any]] | str | os.PathLike,
    output: str | os.PathLike,
    languages: LanguageMix = TABLE7,
    translator: Translator | None = None,
    *,
    rejected_output: str | os.PathLike | None = None,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    source_language: str = "en",
    validator: TranslationValidator | None = None,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str = "negatives",
    id_column: str = "id",
    batch_size: int = 1024,
    prefetch_batches: int = 4,
    show_progress_bar: bool = True,
    allow_empty: bool = True,
) -> CLRReport:
    """Build a CLR set (paper §3.3) streaming: rows are read, translated and appended to JSONL files batch by batch.

    Memory is bounded by ``(prefetch_batches + 1) * batch_size`` rows plus one byte per source row (the shuffled
    language assignment, identical to :func:`assign_languages`) and a transient 8 bytes per row while the first
    pass checks the ids; translations already made in the run are looked up in a temporary SQLite file.

    Output rows (one JSON object per line, as in :func:`build_clr_dataset`'s dataset, in source order) go to
    ``output``, rejected rows (``id``, ``language``, ``source``, ``output``, ``reason``) to ``rejected_output``
    (default: ``output`` with suffix ``.rejected.jsonl``). Both are written under a ``.partial`` name and renamed
    when the build finishes, so a file under the final name is always complete; a build that stops half-way leaves
    only ``.partial`` files, and rerunning it with the same ``cache_dir`` rewrites them without translating again
    what the cache holds (a build killed outright may also leave its run memo, ``clr-run-memo-*.sqlite``, next to
    the output: it can be deleted). The returned report counts every row; it does not hold the rejected rows
    (``report.rejected_file`` names their file).

    Arguments are those of :func:`build_clr_dataset`; ``allow_empty=False`` raises a
    :class:`~conan_hf.errors.DataError` for a source without rows before any file is created.
    """
    output = Path(output)
    rejected_path = Path(rejected_output) if rejected_output is not None else output.with_suffix(".rejected.jsonl")
    if rejected_path.resolve() == output.resolve():
        raise ValueError(f"the rejected rows need a file of their own, not the output {output}")
    partial = {path: path.with_name(path.name + ".partial") for path in (output, rejected_path)}
    handles: dict[Path, Any] = {}

    def open_outputs(num_rows: int) -> None:
        if not num_rows and not allow_empty:
            named = isinstance(source, (str, os.PathLike, RowStream))
            raise DataError("no rows to translate", where=str(source) if named else None,
                            hint="give a source with (query, positive) rows; an empty file would build an empty set")
        for path, temporary in partial.items():
            temporary.parent.mkdir(parents=True, exist_ok=True)
            handles[path] = temporary.open("w", encoding="utf-8")

    def append(records: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> None:
        for path, items in ((output, records), (rejected_path, rejects)):
            if items:
                handle = handles[path]
                handle.write("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
                handle.flush()

    try:
        report = _run_build(
            source, languages, translator, append, seed=seed, cache_dir=cache_dir, source_language=source_language,
            validator=validator, columns=_Columns(query_column, positive_column, negatives_column, id_column),
            batch_size=batch_size, prefetch_batches=prefetch_batches, show_progress_bar=show_progress_bar,
            work_dir=output.parent if output.parent.is_dir() else None, before_writing=open_outputs,
        )  # fmt: skip
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    for path, handle in handles.items():
        handle.close()
        os.replace(partial[path], path)
    report.rejected_file = str(rejected_path)
    logger.info(report.summary())
    return report


# --------------------------------------------------------------------------------------------------------------- CLI


def _parse_languages(value: str) -> LanguageMix:
    """``table7`` | ``de,es,zh`` | ``en:25,zh:12``."""
    if value.lower() == "table7":
        return TABLE7
    items = [item.strip() for item in value.split(",") if item.strip()]
    if all(":" in item for item in items):
        return {code.strip(): float(weight) for code, weight in (item.split(":", 1) for item in items)}
    if any(":" in item for item in items):
        raise argparse.ArgumentTypeError(f"mix weighted and unweighted languages: {value!r}")
    return items


def _parse_columns(items: Sequence[str] | None) -> dict[str, str | int] | None:
    if not items:
        return None
    columns: dict[str, str | int] = {}
    for item in items:
        if "=" not in item:
            raise DataError(f"--columns expects NAME=SOURCE_COLUMN items, got {item!r}", hint="e.g. --columns query=q")
        name, src = item.split("=", 1)
        columns[name.strip()] = int(src) if src.strip().isdigit() else src.strip()
    return columns


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="conan-clr",
        description="Build a cross-lingual retrieval (CLR) training set by translating queries into a language mix "
        "(Conan-Embedding-v2 §3.3; Table 7 mix by default, whose 106% total is normalised).",
    )
    parser.add_argument("source", help="JSONL/JSON/CSV/TSV/Parquet file (optionally .gz, read row by row), SQuAD JSON, "
                        "BEIR folder or Hub dataset name")
    parser.add_argument("-o", "--output", required=True,
                        help="output JSONL file (written as OUTPUT.partial batch by batch, renamed when complete)")
    parser.add_argument("--rejected", help="rejected rows, JSONL (default: OUTPUT with suffix .rejected.jsonl)")
    parser.add_argument("--report", help="report JSON (default: OUTPUT with suffix .report.json)")
    parser.add_argument("--columns", nargs="+", metavar="NAME=SRC",
                        help="map source columns: query=..., positive=..., negatives=..., id=... "
                        "(an integer SRC is a column index of a header-less CSV/TSV)")  # fmt: skip
    parser.add_argument("--split", default="train", help="BEIR qrels split / Hub split / STS-B split (default train)")
    parser.add_argument("--limit", type=int, help="use only the first N source rows")
    parser.add_argument("--languages", default="table7", type=_parse_languages,
                        help="'table7' (default), 'de,es,zh' (equal shares) or 'en:25,zh:12' (weights)")  # fmt: skip
    parser.add_argument("--source-language", default="en", help="language of the source queries (default en)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backend", choices=("transformers", "openai", "parallel"), default="transformers")
    parser.add_argument("--model", default=None, help="translator model (default Qwen/Qwen2.5-7B-Instruct)")
    parser.add_argument("--prompt", default=None, help="prompt template with {language} and {text}")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1024,
                        help="source rows read, translated and appended to the output together (default 1024); "
                        "memory grows with this, not with the size of the source")  # fmt: skip
    parser.add_argument("--prefetch-batches", type=int, default=4,
                        help="batches whose translations start while the oldest batch still waits for its own "
                        "(default 4): keeps the openai request window full across batches")  # fmt: skip
    parser.add_argument("--generate-batch-size", type=int, default=16,
                        help="transformers: queries per generate call (default 16)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--base-url", default="http://localhost:8000/v1", help="openai: API root")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env var holding the API key")
    parser.add_argument("--max-workers", type=int, default=8,
                        help="openai: requests in flight at most (a sliding window over kept-alive connections)")
    parser.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    parser.add_argument("--max-retries", type=int, default=3, help="openai: retries per request")
    parser.add_argument(
        "--parallel",
        nargs="+",
        metavar="LANG=PATH",
        help="parallel: squad: LANG=FILE per language; mkqa: the mkqa.jsonl file; stsb: the folder",
    )
    parser.add_argument("--parallel-format", choices=("squad", "mkqa", "stsb"), default="squad")
    parser.add_argument("--cache-dir", help="translation cache folder (resume after a crash)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _make_translator(args: argparse.Namespace) -> Translator:
    from .translate import DEFAULT_MODEL, DEFAULT_PROMPT, OpenAITranslator, TransformersTranslator

    prompt = args.prompt or DEFAULT_PROMPT
    if args.backend == "transformers":
        return TransformersTranslator(
            args.model or DEFAULT_MODEL, prompt=prompt, batch_size=args.generate_batch_size,
            max_new_tokens=args.max_new_tokens, show_progress_bar=not args.no_progress,
        )  # fmt: skip
    if args.backend == "openai":
        return OpenAITranslator(
            args.base_url, args.model or DEFAULT_MODEL, api_key=os.environ.get(args.api_key_env), prompt=prompt,
            max_workers=args.max_workers, timeout=args.timeout, max_retries=args.max_retries,
            max_tokens=args.max_new_tokens, show_progress_bar=not args.no_progress,
        )  # fmt: skip
    if not args.parallel:
        raise DataError("--backend parallel needs --parallel", hint="add --parallel LANG=FILE ...")
    if args.parallel_format == "squad":
        files = {}
        for item in args.parallel:
            if "=" not in item:
                raise DataError(f"--parallel expects LANG=FILE for SQuAD files, got {item!r}",
                                hint="e.g. --parallel de=xquad.de.json")
            lang, path = item.split("=", 1)
            files[lang] = path
        return ParallelCorpusTranslator.from_squad(files)
    if args.parallel_format == "mkqa":
        return ParallelCorpusTranslator.from_mkqa(args.parallel[0])
    return ParallelCorpusTranslator.from_stsb_multi_mt(args.parallel[0], split=args.split)


def _translator_option(args: argparse.Namespace) -> str:
    """The option that names the translator, with its value (for messages)."""
    return f"--base-url {args.base_url}" if args.backend == "openai" else f"--backend {args.backend}"


def _check_reachable(base_url: str, timeout: float) -> None:
    """Refuse, before any row is read, an OpenAI-compatible translator whose host does not accept connections."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    if not parts.hostname:
        raise DataError("not a URL", where=f"--base-url {base_url}", hint="e.g. --base-url http://localhost:8000/v1")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=min(timeout, 10.0)).close()
    except OSError as error:
        raise DataError(f"the translator is unreachable ({error})", where=f"--base-url {base_url}",
                        hint="start the server or fix --base-url") from None


@cli_errors("conan-clr")
def main(argv: Sequence[str] | None = None) -> int:
    """``conan-clr``: build a CLR set from the command line, streaming; writes OUTPUT and the rejected rows (JSONL)
    batch by batch, and a report JSON."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("batch_size", "prefetch_batches", "generate_batch_size"):
        if getattr(args, name) < (0 if name == "prefetch_batches" else 1):
            raise DataError(f"--{name.replace('_', '-')} must be >= {0 if name == 'prefetch_batches' else 1}, "
                            f"got {getattr(args, name)}", hint="see conan-clr --help")
    source = RowStream(args.source, _parse_columns(args.columns), split=args.split, limit=args.limit)
    if args.backend == "openai":
        _check_reachable(args.base_url, args.timeout)
    translator = _make_translator(args)
    output = Path(args.output)
    try:
        report = write_clr_dataset(
            source, output, args.languages, translator, rejected_output=args.rejected, seed=args.seed,
            cache_dir=args.cache_dir, source_language=args.source_language, batch_size=args.batch_size,
            prefetch_batches=args.prefetch_batches, show_progress_bar=not args.no_progress, allow_empty=False,
        )  # fmt: skip
    except TranslationError as error:  # a refusal that retrying cannot fix (HTTP 4xx, a missing model, ...)
        raise DataError(str(error), where=_translator_option(args), hint="check the translator and its options") \
            from None
    finally:
        translator.close()
    failed = report.rejected.get("failed", 0)
    if failed and failed == report.num_source_rows - report.untranslated:  # not one translation came back
        for path in (output, Path(report.rejected_file or "")):
            if path.name:
                path.unlink(missing_ok=True)
        raise DataError(f"the translator failed on every text ({failed} of {failed}); nothing was written",
                        where=_translator_option(args), hint="check the translator (the warnings above say why)")
    report_path = Path(args.report) if args.report else output.with_suffix(".report.json")
    report_path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    print(report.summary())
    print(f"wrote {report.num_output_rows} rows to {output}, {report.num_rejected} rejected rows to "
          f"{report.rejected_file} and the report to {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
