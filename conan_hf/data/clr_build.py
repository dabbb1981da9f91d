"""The streaming CLR build (paper §3.3): assign a language to each row, translate the queries batch by batch with a
cache, validate the translations and hand the rows on (:func:`build_clr_dataset` in memory, :func:`write_clr_dataset`
to JSONL files)."""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import DataError
from .cache import RunMemo, TranslationCache
from .clr_languages import TABLE7, LanguageMix, _shuffled_language_indices, _weights, language_counts
from .clr_source import RowStream, _batches, _Columns, _scan_source, _TwoPassSource
from .sources import LOCATION
from .translate_parallel import ParallelCorpusTranslator
from .translator import CompletedTranslation, Translator
from .validate import TranslationValidator

# Records go to the logger of the public module, conan_hf.data.clr.
logger = logging.getLogger("conan_hf.data.clr")

__all__ = ["CLRReport", "build_clr_dataset", "write_clr_dataset"]


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

    Args:
        output: the JSONL file of output rows.
        rejected_output: the JSONL file of rejected rows (default: ``output`` with suffix ``.rejected.jsonl``).
        allow_empty: ``False`` raises a :class:`~conan_hf.errors.DataError` for a source without rows before any
            file is created.
        source, languages, translator, seed, ...: as in :func:`build_clr_dataset`.

    Returns:
        The :class:`CLRReport`, with ``rejected_file`` naming the rejected rows' file.
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
