"""MKQA-style cross-lingual retrieval (paper §4.4, Tables 3 and 13).

Queries written in each language retrieve passages from one English corpus; the report gives Recall@20, Recall@100
and nDCG@10 per language and their average, like Table 13. The collection becomes one mteb retrieval task with a
subset per query language (``"de-en"``, ``"zh-en"``, ...), so mteb computes the metrics (pytrec_eval).

Two inputs:

* **XQuAD** (here ``$CONAN_DATA_DIR/xling/xquad``): the same questions over the same paragraphs in several languages.
  The corpus is the English paragraphs; a question in language X is relevant to the paragraph it was asked about.
* **MKQA** (``mkqa.jsonl``, one JSON object per line with ``example_id``, ``queries`` {lang: text} and ``answers``
  {lang: [{"text", "aliases"}]}) with an English passage corpus (BEIR ``corpus.jsonl`` or folder). As in BGE-M3's
  MKQA protocol, a passage is relevant to a query when it contains one of the query's English answers (case-
  insensitive), unless a qrels TSV (query-id = ``example_id``) is given.

Example::

    >>> from conan_hf.eval.xling import load_xquad, evaluate_cross_lingual
    >>> data = load_xquad("data/xling/xquad", languages=["de", "es", "zh"])
    >>> report = evaluate_cross_lingual(model, data)
    >>> print(report.table())
    Language  nDCG@10  Recall@20  Recall@100
    de          ...
    Avg         ...
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.readers import read_beir_corpus, read_qrels, read_squad, read_table
from ..errors import DataError
from .tasks import (
    RetrievalData,
    _fail,
    _row_error,
    make_retrieval_task,
    to_langscript,
)

logger = logging.getLogger(__name__)

TABLE_METRICS: tuple[tuple[str, str], ...] = (("ndcg_at_10", "nDCG@10"), ("recall_at_20", "Recall@20"),
                                              ("recall_at_100", "Recall@100"))
MKQA_LANGUAGES = ("ar", "da", "de", "en", "es", "fi", "fr", "he", "hu", "it", "ja", "km", "ko", "ms", "nl", "no", "pl",
                  "pt", "ru", "sv", "th", "tr", "vi", "zh_cn", "zh_hk", "zh_tw")


@dataclass
class CrossLingualData:
    """Queries in several languages against one corpus.

    Attributes:
        corpus: doc id -> {"title", "text"} (English for MKQA-style evaluation).
        queries: language -> {query id -> text}.
        qrels: query id -> {doc id -> relevance}; query ids are shared across languages (aligned questions).
        corpus_language: Language of the corpus.
        name: Task name used for results.
    """

    corpus: dict[str, dict[str, str]]
    queries: dict[str, dict[str, str]]
    qrels: dict[str, dict[str, int]]
    corpus_language: str = "en"
    name: str = "CrossLingualRetrieval"

    def subset(self, language: str) -> RetrievalData:
        queries = self.queries[language]
        return RetrievalData(corpus=self.corpus, queries=queries,
                             qrels={qid: self.qrels[qid] for qid in queries if qid in self.qrels})


def load_xquad(
    folder: str | Path,
    languages: Sequence[str] = ("de", "es", "zh"),
    corpus_language: str = "en",
    limit_queries: int | None = None,
) -> CrossLingualData:
    """XQuAD-style aligned SQuAD files ``xquad.<lang>.json`` as a cross-lingual collection.

    Args:
        folder: Folder with ``xquad.<lang>.json`` files.
        languages: Query languages.
        corpus_language: Language whose paragraphs form the corpus.
        limit_queries: Keep the first N questions (same ones in every language).
    """
    folder = Path(folder)
    corpus_file = folder / f"xquad.{corpus_language}.json"
    corpus_rows = read_squad(corpus_file)
    corpus = {pid: {"title": "", "text": paragraph["text"]} for pid, paragraph in corpus_rows.paragraphs.items()}
    qrels = {row["id"]: {row["paragraph_id"]: 1} for row in corpus_rows}
    order = [row["id"] for row in corpus_rows]
    if limit_queries is not None:
        order = order[:limit_queries]
    keep = set(order)
    queries: dict[str, dict[str, str]] = {}
    for language in languages:
        path = folder / f"xquad.{language}.json"
        by_id = {row["id"]: (row["query"], row["paragraph_id"]) for row in read_squad(path)}
        missing = keep - set(by_id)
        if missing:
            raise _fail(path, None, f"{len(missing)} question ids of {corpus_file.name} are missing (not aligned), "
                                    f"e.g. {sorted(missing)[:3]}")
        for qid in order:
            if by_id[qid][1] != next(iter(qrels[qid])):
                raise _fail(path, None, f"question {qid} belongs to paragraph {by_id[qid][1]} but to "
                                        f"{next(iter(qrels[qid]))} in {corpus_file.name}: files are not aligned")
        queries[language] = {qid: by_id[qid][0] for qid in order}
    return CrossLingualData(corpus=corpus, queries=queries, qrels={q: qrels[q] for q in order},
                            corpus_language=corpus_language, name="XQuADCrossLingualRetrieval")


def _answer_strings(answers: list[dict[str, Any]]) -> list[str]:
    strings = []
    for answer in answers or []:
        for text in [answer.get("text")] + list(answer.get("aliases") or []):
            if text and text.strip():
                strings.append(text.strip().lower())
    return strings


def load_mkqa(
    path: str | Path,
    corpus: str | Path,
    languages: Sequence[str] | None = None,
    qrels: str | Path | None = None,
    limit_queries: int | None = None,
) -> CrossLingualData:
    """MKQA jsonl plus an English passage corpus as a cross-lingual collection.

    Args:
        path: ``mkqa.jsonl``.
        corpus: BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``) or a folder holding it.
        languages: Query languages (MKQA codes, e.g. ``"de"``, ``"zh_cn"``); default: all 26 of MKQA but English.
        qrels: Optional qrels TSV (``query-id`` = ``example_id``); otherwise answer containment decides relevance.
        limit_queries: Keep the first N examples that have at least one relevant passage.
    """
    path = Path(path)
    corpus_path = Path(corpus)
    if corpus_path.is_dir():
        corpus_path = corpus_path / "corpus.jsonl"
    docs = read_beir_corpus(corpus_path)
    languages = list(languages) if languages is not None else [x for x in MKQA_LANGUAGES if x != "en"]

    # Answers decide relevance only without qrels; an example without answers has no relevant passage then.
    columns = {"example_id": "example_id", "queries": "queries"}
    if qrels is None:
        columns["answers"] = "answers"
    examples = read_table(path, columns, format="jsonl", allow_empty=["answers"])
    for obj in examples:
        if not isinstance(obj["queries"], dict):
            got = type(obj["queries"]).__name__
            raise _row_error(obj, f"'queries' must be an object {{language: text}}, got {got}")

    judged: dict[str, dict[str, int]] = {}
    if qrels is not None:
        for judgement in read_qrels(qrels):
            judged.setdefault(judgement["query_id"], {})[judgement["corpus_id"]] = judgement["score"]
    else:
        # Relevance by answer containment: one pass over the corpus per distinct answer string.
        by_answer: dict[str, list[str]] = {}
        for obj in examples:
            for answer in set(_answer_strings((obj["answers"] or {}).get("en", []))):
                by_answer.setdefault(answer, []).append(str(obj["example_id"]))
        lowered = {doc_id: (doc["title"] + " " + doc["text"]).lower() for doc_id, doc in docs.items()}
        for answer, qids in by_answer.items():
            hits = [doc_id for doc_id, text in lowered.items() if answer in text]
            for qid in qids:
                for doc_id in hits:
                    judged.setdefault(qid, {})[doc_id] = 1

    queries: dict[str, dict[str, str]] = {language: {} for language in languages}
    kept: dict[str, dict[str, int]] = {}
    for obj in examples:
        qid = str(obj["example_id"])
        if not judged.get(qid):
            continue
        for language in languages:
            text = obj["queries"].get(language)
            if text is None:
                raise _row_error(obj, f"example {qid} has no query in language {language!r}",
                                 hint="choose --languages the file has")
            if not isinstance(text, str) or not text.strip():
                raise _row_error(obj, f"the query in {language!r} must be a non-empty text, got {text!r}")
            queries[language][qid] = text
        kept[qid] = judged[qid]
        if limit_queries is not None and len(kept) >= limit_queries:
            break
    if not kept:
        raise DataError(f"no MKQA query has a relevant passage in {corpus_path}", where=str(path),
                        hint="use a corpus that contains the answers, or give qrels")
    return CrossLingualData(corpus=docs, queries=queries, qrels=kept, corpus_language="en",
                            name="MKQACrossLingualRetrieval")


def cross_lingual_task(data: CrossLingualData, *, split: str = "test", prompt: str | dict[str, str] | None = None):
    """The mteb retrieval task of a :class:`CrossLingualData`: one subset ``"<lang>-<corpus lang>"`` per language,
    main score Recall@20 (MKQA's headline metric in Table 3)."""
    subsets = {f"{lang}-{data.corpus_language}": data.subset(lang) for lang in data.queries}
    languages = {f"{lang}-{data.corpus_language}": sorted({to_langscript(lang), to_langscript(data.corpus_language)})
                 for lang in data.queries}
    return make_retrieval_task(
        data.name, subsets, languages, split=split, source=data.name, prompt=prompt, main_score="recall_at_20",
        description=f"Queries in {', '.join(data.queries)} against a {data.corpus_language} corpus "
                    f"({len(data.corpus)} passages).",
    )


@dataclass
class CrossLingualReport:
    """Per-language Recall@20 / Recall@100 / nDCG@10 and their average (Table 13)."""

    per_language: dict[str, dict[str, float]]
    task_result: Any = None
    eval_report: Any = None
    metrics: tuple[tuple[str, str], ...] = field(default=TABLE_METRICS)

    @property
    def average(self) -> dict[str, float]:
        return {key: sum(row[key] for row in self.per_language.values()) / len(self.per_language)
                for key, _ in self.metrics}

    def table(self, percent: bool = True) -> str:
        """The report as a plain-text table (values in %, like the paper)."""
        scale = 100 if percent else 1
        header = f"{'Language':<9}" + "".join(f"{label:>12}" for _, label in self.metrics)
        lines = [header]
        for language, row in list(self.per_language.items()) + [("Avg", self.average)]:
            lines.append(f"{language:<9}" + "".join(f"{scale * row[key]:>12.2f}" for key, _ in self.metrics))
        return "\n".join(lines)

    def markdown(self) -> str:
        head = "| Language | " + " | ".join(label for _, label in self.metrics) + " |"
        rule = "|---" * (len(self.metrics) + 1) + "|"
        rows = [f"| {language} | " + " | ".join(f"{100 * row[key]:.2f}" for key, _ in self.metrics) + " |"
                for language, row in list(self.per_language.items()) + [("Avg", self.average)]]
        return "\n".join([head, rule, *rows])

    def to_dict(self) -> dict[str, Any]:
        return {"per_language": self.per_language, "average": self.average}


def report_from_scores(scores: Mapping[str, Sequence[Mapping[str, Any]]]) -> CrossLingualReport:
    """Build the per-language report from mteb task-result ``scores`` ({split: [subset scores]})."""
    per_language: dict[str, dict[str, float]] = {}
    for entries in scores.values():
        for entry in entries:
            language = entry["hf_subset"].split("-")[0]
            per_language[language] = {key: float(entry[key]) for key, _ in TABLE_METRICS}
    return CrossLingualReport(per_language=per_language)


def evaluate_cross_lingual(
    model: Any,
    data: CrossLingualData,
    *,
    batch_size: int = 32,
    output_folder: str | Path | None = None,
    dim: int | None = None,
    show_progress_bar: bool = False,
    **evaluate_kwargs: Any,
) -> CrossLingualReport:
    """Run the cross-lingual retrieval evaluation of ``data`` with mteb and return the Table-13 style report.

    ``model`` is a SentenceTransformer (or a path), evaluated through :func:`conan_hf.eval.run.evaluate` (query
    instructions, MRL ``dim``, result files), or any mteb encoder (an object with ``encode`` and
    ``mteb_model_meta``), evaluated with ``mteb.evaluate`` directly.
    """
    task = cross_lingual_task(data)
    if _is_mteb_encoder(model):
        import mteb

        from .run import results_folder_name

        result = mteb.evaluate(model, [task], cache=None, co2_tracker=False,
                               encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
                               show_progress_bar=show_progress_bar)
        if output_folder is not None:  # the layout of conan_hf.eval.run.evaluate: <output>/<model>/<task>.json
            folder = Path(output_folder) / results_folder_name(str(model.mteb_model_meta.name), dim)
            folder.mkdir(parents=True, exist_ok=True)
            result.task_results[0].to_disk(folder / f"{task.metadata.name}.json")
        eval_report = None
    else:
        import tempfile

        from .run import evaluate

        # The corpus is the same for every language subset: mteb's embedding cache encodes it once.
        with tempfile.TemporaryDirectory(prefix="conan-xling-") as embedding_cache:
            eval_report = evaluate(model, [task], batch_size=batch_size, output_folder=output_folder, dim=dim,
                                   show_progress_bar=show_progress_bar,
                                   embedding_cache=evaluate_kwargs.pop("embedding_cache", embedding_cache),
                                   **evaluate_kwargs)
        result = eval_report.model_result
    task_result = result.task_results[0]
    report = report_from_scores(task_result.scores)
    report.task_result = task_result
    report.eval_report = eval_report
    if output_folder is not None:
        target = Path(output_folder) / f"{data.name}_table.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    return report


def _is_mteb_encoder(model: Any) -> bool:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover
        SentenceTransformer = ()  # type: ignore[assignment]
    return not isinstance(model, (str, Path, SentenceTransformer)) and hasattr(model, "mteb_model_meta")


__all__ = [
    "MKQA_LANGUAGES",
    "TABLE_METRICS",
    "CrossLingualData",
    "CrossLingualReport",
    "cross_lingual_task",
    "evaluate_cross_lingual",
    "load_mkqa",
    "load_xquad",
    "report_from_scores",
]
