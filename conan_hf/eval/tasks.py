"""mteb tasks built from local files, so every evaluation of the paper (§4) runs without the Hugging Face Hub.

Each builder reads its data through :mod:`conan_hf.data.readers`, the readers the training stages use (so evaluation
accepts the same files, JSONL/CSV/TSV with a column mapping included, and a malformed row raises the same error
naming the file and line), and returns an *instance* of a real mteb task class (`AbsTaskSTS`, `AbsTaskRetrieval`,
`AbsTaskBitextMining`, ...) whose `load_data` serves the rows already read. mteb then does everything else: encoding
through the model's `encode_query` / `encode_document` / `encode` with the right prompts, the similarity computations
and the metrics (Spearman of cosine, nDCG@k / Recall@k via pytrec_eval, F1 of bitext mining, V-measure, ...). Nothing
here computes a metric.

Supported inputs

==========================  ==============================================================  ====================
builder                     format                                                          ``fmt`` name
==========================  ==============================================================  ====================
:func:`sts_task`            STS-B CSV without header ``s1,s2,score``                        ``"stsb"``
                            SICK TSV with header (``sentence_A``, ``sentence_B``,           ``"sick"``
                            ``relatedness_score``)
                            Chinese STS TSV ``s1\\ts2\\tscore``                             ``"tsv"``
                            JSONL rows ``sentence1``, ``sentence2``, ``score`` (the files   ``"jsonl"``
                            stage 4 trains on), or any table with ``columns=``
:func:`pair_task`           ``s1\\ts2\\tlabel`` (AFQMC, LCQMC, ...), or a header TSV with     ``"pair"``
                            ``sentence1``, ``sentence2``, ``label`` (PAWS-X), or ``columns=``
:func:`retrieval_task`      BEIR folder (``corpus.jsonl``, ``queries.jsonl``,               ``"beir"``
                            ``qrels/<split>.tsv``, header line optional)
:func:`squad_retrieval_task` SQuAD-format JSON: questions retrieve their paragraph           ``"squad"``
:func:`bitext_task`         two line-aligned text files (Tatoeba)                           ``"tatoeba"``
:func:`classification_task` labelled CSV (header with a text and a label column) or TSV     ``"labelled"``
:func:`clustering_task`     without header (``...\\ttext\\tlabel``: last column is the label)
==========================  ==============================================================  ====================

Cross-lingual XQuAD / MKQA retrieval lives in :mod:`conan_hf.eval.xling`, built on :func:`make_retrieval_task`.

Example::

    >>> import mteb
    >>> from sentence_transformers import SentenceTransformer
    >>> from conan_hf.eval.tasks import sts_task, retrieval_task
    >>> tasks = [sts_task("data/sts/stsb-multi-mt/stsb-en-dev.csv", limit=200),
    ...          retrieval_task("data/retrieval/scifact", limit_queries=50)]
    >>> results = mteb.evaluate(SentenceTransformer("my-model"), tasks, cache=None)
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mteb import AbsTask

from conan_hf.data import readers
from conan_hf.data.readers import DataFormatError, OnError, Row, Rows
from conan_hf.errors import (DEFAULT_SCORE_RANGE, DataError, DataFileNotFoundError, check_score_range, finite_float,
                             location_of, score_range_of)

logger = logging.getLogger(__name__)

# Short language names (file names, MKQA, XQuAD, Tatoeba) -> the BCP-47 style codes mteb validates.
LANGUAGE_CODES: dict[str, str] = {
    "en": "eng-Latn", "eng": "eng-Latn", "zh": "zho-Hans", "zh_cn": "zho-Hans", "zh-cn": "zho-Hans",
    "cmn": "cmn-Hans", "zh_tw": "zho-Hant", "zh_hk": "zho-Hant", "de": "deu-Latn", "deu": "deu-Latn",
    "es": "spa-Latn", "spa": "spa-Latn", "fr": "fra-Latn", "fra": "fra-Latn", "it": "ita-Latn", "ita": "ita-Latn",
    "ja": "jpn-Jpan", "jpn": "jpn-Jpan", "nl": "nld-Latn", "pl": "pol-Latn", "pt": "por-Latn", "ru": "rus-Cyrl",
    "ar": "ara-Arab", "da": "dan-Latn", "fi": "fin-Latn", "he": "heb-Hebr", "hu": "hun-Latn", "km": "khm-Khmr",
    "ko": "kor-Hang", "ms": "msa-Latn", "no": "nob-Latn", "sv": "swe-Latn", "th": "tha-Thai", "tr": "tur-Latn",
    "vi": "vie-Latn", "el": "ell-Grek", "hi": "hin-Deva", "ro": "ron-Latn",
}

# Default instructions (the `prompt` of the task metadata) for instruction-following models; `run.evaluate` formats
# them with the model's instruction template. Retrieval instructions apply to queries only.
DEFAULT_INSTRUCTIONS: dict[str, str | dict[str, str]] = {
    "STS": "Retrieve semantically similar text.",
    "PairClassification": "Retrieve text that is semantically similar to the given text.",
    "Retrieval": {"query": "Given a question, retrieve passages that answer the question."},
    "BitextMining": "Retrieve parallel sentences.",
    "Classification": "Classify the given text into its category.",
    "Clustering": "Identify the topic or category of the given text.",
}

_CJK = re.compile(r"[\u4e00-\u9fff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def to_langscript(language: str) -> str:
    """Map ``"en"`` / ``"deu"`` / ``"zh_cn"`` / ``"eng-Latn"`` to the ``xxx-Scrp`` code mteb expects."""
    if re.fullmatch(r"[a-z]{3}-[A-Z][a-z]{3}", language):
        return language
    try:
        return LANGUAGE_CODES[language.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown language {language!r}: pass an mteb code such as 'eng-Latn' or one of {sorted(LANGUAGE_CODES)}."
        ) from None


def guess_language(path: str | Path, texts: Sequence[str] = ()) -> str:
    """Best guess of a file's language: a language token in its name (``stsb-de-dev.csv``), else its script."""
    for token in re.split(r"[-_.]", Path(path).name.lower()):
        if token in LANGUAGE_CODES and token not in {"no"}:
            return LANGUAGE_CODES[token]
    sample = "".join(texts[:200])
    if sample:
        if len(_KANA.findall(sample)) > 0.05 * len(sample):
            return "jpn-Jpan"
        if len(_HANGUL.findall(sample)) > 0.2 * len(sample):
            return "kor-Hang"
        if len(_CJK.findall(sample)) > 0.2 * len(sample):
            return "zho-Hans"
        if len(_CYRILLIC.findall(sample)) > 0.2 * len(sample):
            return "rus-Cyrl"
    return "eng-Latn"


