"""Command line of :mod:`conan_hf.eval` (also installed as ``conan-eval``).

Examples::

    # STS-B dev (format inferred from the .csv), first 500 pairs, 256-dim Matryoshka embeddings
    python -m conan_hf.eval --model out/final --task sts --data $CONAN_DATA_DIR/sts/stsb-multi-mt/stsb-en-dev.csv \\
        --limit 500 --dim 256
    # SICK, Chinese STS-B, BEIR, Tatoeba, labelled files
    python -m conan_hf.eval --model out/final --data $CONAN_DATA_DIR/sts/sick/SICK_trial.txt
    python -m conan_hf.eval --model out/final --task sts --data $CONAN_DATA_DIR/sts/zh/sts-b-dev.txt
    python -m conan_hf.eval --model out/final --task retrieval --data $CONAN_DATA_DIR/retrieval/scifact --limit 100
    python -m conan_hf.eval --model out/final --task bitext --data $CONAN_DATA_DIR/xling/tatoeba/tatoeba.deu-eng
    python -m conan_hf.eval --model out/final --task clustering --data $CONAN_DATA_DIR/classification/thucnews/dev.txt
    # MKQA-style cross-lingual retrieval (Table 13) on XQuAD, or on MKQA with an English corpus
    python -m conan_hf.eval --model out/final --task xling --data $CONAN_DATA_DIR/xling/xquad --languages de es zh
    python -m conan_hf.eval --model out/final --task xling --data mkqa.jsonl nq_corpus/ --languages de ja zh_cn
    # Fig. 3: language-distribution plot of parallel STS-B sentences
    python -m conan_hf.eval --model out/final --task plot --data $CONAN_DATA_DIR/sts/stsb-multi-mt \\
        --languages en de zh --limit 300 --plot fig3.png
    # several models in one run, one table and one summary; results in results/<model>/<task>.json
    python -m conan_hf.eval --model base/ out/final --data $CONAN_DATA_DIR/sts/stsb-multi-mt/stsb-en-dev.csv \
        --output-folder results
    # Hub benchmarks (need the datasets from the Hub)
    python -m conan_hf.eval --model out/final --benchmark "MTEB(eng, v1)" --output-folder results

Each model is encoded with the prompts it was trained with (its saved ``prompts``; none for a task type it has no
prompt for), exactly as ``mteb.evaluate(SentenceTransformer(model), [task])`` does; ``--instruction`` and
``--instruction-template`` add task instructions on request. The table names the model, task, split, metric, score and
the prompts used. A warning on stderr says when an evaluated file or split is one the model was trained on.

The last line printed is a JSON object ``{task name: main score}`` (``{model: {task name: main score}}`` for several
models); strict JSON: a score that is undefined (NaN, e.g. a Spearman correlation when every gold score is the same)
is ``null``, and a warning on stderr says why.
Bad input (a malformed row, a NaN score in a data file, a missing file) stops with one line on stderr,
``conan-eval: error: <file>:<line>: <what>; <how to fix>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import DataError, DataFileNotFoundError, OneLineArgumentParser, cli_errors
from .tasks import TASK_KINDS, infer_task_kind

FORMAT_KINDS = {"stsb": "sts", "sick": "sts", "tsv": "sts", "pair": "pairs", "beir": "retrieval", "squad": "squad",
                "xquad": "xling", "mkqa": "xling", "tatoeba": "bitext", "labelled": "classification"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="conan-eval", description="Evaluate a SentenceTransformer (e.g. a Conan model) with mteb on local files "
        "or Hub benchmarks. The last printed line is a JSON summary {task: main score}.")
    parser.add_argument("--model", required=True, nargs="+", action="extend",
                        help="SentenceTransformer directory or Hub id; several (--model A B, or --model A --model B) "
                             "are evaluated one after the other into one table and one summary")
    parser.add_argument("--task", choices=[*TASK_KINDS, "plot"], help="kind of local evaluation (inferred from --data)")
    parser.add_argument("--data", nargs="+", help="data file(s)/folder(s): see the module docstring")
    parser.add_argument("--format", choices=sorted(FORMAT_KINDS), help="data format (inferred when omitted)")
    parser.add_argument("--benchmark", help='mteb benchmark name, e.g. "MTEB(eng, v1)" or "MTEB(cmn, v1)"')
    parser.add_argument("--tasks", nargs="+", default=[], help="mteb task names from the registry")
    parser.add_argument("--languages", nargs="+", help="query languages (xling/plot) or a language filter (mteb)")
    parser.add_argument("--language", help="language of a local data file (default: guessed)")
    parser.add_argument("--name", help="task name for results (default: from the file name)")
    parser.add_argument("--split", help="the qrels split of a BEIR folder; for other files, the split the results are "
                                        "labelled with (default: from the file name, e.g. dev for stsb-en-dev.csv)")
    parser.add_argument("--columns", nargs="+", metavar="NAME=COLUMN",
                        help="STS and pairs: the file's columns, as training's `columns:` (e.g. sentence1=text_a "
                             "sentence2=text_b score=label; an integer is a header-less CSV/TSV column index)")
    parser.add_argument("--limit", type=int, help="use only the first N rows / queries / sentences")
    parser.add_argument("--score-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="STS: the scale of the gold scores (default: 0 5); a score outside it stops with "
                             "file:line")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="a malformed row of a local data file: stop with file:line (default), or leave it out "
                             "and log it, as a training source's `on_error:`")
    parser.add_argument("--limit-corpus", type=int, help="BEIR: the relevant documents plus the first N documents")
    parser.add_argument("--dim", type=int, help="Matryoshka dimension to evaluate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-folder", help="write <model>/<task>.json result files and summary.json here")
    parser.add_argument("--instruction", help="prompt (instruction) for the local task, replacing the model's own")
    parser.add_argument("--instruction-template", default="none",
                        help="opt-in: a template with {instruction} that turns each task's own instruction into a "
                             "prompt for tasks the model has no prompt for; 'auto' reads it from the model's query "
                             "prompt; 'none' (default): only the prompts the model was trained with")
    parser.add_argument("--plot", help="PNG path for --task plot")
    parser.add_argument("--plot-method", choices=["tsne", "pca"], default="tsne")
    parser.add_argument("--device", help="device for the model (default: sentence-transformers' choice)")
    parser.add_argument("--verbose", action="store_true", help="log progress")
    return parser


def _texts_by_language(path: Path, languages: list[str], limit: int | None) -> dict[str, list[str]]:
    """Parallel texts for the plot: STS-B multi-mt (first sentences of ``stsb-<lang>-dev.csv``) or XQuAD questions."""
    from ..data.readers import read_squad, read_stsb_multi_mt

    texts: dict[str, list[str]] = {}
    for language in languages:
        stsb = path / f"stsb-{language}-dev.csv"
        xquad = path / f"xquad.{language}.json"
        if stsb.exists():
            texts[language] = [row["sentence1"] for row in read_stsb_multi_mt(path, language, "dev")[:limit]]
        elif xquad.exists():
            texts[language] = [row["query"] for row in read_squad(xquad)[:limit]]
        else:
            raise DataFileNotFoundError(f"neither stsb-{language}-dev.csv nor xquad.{language}.json exists",
                                        where=str(path), hint="choose --languages that the folder has")
    return texts


def _columns(items: list[str] | None) -> dict[str, str | int] | None:
    """``["sentence1=text_a", "score=2"]`` → ``{"sentence1": "text_a", "score": 2}``."""
    if not items:
        return None
    mapping: dict[str, str | int] = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise SystemExit(f"conan-eval: --columns takes NAME=COLUMN, got {item!r}")
        mapping[name] = int(column) if column.isdigit() else column
    return mapping


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute the parsed command; returns the JSON summary (``{task: score}``, or ``{model: {task: score}}`` for
    several models)."""
    from .run import format_table

    if not args.data and not args.benchmark and not args.tasks:
        raise DataError("nothing to evaluate", hint="give --data (local files), --tasks or --benchmark")
    kind = args.task or (FORMAT_KINDS[args.format] if args.format else None)
    if args.data:
        kind = kind or infer_task_kind(args.data[0])
    if kind == "plot" and len(args.model) > 1:
        raise DataError("--task plot draws one model", hint="give one --model")
    summaries: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for model_id in args.model:
        name, summary, model_rows = _run_model(args, model_id, kind)
        summaries[model_id if name in summaries else name] = summary
        rows.extend(model_rows)
    if rows:
        print(format_table(rows))
    return next(iter(summaries.values())) if len(summaries) == 1 else summaries


