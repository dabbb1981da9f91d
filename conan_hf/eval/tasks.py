"""mteb tasks built from local files, so every evaluation of the paper (§4) runs without the Hugging Face Hub.

Each builder reads one data format, checks it (a malformed row raises an error naming the file and line), and
returns an *instance* of a real mteb task class (`AbsTaskSTS`, `AbsTaskRetrieval`, `AbsTaskBitextMining`, ...)
whose `load_data` serves the rows already read. mteb then does everything else: encoding through the model's
`encode_query` / `encode_document` / `encode` with the right prompts, the similarity computations and the metrics
(Spearman of cosine, nDCG@k / Recall@k via pytrec_eval, F1 of bitext mining, V-measure, ...). Nothing here computes
a metric.

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
                            ``sentence1``, ``sentence2``, ``label`` (PAWS-X)
:func:`retrieval_task`      BEIR folder (``corpus.jsonl``, ``queries.jsonl``,               ``"beir"``
                            ``qrels/<split>.tsv``)
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

from conan_hf.data.readers import DataFormatError
from conan_hf.errors import DataError, DataFileNotFoundError, finite_float

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


def task_name_from_path(prefix: str, path: str | Path) -> str:
    """A readable, file-derived task name such as ``LocalSTS-stsb-en-dev``."""
    path = Path(path)
    stem = path.name if path.is_dir() else path.stem
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}"


def _fail(path: Path, line: int | None, message: str, hint: str | None = None) -> DataFormatError:
    """The error for a bad file (``line=None``) or a bad row: ``file:line: message; hint``."""
    return DataFormatError(path, line, message, hint=hint or "fix or remove it")


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError("data file not found", where=str(path), hint="check the path")
    return path


def _parse_float(path: Path, line: int, value: str, what: str) -> float:
    """A finite score: NaN or inf would make the metric (Spearman, ...) undefined, so they are refused."""
    try:
        return finite_float(value)
    except ValueError as error:
        raise _fail(path, line, f"{what} must be a number, got {value!r} ({error})") from None


def _text(path: Path, line: int, value: Any, what: str) -> str:
    """A text field of a JSON row: it must be a string (numbers are not silently turned into text)."""
    if not isinstance(value, str):
        raise _fail(path, line, f"{what} must be a string, got {type(value).__name__} {value!r}",
                    hint="quote it in the JSON file")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Readers (plain Python, no mteb import)
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


#: The columns of an STS row, as stage 4 reads them (``trainers.supervised.task_rows``).
STS_COLUMNS = ("sentence1", "sentence2", "score")


def infer_sts_format(path: str | Path) -> str:
    """``"jsonl"`` for ``.jsonl`` / ``.ndjson``; ``"stsb"`` for ``.csv``; ``"sick"`` for a TSV whose header names
    ``relatedness_score``; ``"tsv"`` otherwise."""
    path = _check_file(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix.lower() == ".csv":
        return "stsb"
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    if "relatedness_score" in first.rstrip("\r\n").split("\t"):
        return "sick"
    return "tsv"


def read_sts(
    path: str | Path,
    fmt: str | None = None,
    limit: int | None = None,
    columns: dict[str, str | int] | None = None,
) -> PairData:
    """Read an STS file (STS-B CSV, SICK TSV, ``s1\\ts2\\tscore`` TSV, or the JSONL / table files training reads)
    into :class:`PairData`.

    Args:
        path: The file.
        fmt: ``"stsb"``, ``"sick"``, ``"tsv"`` or ``"jsonl"``; inferred from the file when None.
        limit: Keep only the first ``limit`` pairs (in file order).
        columns: ``{"sentence1": ..., "sentence2": ..., "score": ...}`` naming the file's columns (names, or indices
            of a header-less CSV/TSV), exactly as a stage-4 ``sts`` task's ``columns:``. With a mapping, or for
            JSONL, the file is read by the training reader (:func:`conan_hf.data.readers.read_table`), so whatever
            training accepts evaluates too.
    """
    path = _check_file(path)
    fmt = fmt or infer_sts_format(path)
    data = PairData()
    if columns is not None or fmt == "jsonl":
        from conan_hf.data.readers import read_table

        mapping = dict(columns) if columns is not None else {c: c for c in STS_COLUMNS}
        missing = [c for c in STS_COLUMNS if c not in mapping]
        if missing:
            raise ValueError(f"{path}: columns= must map {list(STS_COLUMNS)}; missing {missing}")
        table_format = "jsonl" if fmt == "jsonl" else None
        for row in read_table(path, {c: mapping[c] for c in STS_COLUMNS}, format=table_format,
                              types={"score": float}):
            data.add(str(row["sentence1"]), str(row["sentence2"]), row["score"])
            if limit is not None and len(data) >= limit:
                break
        if not len(data):
            raise _fail(path, None, "no sentence pairs found")
        return data
    with path.open(encoding="utf-8", newline="") as handle:
        if fmt == "stsb":
            reader = csv.reader(handle)
            next_line = 1
            for row in reader:
                # The physical line the record starts on (a quoted field may span lines).
                line, next_line = next_line, reader.line_num + 1
                if not row:
                    continue
                if len(row) != 3:
                    raise _fail(path, line, f"expected 3 CSV fields 's1,s2,score', got {len(row)}")
                data.add(row[0], row[1], _parse_float(path, line, row[2], "score"))
                if limit is not None and len(data) >= limit:
                    break
        elif fmt == "sick":
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None) or []
            missing = {"sentence_A", "sentence_B", "relatedness_score"} - set(header)
            if missing:
                raise _fail(path, 1, f"SICK header lacks columns {sorted(missing)}; found {header}")
            ia, ib, iscore = (header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score"))
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise _fail(path, line, f"expected {len(header)} tab-separated fields, got {len(row)}")
                data.add(row[ia], row[ib], _parse_float(path, line, row[iscore], "relatedness_score"))
                if limit is not None and len(data) >= limit:
                    break
        elif fmt == "tsv":
            for line, raw in enumerate(handle, start=1):
                raw = raw.rstrip("\r\n")
                if not raw:
                    continue
                row = raw.split("\t")
                if len(row) != 3:
                    raise _fail(path, line, f"expected 3 tab-separated fields 's1<TAB>s2<TAB>score', got {len(row)}")
                data.add(row[0], row[1], _parse_float(path, line, row[2], "score"))
                if limit is not None and len(data) >= limit:
                    break
        else:
            raise ValueError(f"Unknown STS format {fmt!r}; expected 'stsb', 'sick', 'tsv' or 'jsonl'.")
    if not len(data):
        raise _fail(path, None, "no sentence pairs found")
    return data


def read_pairs(path: str | Path, limit: int | None = None) -> PairData:
    """Read a pair-classification file: ``s1\\ts2\\tlabel`` (label 0/1) or a TSV with header
    ``sentence1``/``sentence2``/``label`` (PAWS-X). Scores of :class:`PairData` hold the 0/1 labels."""
    path = _check_file(path)
    data = PairData()
    with path.open(encoding="utf-8") as handle:
        lines = enumerate((raw.rstrip("\r\n") for raw in handle), start=1)
        first_line, first = next(lines, (1, ""))
        header = first.split("\t")
        columns = None
        if {"sentence1", "sentence2", "label"} <= set(header):
            columns = [header.index(c) for c in ("sentence1", "sentence2", "label")]
        else:
            lines = _chain_first((first_line, first), lines)
        for line, raw in lines:
            if not raw:
                continue
            row = raw.split("\t")
            if columns is None:
                if len(row) != 3:
                    raise _fail(path, line, f"expected 3 tab-separated fields 's1<TAB>s2<TAB>label', got {len(row)}")
                s1, s2, label = row
            else:
                if len(row) != len(header):
                    raise _fail(path, line, f"expected {len(header)} tab-separated fields, got {len(row)}")
                s1, s2, label = (row[i] for i in columns)
            if label.strip() not in {"0", "1"}:
                raise _fail(path, line, f"pair label must be 0 or 1, got {label!r}")
            data.add(s1, s2, float(label))
            if limit is not None and len(data) >= limit:
                break
    if not len(data):
        raise _fail(path, None, "no sentence pairs found")
    return data


def _chain_first(first: tuple[int, str], rest):
    yield first
    yield from rest


@dataclass
class RetrievalData:
    """A retrieval collection: ``corpus`` id -> {"title", "text"}, ``queries`` id -> text, ``qrels`` query -> doc ->
    graded relevance."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    _check_file(path)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as error:
                raise _fail(path, line, f"invalid JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise _fail(path, line, "expected a JSON object")
            rows.append((line, obj))
    return rows


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (``query-id  corpus-id  score``, header optional)."""
    path = _check_file(path)
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            raw = raw.rstrip("\r\n")
            if not raw:
                continue
            row = raw.split("\t")
            if line == 1 and row[0] == "query-id":
                continue
            if len(row) == 4:  # TREC style: qid iteration docid rel
                row = [row[0], row[2], row[3]]
            if len(row) != 3:
                raise _fail(path, line, f"expected 'query-id<TAB>corpus-id<TAB>score', got {len(row)} fields")
            try:
                score = int(finite_float(row[2]))
            except ValueError:
                raise _fail(path, line, f"relevance score must be a finite number, got {row[2]!r}") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def read_beir(
    folder: str | Path,
    split: str | None = None,
    limit_queries: int | None = None,
    limit_corpus: int | None = None,
) -> tuple[RetrievalData, str]:
    """Read a BEIR folder. Returns the data and the split whose qrels were used.

    Args:
        folder: Folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        split: The qrels split; when None, ``test`` if present, else ``dev``, else the only file.
        limit_queries: Keep the first N queries (file order) that have at least one relevant document.
        limit_corpus: Keep every relevant document of the kept queries plus the first documents of the corpus up to
            this many in total (a smaller, still realistic, distractor set for quick runs).
    """
    folder = Path(folder)
    for required in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / required).exists():
            raise DataFileNotFoundError(f"not a BEIR folder: {required} is missing", where=str(folder),
                                        hint="a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    qrel_files = sorted((folder / "qrels").glob("*.tsv"))
    if not qrel_files:
        raise DataFileNotFoundError("holds no <split>.tsv qrels file", where=str(folder / "qrels"),
                                    hint="add qrels/test.tsv (query-id, corpus-id, score)")
    available = {p.stem: p for p in qrel_files}
    if split is None:
        split = next((s for s in ("test", "dev", "validation") if s in available), None)
        if split is None:
            if len(available) > 1:
                raise DataError(f"several qrels splits {sorted(available)}", where=str(folder),
                                hint="choose one with --split / split=")
            split = next(iter(available))
    if split not in available:
        raise DataError(f"no qrels for split {split!r}", where=str(folder), hint=f"use one of {sorted(available)}")
    qrels = read_qrels(available[split])

    queries: dict[str, str] = {}
    for line, obj in _read_jsonl(folder / "queries.jsonl"):
        if "_id" not in obj or "text" not in obj:
            raise _fail(folder / "queries.jsonl", line, "a query needs '_id' and 'text'")
        qid = str(obj["_id"])
        if any(score > 0 for score in qrels.get(qid, {}).values()):
            queries[qid] = _text(folder / "queries.jsonl", line, obj["text"], "query 'text'")
            if limit_queries is not None and len(queries) >= limit_queries:
                break
    if not queries:
        raise DataError(f"no query of queries.jsonl has a relevant document in qrels/{split}.tsv", where=str(folder),
                        hint="check that the qrels query ids match queries.jsonl")
    qrels = {qid: qrels[qid] for qid in queries}
    relevant = {doc for docs in qrels.values() for doc, score in docs.items() if score > 0}

    corpus: dict[str, dict[str, str]] = {}
    for line, obj in _read_jsonl(folder / "corpus.jsonl"):
        if "_id" not in obj or "text" not in obj:
            raise _fail(folder / "corpus.jsonl", line, "a document needs '_id' and 'text'")
        doc_id = str(obj["_id"])
        keep = limit_corpus is None or doc_id in relevant or len(corpus) < limit_corpus
        if keep:
            corpus[doc_id] = {"title": _text(folder / "corpus.jsonl", line, obj.get("title") or "", "'title'"),
                              "text": _text(folder / "corpus.jsonl", line, obj["text"], "document 'text'")}
    missing = relevant - set(corpus)
    if missing:
        raise DataError(f"{len(missing)} relevant documents in qrels/{split}.tsv are not in corpus.jsonl, "
                        f"e.g. {sorted(missing)[:3]}", where=str(folder),
                        hint="add them to corpus.jsonl or fix the ids")
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels), split


def read_squad(path: str | Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Read a SQuAD-format JSON file.

    Returns:
        ``paragraphs``: (paragraph id, title, context) with ids ``"<article>-<paragraph>"`` (positions, so they align
        across the languages of XQuAD); ``questions``: (question id, question, paragraph id).
    """
    path = _check_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _fail(path, error.lineno, f"invalid JSON ({error.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _fail(path, None, "not SQuAD format: expected an object with a 'data' list of articles")
    paragraphs, questions = [], []
    for a, article in enumerate(data["data"]):
        if "paragraphs" not in article:
            raise _fail(path, None, f"article {a} has no 'paragraphs'")
        for p, paragraph in enumerate(article["paragraphs"]):
            if "context" not in paragraph or "qas" not in paragraph:
                raise _fail(path, None, f"article {a} paragraph {p} lacks 'context' or 'qas'")
            pid = f"{a}-{p}"
            paragraphs.append((pid, article.get("title", ""), paragraph["context"]))
            for k, qa in enumerate(paragraph["qas"]):
                where = f"data[{a}].paragraphs[{p}].qas[{k}]"
                if not isinstance(qa, dict) or "id" not in qa or "question" not in qa:
                    raise _fail(path, where, "a question needs 'id' and 'question'")
                questions.append((str(qa["id"]), _text(path, where, qa["question"], "'question'"), pid))
    return paragraphs, questions


def read_bitext(path1: str | Path, path2: str | Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Read two line-aligned files (Tatoeba); line i of one translates line i of the other."""
    path1, path2 = _check_file(path1), _check_file(path2)
    lines1 = path1.read_text(encoding="utf-8").splitlines()
    lines2 = path2.read_text(encoding="utf-8").splitlines()
    if len(lines1) != len(lines2):
        raise DataFormatError(path1, None, f"has {len(lines1)} lines but {path2} has {len(lines2)}",
                              hint="bitext files must be line-aligned")
    for line, (a, b) in enumerate(zip(lines1, lines2), start=1):
        if not a.strip() or not b.strip():
            raise _fail(path1 if not a.strip() else path2, line, "empty sentence in a line-aligned bitext file")
    if limit is not None:
        lines1, lines2 = lines1[:limit], lines2[:limit]
    return lines1, lines2


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


def read_labelled(
    path: str | Path,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """Read texts with class labels.

    * CSV with a header: the text column is ``text_column`` or the first of ``text``/``sentence``/``title``/
      ``sentence1``; the label column is ``label_column`` or the first of ``label``/``category``/``class``/``labels``.
    * TSV/TXT without header: the last field is the label, the one before it the text (THUCNews ``title\\tlabel``,
      CSL ``task\\ttitle\\tlabel``); integer ``text_column``/``label_column`` pick other fields.
    """
    path = _check_file(path)
    texts: list[str] = []
    labels: list[str] = []
    with path.open(encoding="utf-8", newline="") as handle:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(handle)
            header = next(reader, None) or []
            ti = _column_index(path, header, text_column, ("text", "sentence", "title", "sentence1"))
            li = _column_index(path, header, label_column, ("label", "category", "class", "labels"))
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise _fail(path, line, f"expected {len(header)} CSV fields, got {len(row)}")
                texts.append(row[ti])
                labels.append(row[li])
                if limit is not None and len(texts) >= limit:
                    break
        else:
            ti = -2 if text_column is None else int(text_column)
            li = -1 if label_column is None else int(label_column)
            for line, raw in enumerate(handle, start=1):
                raw = raw.rstrip("\r\n")
                if not raw:
                    continue
                row = raw.split("\t")
                if len(row) < 2:
                    raise _fail(path, line, "expected at least 2 tab-separated fields '...<TAB>text<TAB>label'")
                texts.append(row[ti])
                labels.append(row[li].strip())
                if limit is not None and len(texts) >= limit:
                    break
    if not texts:
        raise _fail(path, None, "no labelled rows found")
    return texts, labels


def _column_index(path: Path, header: list[str], wanted: str | int | None, candidates: Sequence[str]) -> int:
    if isinstance(wanted, int):
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
    split: str = "test",
    prompt: str | None = None,
    columns: dict[str, str | int] | None = None,
) -> AbsTask:
    """An mteb STS task (main score: Spearman of cosine similarity) from an STS-B CSV, SICK TSV, ``s1\\ts2\\tscore``
    file, or a JSONL / table file with ``sentence1``, ``sentence2``, ``score`` columns (or a ``columns`` mapping, as
    training takes it). See :func:`read_sts`."""
    from mteb.abstasks.sts import AbsTaskSTS

    fmt = fmt or infer_sts_format(path)
    data = read_sts(path, fmt=fmt, limit=limit, columns=columns)
    lang = to_langscript(language) if language else guess_language(path, data.sentence1)
    metadata = _metadata(name or task_name_from_path("LocalSTS", path), "STS", "cosine_spearman", [lang], split,
                         str(path), f"STS pairs from {Path(path).name} ({fmt} format).", prompt)
    low, high = (1, 5) if fmt == "sick" else (0, 5)
    return _instantiate(
        AbsTaskSTS, metadata,
        lambda: _datasets(split, {"sentence1": data.sentence1, "sentence2": data.sentence2, "score": data.score}),
        min_score=min(low, min(data.score)), max_score=max(high, max(data.score)),
    )


def pair_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    limit: int | None = None,
    split: str = "test",
    prompt: str | None = None,
) -> AbsTask:
    """An mteb pair-classification task (main score: max average precision over similarity functions) from a
    ``s1\\ts2\\tlabel`` file. See :func:`read_pairs`."""
    from mteb.abstasks.pair_classification import AbsTaskPairClassification

    data = read_pairs(path, limit=limit)
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
) -> AbsTask:
    """An mteb retrieval task (main score nDCG@10; Recall@k, MAP, MRR also reported) from a BEIR folder.
    See :func:`read_beir` for the limits."""
    data, qrels_split = read_beir(folder, split=split, limit_queries=limit_queries, limit_corpus=limit_corpus)
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
    split: str = "test",
    prompt: str | dict[str, str] | None = None,
) -> AbsTask:
    """Monolingual retrieval from a SQuAD-format file (e.g. CMRC2018): each question retrieves its paragraph."""
    paragraphs, questions = read_squad(path)
    if limit_queries is not None:
        questions = questions[:limit_queries]
    data = RetrievalData(
        corpus={pid: {"title": "", "text": context} for pid, _, context in paragraphs},
        queries={qid: question for qid, question, _ in questions},
        qrels={qid: {pid: 1} for qid, _, pid in questions},
    )
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
    s1, s2 = read_bitext(path1, path2, limit=limit)
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
) -> AbsTask:
    """An mteb classification task (logistic regression on embeddings; main score accuracy).

    With ``test_path`` the first file trains and the second tests; with one file, a stratified ``test_size`` share
    (fixed seed) becomes the test split. ``n_experiments`` / ``samples_per_label`` are mteb's undersampling knobs.
    """
    from mteb.abstasks.classification import AbsTaskClassification

    texts, labels = read_labelled(path, text_column, label_column, limit)
    if test_path is not None:
        test_texts, test_labels = read_labelled(test_path, text_column, label_column, limit)
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
    split: str = "test",
    prompt: str | None = None,
) -> AbsTask:
    """An mteb clustering task (k-means on embeddings; main score V-measure averaged over ``n_clusters``
    bootstrap samples of ``max_documents_per_cluster`` documents, all documents by default)."""
    from mteb.abstasks.clustering import AbsTaskClustering

    texts, labels = read_labelled(path, text_column, label_column, limit)
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
    "bitext_task",
    "classification_task",
    "clustering_task",
    "guess_language",
    "infer_sts_format",
    "infer_task_kind",
    "make_retrieval_task",
    "pair_task",
    "read_beir",
    "read_bitext",
    "read_labelled",
    "read_pairs",
    "read_qrels",
    "read_squad",
    "read_sts",
    "retrieval_task",
    "squad_retrieval_task",
    "sts_task",
    "task_from_path",
    "tatoeba_files",
    "to_langscript",
]