#: Split names recognised in a file name (``stsb-en-dev.csv`` is a dev split, ``SICK_trial.txt`` a trial split).
SPLIT_NAMES = ("train", "dev", "validation", "trial", "test")


def split_from_name(path: str | Path, default: str = "test") -> str:
    """The split a data file holds, from a token of its name (``stsb-en-dev.csv`` → ``"dev"``), else ``default``.

    >>> split_from_name("stsb-en-dev.csv"), split_from_name("SICK_trial.txt"), split_from_name("pairs.jsonl")
    ('dev', 'trial', 'test')
    """
    tokens = re.split(r"[-_.]", Path(path).name.lower())
    return next((token for token in tokens if token in SPLIT_NAMES), default)


def task_name_from_path(prefix: str, path: str | Path) -> str:
    """A readable, file-derived task name such as ``LocalSTS-stsb-en-dev``."""
    path = Path(path)
    stem = path.name if path.is_dir() else path.stem
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}"


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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation data, read by conan_hf.data.readers (the readers training uses): same formats, same file:line errors
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# mteb task construction
# ----------------------------------------------------------------------------------------------------------------


def _metadata(
    name: str,
    task_type: str,
    main_score: str,
    eval_langs: list[str] | dict[str, list[str]],
    split: str,
    source: str,
    description: str,
    prompt: str | dict[str, str] | None,
):
    from mteb import TaskMetadata

    return TaskMetadata(
        name=name,
        description=description,
        reference=None,
        dataset={"path": f"local:{source}", "revision": "local"},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=eval_langs,
        main_score=main_score,
        prompt=prompt if prompt is not None else DEFAULT_INSTRUCTIONS.get(task_type),
        sample_creation="found",
        bibtex_citation="",
    )


def _instantiate(base: type, metadata, build: Callable[[], Any], **class_attributes: Any) -> AbsTask:
    """A task instance of a fresh subclass of `base` whose class-level `metadata` is this task's.

    mteb reads `metadata` from the class (and drops instance-level metadata when it unloads data), so each local
    task gets its own small subclass; `build` turns the already-validated rows into the mteb dataset layout.
    """

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = build()
        self.data_loaded = True

    attributes = {"metadata": metadata, "load_data": load_data, "__module__": __name__, **class_attributes}
    cls = type(re.sub(r"\W", "_", metadata.name), (base,), attributes)
    return cls()


