"""Cross-lingual retrieval (CLR) set builder (paper §3.3, App. A, Table 7) and its command line, ``conan-clr``.

Only the queries of a monolingual retrieval set are translated, each into one language drawn from a mix (default
Table 7, normalised by its 106 % total); positives and negatives stay in the source language. The pieces:

- :mod:`conan_hf.data.clr_languages`: :data:`TABLE7`, :func:`language_shares`, :func:`language_counts`,
  :func:`assign_languages`;
- :mod:`conan_hf.data.clr_source`: :class:`RowStream` (a data file or dataset read lazily);
- :mod:`conan_hf.data.clr_build`: :func:`write_clr_dataset` (streaming, to JSONL), :func:`build_clr_dataset` (in
  memory) and :class:`CLRReport`;
- this module: :func:`main`, the ``conan-clr`` command, and every name above.

Output rows: ``{"id", "query" (language X), "positive", "negatives", "language" (X), "source_query", ...any other
source columns}``. The design (two streaming passes, cache, validation) is described in ``docs/data_layer.md``.

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
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError, OneLineArgumentParser, cli_errors
from .clr_build import CLRReport, build_clr_dataset, write_clr_dataset
from .clr_languages import TABLE7, LanguageMix, assign_languages, language_counts, language_shares
from .clr_languages import _shuffled_language_indices as _shuffled_language_indices
from .clr_source import RowStream
from .translate_parallel import ParallelCorpusTranslator
from .translator import TranslationError, Translator

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
