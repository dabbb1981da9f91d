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
:func:`build_clr_dataset` assigns, translates (with a cache), validates and emits rows for the supervised stage::

    {"id", "query" (language X), "positive" (source language), "negatives" (source language), "language" (X),
     "source_query", ...any other source columns}

Rows whose query is assigned the source language keep their query untranslated. Rejected translations are dropped,
counted per reason in the :class:`CLRReport` and listed in ``report.rejected_examples``.

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
        --cache-dir clr-cache --columns query=query positive=pos negatives=neg
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import DataError, OneLineArgumentParser, cli_errors, location_of
from .cache import TranslationCache
from .translate import ParallelCorpusTranslator, Translator
from .validate import TranslationValidator

logger = logging.getLogger(__name__)

__all__ = [
    "TABLE7",
    "CLRReport",
    "assign_languages",
    "build_clr_dataset",
    "language_counts",
    "language_shares",
    "main",
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
    counts = language_counts(n, languages)
    codes = [code for code, count in counts.items() for _ in range(count)]
    random.Random(seed).shuffle(codes)
    return codes


@dataclass
class CLRReport:
    """What :func:`build_clr_dataset` did.

    Attributes:
        num_source_rows / num_output_rows: rows read / rows emitted.
        assigned: rows assigned to each language; ``kept`` the rows emitted per language.
        untranslated: rows assigned the source language (query kept as is).
        translated: distinct texts sent to the translator in this run (cache hits excluded).
        cache_hits / cache_misses: cache lookups of distinct (text, language) pairs in this run.
        rejected: rejected rows per reason (see :data:`conan_hf.data.validate.REJECTION_REASONS`);
            ``rejected_by_language`` the same per language; ``rejected_examples`` every rejected row
            (``id``, ``language``, ``source``, ``output``, ``reason``).
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
            lines.append("  rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())))
        lines.append("  per language (kept/assigned): " + ", ".join(
            f"{code} {self.kept.get(code, 0)}/{count}" for code, count in self.assigned.items()
        ))  # fmt: skip
        return "\n".join(lines)


def _as_rows(source: Any) -> list[dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        from .readers import load_rows

        return list(load_rows(source))
    # `row.copy()` keeps a reader Row's location (file:line) for the messages below.
    return [row.copy() if isinstance(row, dict) else dict(row) for row in source]


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
    batch_size: int = 256,
    show_progress_bar: bool = True,
) -> tuple[Any, CLRReport]:
    """Build a cross-lingual retrieval set by translating queries into a language mix (paper §3.3).

    Args:
        source: rows with a query, a positive and optionally negatives (a list, or one string) — any iterable of
            dicts, a ``datasets.Dataset``, or a path/Hub name read by :func:`conan_hf.data.readers.load_rows`.
        languages: the target mix: ``{code: weight}`` (normalised by its sum), a list of codes (equal shares) or
            ``"table7"``. Default: Table 7 of the paper (sums to 106 %, normalised).
        translator: a :class:`~conan_hf.data.translate.Translator`. Default: a
            :class:`~conan_hf.data.translate.TransformersTranslator` with Qwen/Qwen2.5-7B-Instruct, as in the paper.
        seed: seeds the language assignment.
        cache_dir: folder of the on-disk translation cache; an interrupted build rerun with the same cache translates
            only what is missing. ``None``: no cache.
        source_language: the language of the source queries; rows assigned it keep their query untranslated.
        validator: checks each translation; default: ``translator.default_validator()``.
        query_column / positive_column / negatives_column / id_column: source column names. Rows without an id get
            their position as id.
        batch_size: texts per translator call; the cache is written after each call.

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``id``, ``query``, ``positive``, [``negatives``],
        ``language``, ``source_query`` plus any other source columns, in source order; and a :class:`CLRReport`.
    """
    from datasets import Dataset

    if translator is None:
        from .translate import TransformersTranslator

        translator = TransformersTranslator()
    if validator is None:
        validator = translator.default_validator()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    rows = _as_rows(source)
    weights = _weights(languages)
    if isinstance(translator, ParallelCorpusTranslator):
        missing = sorted(set(weights) - set(translator.languages) - {source_language})
        if missing:
            raise ValueError(
                f"the parallel corpus has no {missing} side (it has {translator.languages}); "
                "restrict `languages` to those, e.g. {c: TABLE7[c] for c in available}"
            )
    for index, row in enumerate(rows):
        for column in (query_column, positive_column):
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                got = "nothing" if value is None or value == "" else f"{type(value).__name__} {value!r}"
                where = location_of(row)  # file:line of rows read from a file; in-memory rows: their index
                raise DataError(f"{'' if where else f'source row {index} '}has no text in column {column!r} (got "
                                f"{got}; the row has {sorted(row)})", where=where,
                                hint="give every row a non-empty text there, or map another column")
        row.setdefault(id_column, str(index))
        negatives = row.get(negatives_column)
        if isinstance(negatives, str):
            row[negatives_column] = [negatives]
    ids = [str(row[id_column]) for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, c in Counter(ids).items() if c > 1)
        second = [index for index, row_id in enumerate(ids) if row_id == duplicate][1]
        where = location_of(rows[second], f"source row {second}")
        raise DataError(f"duplicate id {duplicate!r} in column {id_column!r}", where=where,
                        hint="ids must be unique: fix the ids or leave the column out (row positions become ids)")

    assignment = assign_languages(len(rows), seed=seed, languages=weights)
    report = CLRReport(num_source_rows=len(rows), translator=translator.model_name)
    assigned = Counter(assignment)
    report.assigned = {code: assigned[code] for code in weights if assigned[code]}  # in mix order

    groups: dict[str, list[int]] = {}
    for index, code in enumerate(assignment):
        groups.setdefault(code, []).append(index)

    cache = TranslationCache(cache_dir) if cache_dir is not None and translator.cacheable else None
    translated_before = translator.num_translated
    outputs: dict[int, str | None] = {}
    rejected_by_language: Counter[str] = Counter()
    try:
        for code in report.assigned:
            index = groups[code]
            if code == source_language:
                for i in index:
                    outputs[i] = rows[i][query_column]
                report.untranslated += len(index)
                continue
            texts = [rows[i][query_column] for i in index]
            translations = _translate_group(
                translator, cache, texts, [ids[i] for i in index], code, batch_size, show_progress_bar
            )
            for i, text, result in zip(index, texts, translations):
                why = validator.check(text, result, code, failure_reason=translator.failure_reason)
                if why is None:
                    outputs[i] = result
                else:
                    rejected_by_language[code] += 1
                    report.rejected_examples.append(
                        {"id": ids[i], "language": code, "source": text, "output": result, "reason": why}
                    )
    finally:
        if cache is not None:
            report.cache_hits, report.cache_misses = cache.hits, cache.misses
            cache.close()
    report.translated = translator.num_translated - translated_before
    report.rejected = dict(Counter(example["reason"] for example in report.rejected_examples))
    report.rejected_by_language = dict(rejected_by_language)

    has_negatives = any(negatives_column in row for row in rows)
    records = []
    for i, row in enumerate(rows):
        if i not in outputs:
            continue
        record = {
            "id": ids[i],
            "query": outputs[i],
            "positive": row[positive_column],
        }
        if has_negatives:
            record["negatives"] = list(row.get(negatives_column) or [])
        record["language"] = assignment[i]
        record["source_query"] = row[query_column]
        taken = {id_column, query_column, positive_column, negatives_column}
        record.update({k: v for k, v in row.items() if k not in taken and k not in record})
        records.append(record)
    report.kept = dict(Counter(r["language"] for r in records))
    report.kept = {code: report.kept.get(code, 0) for code in report.assigned}
    report.num_output_rows = len(records)
    logger.info(report.summary())
    return Dataset.from_list(records), report


def _translate_group(
    translator: Translator,
    cache: TranslationCache | None,
    texts: list[str],
    ids: list[str],
    language: str,
    batch_size: int,
    show_progress_bar: bool,
) -> list[str | None]:
    """Raw translator outputs for one language group, aligned with ``texts``."""
    if not translator.cacheable:
        outputs: list[str | None] = []
        for start in range(0, len(texts), batch_size):
            outputs.extend(
                translator.translate(texts[start : start + batch_size], language, ids[start : start + batch_size])
            )
        if len(outputs) != len(texts):
            raise RuntimeError(f"{type(translator).__name__} returned {len(outputs)} outputs for {len(texts)} texts")
        return outputs

    # The same query text needs one translation per language, whichever rows carry it.
    first_id: dict[str, str] = {}
    for text, row_id in zip(texts, ids):
        first_id.setdefault(text, row_id)
    unique = list(first_id)
    results = dict(cache.get_many(unique, language, translator.model_name, translator.cache_prompt)) if cache else {}
    pending = [text for text in unique if text not in results]
    with tqdm(total=len(pending), desc=f"CLR {language}", unit="query", disable=not show_progress_bar) as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            out = translator.translate(chunk, language, [first_id[t] for t in chunk])
            if len(out) != len(chunk):
                raise RuntimeError(f"{type(translator).__name__} returned {len(out)} outputs for {len(chunk)} texts")
            if cache is not None:
                cache.put_many(
                    ((t, language, o) for t, o in zip(chunk, out)), translator.model_name, translator.cache_prompt
                )
            results.update(zip(chunk, out))
            bar.update(len(chunk))
    return [results[text] for text in texts]


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
    parser.add_argument("source", help="JSONL/CSV/TSV file, SQuAD JSON, BEIR folder or Hub dataset name")
    parser.add_argument("-o", "--output", required=True, help="output JSONL file")
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
    parser.add_argument("--batch-size", type=int, default=16, help="transformers: queries per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--base-url", default="http://localhost:8000/v1", help="openai: API root")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env var holding the API key")
    parser.add_argument("--max-workers", type=int, default=8, help="openai: concurrent requests")
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
            args.model or DEFAULT_MODEL, prompt=prompt, batch_size=args.batch_size,
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


@cli_errors("conan-clr")
def main(argv: Sequence[str] | None = None) -> int:
    """``conan-clr``: build a CLR set from the command line; writes OUTPUT (JSONL) and a report JSON."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .readers import load_rows

    columns = _parse_columns(args.columns)
    rows = list(load_rows(args.source, columns, split=args.split))
    if not rows:
        raise DataError("no rows to translate", where=str(args.source),
                        hint="give a source with (query, positive) rows; an empty file would build an empty set")
    if args.limit is not None:
        rows = rows[: args.limit]
    translator = _make_translator(args)
    dataset, report = build_clr_dataset(
        rows, args.languages, translator, seed=args.seed, cache_dir=args.cache_dir,
        source_language=args.source_language, show_progress_bar=not args.no_progress,
    )  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as handle:
        for record in dataset:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    report_path = Path(args.report) if args.report else output.with_suffix(".report.json")
    report_path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    print(report.summary())
    print(f"wrote {len(dataset)} rows to {output} and the report to {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