def _datasets(split: str, columns: dict[str, list]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({split: Dataset.from_dict(columns)})


def sts_task(
    path: str | Path,
    *,
    fmt: str | None = None,
    name: str | None = None,
    language: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    prompt: str | None = None,
    columns: dict[str, str | int] | None = None,
    on_error: OnError = "raise",
    score_range: Sequence[float] | None = None,
) -> AbsTask:
    """An mteb STS task (main score: Spearman of cosine similarity) from an STS-B CSV, SICK TSV, ``s1\\ts2\\tscore``
    file, or a JSONL / table file with ``sentence1``, ``sentence2``, ``score`` columns (or a ``columns`` mapping, as
    training takes it). See :func:`read_sts`. ``split`` labels the results (default: from the file name, see
    :func:`split_from_name`). ``score_range`` is the scale of the gold scores (default ``[0, 5]``, which holds STS-B's
    0-5 and SICK's 1-5): a score outside it is an error naming its file:line."""
    from mteb.abstasks.sts import AbsTaskSTS

    fmt = fmt or infer_sts_format(path)
    low, high = score_range_of(DEFAULT_SCORE_RANGE if score_range is None else score_range, "--score-range")
    data = read_sts(path, fmt=fmt, limit=limit, columns=columns, on_error=on_error, score_range=(low, high))
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, data.sentence1)
    metadata = _metadata(name or task_name_from_path("LocalSTS", path), "STS", "cosine_spearman", [lang], split,
                         str(path), f"STS pairs from {Path(path).name} ({fmt} format).", prompt)
    return _instantiate(
        AbsTaskSTS, metadata,
        lambda: _datasets(split, {"sentence1": data.sentence1, "sentence2": data.sentence2, "score": data.score}),
        min_score=low, max_score=high,
    )


def pair_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    prompt: str | None = None,
    columns: dict[str, str | int] | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb pair-classification task (main score: max average precision over similarity functions) from a
    ``s1\\ts2\\tlabel`` file, or any table with ``sentence1``/``sentence2``/``label`` columns (or a ``columns``
    mapping). See :func:`read_pairs`."""
    from mteb.abstasks.pair_classification import AbsTaskPairClassification

    data = read_pairs(path, limit=limit, columns=columns, on_error=on_error)
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, data.sentence1)
    metadata = _metadata(name or task_name_from_path("LocalPairs", path), "PairClassification", "max_ap", [lang],
                         split, str(path), f"Sentence-pair classification from {Path(path).name}.", prompt)
    labels = [int(x) for x in data.score]
    return _instantiate(
        AbsTaskPairClassification, metadata,
        lambda: _datasets(split, {"sentence1": data.sentence1, "sentence2": data.sentence2, "labels": labels}),
    )


def make_retrieval_task(
    name: str,
    subsets: dict[str, RetrievalData],
    languages: dict[str, list[str]] | list[str],
    *,
    split: str = "test",
    source: str = "",
    description: str = "",
    prompt: str | dict[str, str] | None = None,
    main_score: str = "ndcg_at_10",
    k_values: Sequence[int] = (1, 3, 5, 10, 20, 100, 1000),
) -> AbsTask:
    """An mteb retrieval task from in-memory collections, one per subset (``"default"`` for a monolingual task,
    ``"de-en"`` style names for cross-lingual subsets with ``languages`` mapping each subset to its languages)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    metadata = _metadata(name, "Retrieval", main_score, languages, split, source, description or name, prompt)

    def build() -> dict[str, dict[str, RetrievalSplitData]]:
        dataset = {}
        for subset, data in subsets.items():
            corpus = Dataset.from_dict({
                "id": list(data.corpus),
                "title": [doc.get("title", "") for doc in data.corpus.values()],
                "text": [doc["text"] for doc in data.corpus.values()],
            })
            queries = Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())})
            dataset[subset] = {split: RetrievalSplitData(
                corpus=corpus, queries=queries, relevant_docs=data.qrels, top_ranked=None)}
        return dataset

    return _instantiate(AbsTaskRetrieval, metadata, build, k_values=tuple(k_values))


