"""Readers of published dataset layouts: SQuAD/XQuAD JSON, STS-B multi-mt, line-aligned bitexts and BEIR folders.

Example::

    >>> from conan_hf.data.corpora import beir_pairs, read_beir
    >>> pairs = beir_pairs(read_beir("retrieval/scifact", split="train"))  # doctest: +SKIP
    >>> pairs[0].keys()  # doctest: +SKIP
    dict_keys(['id', 'query', 'positive', 'positive_id', 'score'])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conan_hf.errors import DataFileNotFoundError, finite_float

from .tables import (
    DataFormatError,
    OnError,
    Row,
    Rows,
    _ErrorPolicy,
    _iter_records,
    invalid_json,
    read_table,
    undecodable,
)

__all__ = [
    "QRELS_HEADER",
    "BeirData",
    "SquadRows",
    "beir_pairs",
    "beir_splits",
    "read_beir",
    "read_beir_corpus",
    "read_bitext",
    "read_qrels",
    "read_squad",
    "read_stsb_multi_mt",
]


class SquadRows(Rows):
    """The question rows of a SQuAD file, plus ``paragraphs``: ``{paragraph_id: {"title", "text"}}`` of every paragraph
    with a context, in file order (paragraphs without questions included: they are retrieval distractors)."""

    def __init__(self, rows: Iterable[dict] = (), skipped: Iterable[tuple[str, int | str, str]] = (),
                 paragraphs: Mapping[str, dict[str, str]] | None = None) -> None:
        super().__init__(rows, skipped)
        self.paragraphs: dict[str, dict[str, str]] = dict(paragraphs or {})


def read_squad(path: str | os.PathLike, on_error: OnError = "raise") -> SquadRows:
    """Question–paragraph pairs from a SQuAD-format file (SQuAD 1.1/2.0, XQuAD, MLQA, CMRC2018).

    Each question becomes ``{"id", "query", "positive" (its paragraph), "answers" (answer texts), "title",
    "paragraph_id"}``; the paragraph id is ``"{article}-{paragraph}"``, the paragraph's position, so it is the same in
    every language of XQuAD. Unanswerable SQuAD 2.0 questions are kept with an empty ``answers`` list. Bad entries are
    reported by their JSON position, e.g. ``xquad.de.json:data[3].paragraphs[0].qas[5]``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such SQuAD file", where=str(path), hint="check the path")
    with path.open(encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise invalid_json(path, err) from None
        except UnicodeDecodeError as err:
            raise undecodable(path, "utf-8", err) from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataFormatError(path, 1, "not SQuAD format: expected an object with a 'data' list")
    policy = _ErrorPolicy(on_error)
    rows: list[dict] = []
    paragraph_table: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    for i, article in enumerate(data["data"]):
        title = article.get("title", "") if isinstance(article, dict) else ""
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            policy.bad(path, f"data[{i}]", "article without a 'paragraphs' list")
            continue
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                policy.bad(path, where, "paragraph without a 'context' text")
                continue
            paragraph_id = f"{i}-{j}"
            paragraph_table[paragraph_id] = {"title": title if isinstance(title, str) else "", "text": context}
            for k, qa in enumerate(paragraph.get("qas") or []):
                qwhere = f"{where}.qas[{k}]"
                if not isinstance(qa, dict) or not str(qa.get("id", "")).strip():
                    policy.bad(path, qwhere, "question without an 'id'")
                    continue
                qid, question = str(qa["id"]), qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    policy.bad(path, qwhere, f"question {qid!r} has no text")
                    continue
                if qid in seen:
                    policy.bad(path, qwhere, f"duplicate question id {qid!r}")
                    continue
                seen.add(qid)
                answers = [a["text"] for a in qa.get("answers", []) if isinstance(a, dict) and "text" in a]
                rows.append(Row({"id": qid, "query": question, "positive": context, "answers": answers,
                                 "title": title, "paragraph_id": paragraph_id}, f"{path}:{qwhere}"))
    finished = policy.finish(rows, str(path))
    return SquadRows(finished, finished.skipped, paragraph_table)


def read_stsb_multi_mt(
    folder: str | os.PathLike, language: str, split: str = "dev", on_error: OnError = "raise"
) -> Rows:
    """One language of STS-B multi-mt (``stsb-{language}-{split}.csv``: ``s1,s2,score`` without header).

    Rows: ``{"id": "{split}-{row}", "sentence1", "sentence2", "score"}`` with the 0-5 score as float; the id is the
    row position, which is what aligns the languages.
    """
    path = Path(folder) / f"stsb-{language}-{split}.csv"
    rows = read_table(path, {"sentence1": 0, "sentence2": 1, "score": 2}, types={"score": finite_float},
                      on_error=on_error)
    if rows.skipped:
        # Ids are row positions; skipping rows would silently misalign the languages.
        raise DataFormatError(path, rows.skipped[0][1], "STS-B multi-mt rows are aligned by position: fix the file")
    for index, row in enumerate(rows):
        row["id"] = f"{split}-{index}"
    return rows


def read_bitext(path1: str | os.PathLike, path2: str | os.PathLike, limit: int | None = None) -> Rows:
    """Two line-aligned text files (Tatoeba, one sentence a line): line i of one translates line i of the other.

    Rows: ``{"id": "<line>", "sentence1", "sentence2"}``, located at ``path1:line``. The files must have the same number
    of lines and no empty line (an empty line would silently shift every later pair); ``limit`` keeps the first pairs.
    """
    texts = []
    for path in (Path(path1), Path(path2)):
        if not path.is_file():
            raise DataFileNotFoundError("no such bitext file", where=str(path), hint="check the path")
        texts.append(path.read_text(encoding="utf-8").splitlines())
    lines1, lines2 = texts
    if len(lines1) != len(lines2):
        raise DataFormatError(path1, None, f"has {len(lines1)} lines but {path2} has {len(lines2)}",
                              hint="bitext files must be line-aligned")
    rows = []
    for line, (a, b) in enumerate(zip(lines1, lines2), start=1):
        if not a.strip() or not b.strip():
            raise DataFormatError(path1 if not a.strip() else path2, line,
                                  "empty sentence in a line-aligned bitext file", hint="fix or remove the pair")
        rows.append(Row({"id": str(line), "sentence1": a, "sentence2": b}, f"{path1}:{line}"))
    return Rows(rows[:limit])


@dataclass
class BeirData:
    """A BEIR dataset: ``corpus`` (``{doc_id: {"title", "text"}}``), ``queries`` (``{query_id: text}``) and ``qrels``
    (``{query_id: {doc_id: score}}``) of one split."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    skipped: list[tuple[str, int | str, str]] = field(default_factory=list)
    #: ``{(query_id, doc_id): "qrels/<split>.tsv:<line>"}``, where each judgement was read.
    qrels_locations: dict[tuple[str, str], str] = field(default_factory=dict)


#: The columns of a BEIR qrels header line.
QRELS_HEADER = ("query-id", "corpus-id", "score")


def _integer_score(value: str) -> int:
    """A relevance grade: an integer (``"2"``, ``"2.0"``). ``"2.5"``, NaN, inf or text raise a `ValueError` whose
    message completes "score ..." (a grade is never rounded)."""
    try:
        number = finite_float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a finite number") from None
    if not number.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(number)


def _read_qrels(path: Path, policy: _ErrorPolicy) -> list[tuple[int, Row]]:
    """``(line, row)`` for each judgement of ``path``; see :func:`read_qrels`."""
    rows: list[tuple[int, Row]] = []
    columns: tuple[int, ...] | None = None  # positions of query-id, corpus-id and score
    width = 0
    for line, fields in _iter_records(path, "tsv", False, None, policy, "utf-8"):
        fields = [value.strip() for value in fields]
        if columns is None:
            # The first line decides the layout: it is a header when its score field is not an integer.
            width = len(fields)
            is_header = set(QRELS_HEADER) <= set(fields)
            if width not in (3, 4) and not is_header:
                raise DataFormatError(path, line, f"expected 3 tab-separated fields 'query-id<TAB>corpus-id<TAB>score' "
                                                  f"(or 4 TREC fields 'query-id<TAB>0<TAB>corpus-id<TAB>score'), "
                                                  f"got {width}")
            score_field = fields[3 if width == 4 else 2]
            try:
                _integer_score(score_field)
            except ValueError as err:
                if not is_header:
                    raise DataFormatError(path, line, f"neither the header '{' '.join(QRELS_HEADER)}' nor a "
                                                      f"judgement: score {err}") from None
                columns = tuple(fields.index(name) for name in QRELS_HEADER)
                continue
            columns = (0, 2, 3) if width == 4 else (0, 1, 2)
        if len(fields) != width:
            policy.bad(path, line, f"expected {width} tab-separated fields like the first line, got {len(fields)}")
            continue
        qid, did, raw_score = (fields[i] for i in columns)
        if not qid or not did:
            policy.bad(path, line, "empty query-id or corpus-id")
            continue
        try:
            score = _integer_score(raw_score)
        except ValueError as err:
            policy.bad(path, line, f"score {err}")
            continue
        rows.append((line, Row({"query_id": qid, "corpus_id": did, "score": score}, f"{path}:{line}")))
    return rows


def read_qrels(path: str | os.PathLike, on_error: OnError = "raise") -> Rows:
    """BEIR / TREC relevance judgements: ``query-id<TAB>corpus-id<TAB>score`` lines, with or without the header line
    ``query-id corpus-id score`` (a header is recognised by its score field not being an integer), or the 4 TREC fields
    ``query-id<TAB>iteration<TAB>corpus-id<TAB>score``.

    Rows: ``{"query_id", "corpus_id", "score"}`` with an integer score. A line with a different number of fields, an
    empty id or a score that is not an integer (``"1.5"``, ``"inf"``) is a bad row, reported as ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such qrels file", where=str(path), hint="check the path")
    policy = _ErrorPolicy(on_error)
    return policy.finish([row for _, row in _read_qrels(path, policy)], str(path))


def _read_beir_texts(path: Path, policy: _ErrorPolicy, documents: bool) -> dict[str, Any]:
    """``corpus.jsonl`` (``{_id: {"title", "text"}}``) or ``queries.jsonl`` (``{_id: text}``)."""
    table: dict[str, Any] = {}
    for line, record in _iter_records(path, "jsonl", False, None, policy, "utf-8"):
        doc_id, text, title = str(record.get("_id", "")).strip(), record.get("text"), record.get("title") or ""
        if not doc_id:
            policy.bad(path, line, "no '_id'")
        elif not isinstance(text, str) or not text.strip():
            policy.bad(path, line, f"{doc_id!r} has no 'text' (a non-empty string)")
        elif documents and not isinstance(title, str):
            policy.bad(path, line, f"{doc_id!r}: 'title' must be a string, got {type(title).__name__} {title!r}")
        elif doc_id in table:
            policy.bad(path, line, f"duplicate _id {doc_id!r}")
        else:
            table[doc_id] = {"title": title, "text": text} if documents else text
    return table


def read_beir_corpus(path: str | os.PathLike, on_error: OnError = "raise") -> dict[str, dict[str, str]]:
    """A BEIR ``corpus.jsonl`` alone (``{"_id", "title", "text"}`` per line) as ``{doc_id: {"title", "text"}}``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError("no such corpus file", where=str(path), hint="check the path")
    policy = _ErrorPolicy(on_error)
    corpus = _read_beir_texts(path, policy, documents=True)
    policy.finish([], str(path), kept=len(corpus))
    return corpus


def beir_splits(folder: str | os.PathLike) -> list[str]:
    """The qrels splits of a BEIR folder (the names of ``qrels/*.tsv``), sorted."""
    return sorted(p.stem for p in (Path(folder) / "qrels").glob("*.tsv"))


def read_beir(folder: str | os.PathLike, split: str = "test", on_error: OnError = "raise") -> BeirData:
    """Read a BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv`` (see :func:`read_qrels`:
    the header line is optional, as in the MS MARCO and TREC qrels files).

    qrels lines naming a query or document that does not exist, or with a score that is not an integer, are bad rows.
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for required in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not required.is_file():
            splits = beir_splits(folder)
            hint = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
            if required == qrels_path and splits:
                hint = f"the qrels splits here are {splits}"
            raise DataFileNotFoundError(f"BEIR folder lacks {required.relative_to(folder)}", where=str(folder),
                                        hint=hint)
    policy = _ErrorPolicy(on_error)
    corpus = _read_beir_texts(folder / "corpus.jsonl", policy, documents=True)
    queries = _read_beir_texts(folder / "queries.jsonl", policy, documents=False)

    qrels: dict[str, dict[str, int]] = {}
    locations: dict[tuple[str, str], str] = {}
    for line, row in _read_qrels(qrels_path, policy):
        qid, did = row["query_id"], row["corpus_id"]
        if qid not in queries:
            policy.bad(qrels_path, line, f"query id {qid!r} is not in queries.jsonl")
            continue
        if did not in corpus:
            policy.bad(qrels_path, line, f"document id {did!r} is not in corpus.jsonl")
            continue
        qrels.setdefault(qid, {})[did] = row["score"]
        locations[qid, did] = row.location
    policy.finish([], str(folder), kept=len(corpus) + len(queries) + sum(map(len, qrels.values())))
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, skipped=policy.skipped, qrels_locations=locations)


def beir_pairs(data: BeirData, min_score: int = 1, title_separator: str | None = " ") -> Rows:
    """(query, relevant document) rows from :func:`read_beir`, one per qrels entry with ``score >= min_score``.

    Rows: ``{"id": "{query_id}:{doc_id}", "query_id", "query", "positive", "positive_id", "score"}``. The document text
    is ``title + title_separator + text`` (``title_separator=None`` drops titles).
    """
    rows = []
    for qid, docs in data.qrels.items():
        for did, score in docs.items():
            if score < min_score:
                continue
            doc = data.corpus[did]
            text = doc["text"]
            if title_separator is not None and doc["title"]:
                text = doc["title"] + title_separator + text
            rows.append(Row(
                {"id": f"{qid}:{did}", "query_id": qid, "query": data.queries[qid], "positive": text,
                 "positive_id": did, "score": score}, data.qrels_locations.get((qid, did))
            ))  # fmt: skip
    return Rows(rows, data.skipped)