def _run_model(args: argparse.Namespace, model_id: str, kind: str | None) -> tuple[str, dict[str, Any],
                                                                                   list[dict[str, Any]]]:
    """Evaluate one model: its name, ``{task: score}`` and its summary rows (printed as one table by :func:`run`)."""
    from .run import evaluate, load_model

    loaded: list[Any] = []

    def model() -> Any:
        """The model, loaded on first use: data files are read (and checked) first, so bad data fails fast."""
        if not loaded:
            loaded.append(load_model(model_id, device=args.device))
        return loaded[0]

    template = None if args.instruction_template.lower() == "none" else args.instruction_template
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    name = model_id
    if args.data:
        if kind == "plot":
            from .plot import plot_language_distribution

            if not args.plot or not args.languages:
                raise DataError("--task plot needs --plot PATH and --languages", hint="add both options")
            texts = _texts_by_language(Path(args.data[0]), args.languages, args.limit or 300)
            path = plot_language_distribution(model(), texts, args.plot, method=args.plot_method, dim=args.dim,
                                              batch_size=args.batch_size)
            print(f"Wrote {path}")
            summary["plot"] = str(path)
        elif kind == "xling":
            from .xling import evaluate_cross_lingual, load_mkqa, load_xquad

            data_path = Path(args.data[0])
            if args.format == "mkqa" or data_path.suffix == ".jsonl":
                if len(args.data) < 2:
                    raise DataError("MKQA needs a corpus", hint="give --data mkqa.jsonl CORPUS [QRELS]")
                data = load_mkqa(data_path, args.data[1], languages=args.languages,
                                 qrels=args.data[2] if len(args.data) > 2 else None, limit_queries=args.limit)
            else:
                data = load_xquad(data_path, languages=args.languages or ["de", "es", "zh"], limit_queries=args.limit)
            instructions = {data.name: args.instruction} if args.instruction else None
            report = evaluate_cross_lingual(model(), data, batch_size=args.batch_size, output_folder=args.output_folder,
                                            dim=args.dim, instruction_template=template, instructions=instructions)
            name = report.eval_report.settings["model_name"]
            print(f"{name}: {data.name}")
            print(report.table())
            rows.extend(report.eval_report.summary)
            summary[data.name] = report.average["recall_at_20"]
        else:
            from .tasks import task_from_path

            options = {"fmt": args.format if kind == "sts" else None, "name": args.name, "language": args.language,
                       "split": args.split, "limit": args.limit, "limit_queries": args.limit,
                       "limit_corpus": args.limit_corpus, "columns": _columns(args.columns),
                       "on_error": args.on_error, "score_range": args.score_range}
            task = task_from_path(kind, args.data, **options)
            instructions = {task.metadata.name: args.instruction} if args.instruction else None
            report = evaluate(model(), [task], dim=args.dim, batch_size=args.batch_size,
                              output_folder=args.output_folder, instruction_template=template,
                              instructions=instructions, show_progress_bar=args.verbose)
            name = report.settings["model_name"]
            rows.extend(report.summary)
            summary.update(report.main_scores)
    if args.benchmark or args.tasks:
        report = evaluate(model(), args.tasks, benchmark=args.benchmark, languages=args.languages, dim=args.dim,
                          batch_size=args.batch_size, output_folder=args.output_folder,
                          instruction_template=template, show_progress_bar=args.verbose)
        name = report.settings["model_name"]
        rows.extend(report.summary)
        summary.update(report.main_scores)
    return name, summary, rows


def strict_json_summary(summary: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``summary`` with every non-finite score replaced by ``None`` (JSON has no NaN), and the names replaced."""
    clean, undefined = {}, []
    for name, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            clean[name] = None
            undefined.append(name)
        else:
            clean[name] = value
    return clean, undefined


@cli_errors("conan-eval")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m conan_hf.eval`` and ``conan-eval``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary, undefined = strict_json_summary(run(args))
    sys.stdout.flush()
    for name in undefined:
        print(f"conan-eval: warning: the score of {name} is undefined (NaN), reported as null: the metric cannot be "
              "computed on this data (e.g. a Spearman correlation when all gold scores, or all similarities, are "
              "equal)", file=sys.stderr, flush=True)
    print(json.dumps(summary, ensure_ascii=False, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