def retrieval_task(
    folder: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    split: str | None = None,
    limit_queries: int | None = None,
    limit_corpus: int | None = None,
    prompt: str | dict[str, str] | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb retrieval task (main score nDCG@10; Recall@k, MAP, MRR also reported) from a BEIR folder.
    See :func:`beir_retrieval_data` for the split and the limits."""
    data, qrels_split = beir_retrieval_data(folder, split=split, limit_queries=limit_queries,
                                            limit_corpus=limit_corpus, on_error=on_error)
    lang = to_langscript(language) if language else guess_language(folder, list(data.queries.values()))
    return make_retrieval_task(
        name or task_name_from_path("LocalRetrieval", folder), {"default": data}, [lang], split=qrels_split,
        source=str(folder), description=f"BEIR retrieval from {Path(folder).name} ({qrels_split} qrels).",
        prompt=prompt,
    )


def squad_retrieval_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    limit_queries: int | None = None,
    split: str | None = None,
    prompt: str | dict[str, str] | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """Monolingual retrieval from a SQuAD-format file (e.g. CMRC2018): each question retrieves its paragraph.
    See :func:`squad_retrieval_data`; ``on_error="skip"`` leaves out (and logs) questions without text."""
    data = squad_retrieval_data(path, limit_queries=limit_queries, on_error=on_error)
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, list(data.queries.values()))
    return make_retrieval_task(
        name or task_name_from_path("LocalSQuADRetrieval", path), {"default": data}, [lang], split=split,
        source=str(path), description=f"Question-to-paragraph retrieval from {Path(path).name}.", prompt=prompt,
    )


def bitext_task(
    path1: str | Path,
    path2: str | Path | None = None,
    *,
    name: str | None = None,
    languages: tuple[str, str] | None = None,
    limit: int | None = None,
    split: str = "test",
    prompt: str | None = None,
) -> AbsTask:
    """An mteb bitext-mining task (main score F1) from two line-aligned files, or a Tatoeba prefix/file alone
    (``tatoeba.deu-eng`` finds ``tatoeba.deu-eng.deu`` and ``tatoeba.deu-eng.eng``)."""
    from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

    if path2 is None:
        path1, path2, lang1, lang2 = tatoeba_files(path1)
        languages = languages or (lang1, lang2)
        stem = Path(path1).stem
    else:
        stem = Path(path1).stem
    s1, s2 = bitext_sentences(path1, path2, limit=limit)
    langs = [to_langscript(x) for x in languages] if languages else [guess_language(path1, s1),
                                                                       guess_language(path2, s2)]
    metadata = _metadata(name or f"LocalBitext-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}", "BitextMining", "f1",
                         {"default": langs}, split, f"{path1}|{path2}",
                         f"Bitext mining between {Path(path1).name} and {Path(path2).name}.", prompt)
    return _instantiate(AbsTaskBitextMining, metadata,
                        lambda: {"default": _datasets(split, {"sentence1": s1, "sentence2": s2})})


def _train_test(texts: list[str], labels: list[str], test_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    stratify = labels if min(counts.values()) >= 2 else None
    return train_test_split(texts, labels, test_size=test_size, random_state=seed, stratify=stratify)


def classification_task(
    path: str | Path,
    *,
    test_path: str | Path | None = None,
    name: str | None = None,
    language: str | None = None,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    limit: int | None = None,
    test_size: float = 0.5,
    n_experiments: int = 10,
    samples_per_label: int = 8,
    seed: int = 42,
    prompt: str | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb classification task (logistic regression on embeddings; main score accuracy).

    With ``test_path`` the first file trains and the second tests; with one file, a stratified ``test_size`` share
    (fixed seed) becomes the test split. ``n_experiments`` / ``samples_per_label`` are mteb's undersampling knobs.
    """
    from mteb.abstasks.classification import AbsTaskClassification

    texts, labels = read_labelled(path, text_column, label_column, limit, on_error=on_error)
    if test_path is not None:
        test_texts, test_labels = read_labelled(test_path, text_column, label_column, limit, on_error=on_error)
        train_texts, train_labels = texts, labels
    else:
        train_texts, test_texts, train_labels, test_labels = _train_test(texts, labels, test_size, seed)
    names = sorted(set(labels) | set(test_labels))
    index = {label: i for i, label in enumerate(names)}
    lang = to_langscript(language) if language else guess_language(path, texts)
    metadata = _metadata(name or task_name_from_path("LocalClassification", path), "Classification", "accuracy",
                         [lang], "test", str(path), f"Classification of {Path(path).name} ({len(names)} labels).",
                         prompt)

    def build():
        from datasets import Dataset, DatasetDict

        return DatasetDict({
            "train": Dataset.from_dict({"text": train_texts, "label": [index[x] for x in train_labels]}),
            "test": Dataset.from_dict({"text": test_texts, "label": [index[x] for x in test_labels]}),
        })

    return _instantiate(AbsTaskClassification, metadata, build, n_experiments=n_experiments,
                        samples_per_label=samples_per_label)


def clustering_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    limit: int | None = None,
    n_clusters: int = 10,
    max_documents_per_cluster: int | None = None,
    split: str | None = None,
    prompt: str | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb clustering task (k-means on embeddings; main score V-measure averaged over ``n_clusters``
    bootstrap samples of ``max_documents_per_cluster`` documents, all documents by default)."""
    from mteb.abstasks.clustering import AbsTaskClustering

    texts, labels = read_labelled(path, text_column, label_column, limit, on_error=on_error)
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, texts)
    metadata = _metadata(name or task_name_from_path("LocalClustering", path), "Clustering", "v_measure", [lang],
                         split, str(path), f"Clustering of {Path(path).name} by its labels.", prompt)
    return _instantiate(
        AbsTaskClustering, metadata, lambda: _datasets(split, {"sentences": texts, "labels": labels}),
        n_clusters=n_clusters, max_fraction_of_documents_to_embed=None,
        max_documents_per_cluster=max_documents_per_cluster or len(texts),
    )


TASK_KINDS = ("sts", "pairs", "retrieval", "squad", "xling", "bitext", "classification", "clustering")


def infer_task_kind(path: str | Path) -> str:
    """Guess the kind of evaluation a path holds (used by the command line when ``--task`` is omitted)."""
    path = Path(path)
    if path.is_dir():
        if (path / "corpus.jsonl").exists():
            return "retrieval"
        if list(path.glob("xquad.*.json")):
            return "xling"
        raise DataError("a folder must be BEIR (corpus.jsonl) or XQuAD (xquad.<lang>.json)", where=str(path),
                        hint="point --data at such a folder or at a data file")
    if path.suffix == ".json":
        return "squad"
    if path.suffix in (".jsonl", ".ndjson"):
        return "sts" if _first_record_has(path, STS_COLUMNS[:2]) else "xling"  # STS pairs or MKQA
    if re.search(r"[a-z]{3}-[a-z]{3}(\.[a-z]{3})?$", path.name):
        return "bitext"
    return "sts"


def _first_record_has(path: Path, keys: Sequence[str]) -> bool:
    """Whether the first JSON line of ``path`` is an object with all ``keys``."""
    with path.open(encoding="utf-8") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and all(k in record for k in keys)
    return False


def task_from_path(kind: str, paths: Sequence[str | Path], **options: Any) -> AbsTask:
    """Build a local task of ``kind`` (one of :data:`TASK_KINDS` except ``xling``) from ``paths``.

    ``options`` are passed to the builder (``limit``, ``name``, ``language``, ``fmt``, ``split``, ...); options a
    builder does not take are ignored, so the command line can pass its flags uniformly.
    """
    import inspect

    builders: dict[str, Callable[..., AbsTask]] = {
        "sts": sts_task, "pairs": pair_task, "retrieval": retrieval_task, "squad": squad_retrieval_task,
        "bitext": bitext_task, "classification": classification_task, "clustering": clustering_task,
    }
    if kind not in builders:
        raise ValueError(f"Unknown task kind {kind!r}; expected one of {sorted(builders)}")
    builder = builders[kind]
    accepted = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in options.items() if v is not None and k in accepted}
    if kind == "bitext":
        return builder(*paths[:2], **kwargs)
    if kind == "classification" and len(paths) > 1:
        kwargs["test_path"] = paths[1]
    if len(paths) > 1 and kind != "classification":
        raise DataError(f"task kind {kind!r} takes one data path, got {len(paths)}", hint="give one --data path")
    return builder(paths[0], **kwargs)


__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "LANGUAGE_CODES",
    "TASK_KINDS",
    "DataFormatError",
    "PairData",
    "RetrievalData",
    "STS_COLUMNS",
    "STS_FORMATS",
    "beir_retrieval_data",
    "bitext_sentences",
    "bitext_task",
    "choose_beir_split",
    "classification_task",
    "clustering_task",
    "guess_language",
    "infer_sts_format",
    "infer_task_kind",
    "make_retrieval_task",
    "pair_task",
    "read_labelled",
    "read_pairs",
    "read_sts",
    "retrieval_task",
    "squad_retrieval_data",
    "squad_retrieval_task",
    "split_from_name",
    "sts_task",
    "task_from_path",
    "tatoeba_files",
    "to_langscript",
]
