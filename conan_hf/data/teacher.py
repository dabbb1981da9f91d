"""Teacher filtering and hard-negative pool mining: reusable data-cleaning steps of the recipe.

- :func:`filter_by_teacher` — the weakly-supervised stage drops (query, positive) pairs that a teacher embedder scores
  below a threshold (paper: 0.4), removing noisy pairs before training.
- :func:`mine_negative_pools` — Dynamic Hard Negative Mining (§3.4, eq.6) needs, per example, a **ranked pool** of
  candidate hard negatives from which replacements are drawn. The pool is mined with sentence-transformers'
  :func:`~sentence_transformers.util.mine_hard_negatives`, with a false-negative margin: candidates scoring within
  ``relative_margin`` of the positive are skipped, as likely unlabeled positives (NV-Retriever's TopK-PercPos).

Both accept any SentenceTransformer (or a path to one), show progress bars while encoding, print a summary and return
it as a report object.

Example::

    >>> from sentence_transformers import SentenceTransformer
    >>> from conan_hf.data.teacher import filter_by_teacher, mine_negative_pools
    >>> teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> kept, report = filter_by_teacher(rows, teacher, threshold=0.4)  # doctest: +SKIP
    >>> pools, mining = mine_negative_pools(kept, teacher, pool_size=30)  # doctest: +SKIP
    >>> pools[0]["negatives"][:2], pools[0]["negative_scores"][:2]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["MiningReport", "TeacherFilterReport", "filter_by_teacher", "mine_negative_pools", "teacher_scores"]


def _load_model(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(model))
    return model


def _as_dataset(data: Any) -> Any:
    from datasets import Dataset

    if isinstance(data, Dataset):
        return data
    rows = [dict(row) for row in data]
    if not rows:
        raise ValueError("no rows given")
    return Dataset.from_list(rows)


def _check_columns(dataset: Any, *columns: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"column(s) {missing} not in the data (it has {dataset.column_names})")


def teacher_scores(
    model: Any,
    queries: list[str],
    positives: list[str],
    *,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    query_prompt: str | Sequence[str | None] | None = None,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Teacher similarity of each (query, positive) pair, with the model's own similarity function (usually cosine).

    Queries go through ``encode_query`` and positives through ``encode_document``, so models with query/document
    prompts use them; each distinct text is encoded once.

    ``query_prompt`` replaces the teacher's own query prompt: one string for every query (``""``: encode the queries
    exactly as given, for queries that already carry their instruction), or one entry per query (e.g. each row's own
    instruction as ``"Instruct: ...\nQuery: "``; ``None`` entries get the teacher's own prompt). ``None``: the
    teacher's own query prompt (or ``query_prompt_name``) for all.
    """
    if len(queries) != len(positives):
        raise ValueError(f"{len(queries)} queries but {len(positives)} positives")
    if query_prompt is None or isinstance(query_prompt, str):
        prompts = [query_prompt] * len(queries)
    else:
        prompts = list(query_prompt)
        if len(prompts) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(prompts)} query prompts")
    model = _load_model(model)
    unique_q = list(dict.fromkeys(zip(prompts, queries)))
    unique_p = list(dict.fromkeys(positives))
    # sentence-transformers takes one prompt per call: encode each prompt's queries together.
    q_chunks, q_pos = [], {}
    for prompt in dict.fromkeys(p for p, _ in unique_q):
        texts = [q for p, q in unique_q if p == prompt]
        q_chunks.append(model.encode_query(texts, prompt_name=query_prompt_name if prompt is None else None,
                                           prompt=prompt, batch_size=batch_size, convert_to_tensor=True,
                                           show_progress_bar=show_progress_bar))  # fmt: skip
        offset = len(q_pos)
        q_pos.update({(prompt, q): offset + i for i, q in enumerate(texts)})
    q_emb = torch.cat(q_chunks)
    p_emb = model.encode_document(unique_p, prompt_name=document_prompt_name, batch_size=batch_size,
                                  convert_to_tensor=True, show_progress_bar=show_progress_bar)  # fmt: skip
    p_pos = {t: i for i, t in enumerate(unique_p)}
    q_idx = [q_pos[key] for key in zip(prompts, queries)]
    p_idx = [p_pos[t] for t in positives]
    return model.similarity_pairwise(q_emb[q_idx], p_emb[p_idx]).float().cpu().numpy()


@dataclass
class TeacherFilterReport:
    """Outcome of :func:`filter_by_teacher`; ``scores`` holds the teacher score of every input row, in input order."""

    threshold: float
    total: int
    kept: int
    dropped: int
    scores: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        s = np.asarray(self.scores)
        stats = f"; scores mean {s.mean():.3f}, min {s.min():.3f}, max {s.max():.3f}" if len(s) else ""
        return (
            f"Teacher filter (threshold {self.threshold}): kept {self.kept} of {self.total} pairs, "
            f"dropped {self.dropped} ({self.dropped / max(self.total, 1):.1%}){stats}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filter_by_teacher(
    data: Iterable[Mapping[str, Any]] | Any,
    model: Any,
    threshold: float = 0.4,
    *,
    query_column: str = "query",
    positive_column: str = "positive",
    score_column: str | None = "teacher_score",
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    query_prompt: str | Sequence[str | None] | None = None,
    show_progress_bar: bool = True,
    verbose: bool = True,
) -> tuple[Any, TeacherFilterReport]:
    """Drop (query, positive) pairs a teacher scores below ``threshold`` (paper: 0.4; kept iff ``score >= threshold``).

    Args:
        data: a ``datasets.Dataset`` or an iterable of row dicts.
        model: a SentenceTransformer or a path/name to load one from.
        score_column: name of the added column holding each kept row's teacher score (``None``: add nothing).
        query_prompt: text put before the queries instead of the teacher's own query prompt: one string for all, or
            one per row (``None`` entries: the teacher's own). Pass ``""`` when the queries already carry their
            instruction (e.g. ``"Instruct: ...\nQuery: ..."``), or each row's instruction as its prompt, so the
            teacher sees one instruction, the row's, never its own on top of it. ``None`` (default): the teacher's
            ``query`` prompt, if it has one.

    Returns:
        ``(kept_dataset, report)``; the kept rows keep their order and all their columns.
    """
    dataset = _as_dataset(data)
    _check_columns(dataset, query_column, positive_column)
    scores = teacher_scores(
        model, list(dataset[query_column]), list(dataset[positive_column]), batch_size=batch_size,
        query_prompt_name=query_prompt_name, document_prompt_name=document_prompt_name, query_prompt=query_prompt,
        show_progress_bar=show_progress_bar,
    )  # fmt: skip
    if np.isnan(scores).any():
        raise ValueError(f"the teacher produced NaN scores for rows {np.flatnonzero(np.isnan(scores))[:10].tolist()}")
    keep = np.flatnonzero(scores >= threshold)
    if score_column is not None:
        dataset = dataset.add_column(score_column, scores.tolist())
    kept = dataset.select(keep)
    report = TeacherFilterReport(
        threshold=threshold, total=len(scores), kept=len(keep), dropped=len(scores) - len(keep), scores=scores.tolist()
    )
    if verbose:
        print(report.summary())
    return kept, report


@dataclass
class MiningReport:
    """Outcome of :func:`mine_negative_pools`: how many rows got a full, partial or empty pool."""

    pool_size: int
    total: int
    full: int
    partial: int
    empty: int
    dropped: int
    mean_pool_size: float

    def summary(self) -> str:
        return (
            f"Negative pools (size {self.pool_size}) for {self.total} rows: {self.full} full, {self.partial} partial, "
            f"{self.empty} empty ({self.dropped} rows dropped); mean pool size {self.mean_pool_size:.2f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mine_negative_pools(
    data: Iterable[Mapping[str, Any]] | Any,
    model: Any,
    pool_size: int = 30,
    *,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str = "negatives",
    scores_column: str | None = "negative_scores",
    corpus: list[str] | None = None,
    range_min: int = 0,
    range_max: int | None = None,
    relative_margin: float | None = 0.05,
    absolute_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    corpus_prompt_name: str | None = None,
    use_faiss: bool = False,
    keep_empty: bool = False,
    verbose: bool = True,
) -> tuple[Any, MiningReport]:
    """Attach to each row a ranked pool of hard negatives for DHNM, mined with ``mine_hard_negatives``.

    Candidates are the positives of all rows plus ``corpus``; a row's own positives are never its negatives. The pool
    is the top ``pool_size`` candidates by teacher score, after skipping the ``range_min`` best and any candidate
    within the false-negative margin (``relative_margin``: score above ``positive_score - |positive_score| * margin``;
    ``absolute_margin``: above ``positive_score - margin``), ordered from hardest to easiest.

    Args:
        data: a ``datasets.Dataset`` or an iterable of row dicts with query and positive columns.
        model: the teacher SentenceTransformer (or a path/name).
        pool_size: candidates per pool (DHNM keeps k of them active, the rest are replacements).
        negatives_column / scores_column: added columns: the pool (list of texts) and its teacher scores.
        keep_empty: keep rows for which no candidate passed the filters (with an empty pool) instead of dropping them.

    Returns:
        ``(dataset, report)``: the input rows (input order, all columns) with the pool columns (and, with a
        ``scores_column``, the teacher's ``positive_score``; NaN for kept empty pools), and a :class:`MiningReport`.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    dataset = _as_dataset(data)
    _check_columns(dataset, query_column, positive_column)
    for column in (negatives_column, scores_column, "positive_score" if scores_column else None):
        if column is not None and column in dataset.column_names:
            raise ValueError(f"the data already has a {column!r} column; pick another negatives/scores column name")
    queries, positives = list(dataset[query_column]), list(dataset[positive_column])
    pairs = Dataset.from_dict({"query": queries, "positive": positives})
    mined = mine_hard_negatives(
        pairs,
        _load_model(model),
        anchor_column_name="query",
        positive_column_name="positive",
        corpus=corpus,
        range_min=range_min,
        range_max=range_max,
        max_score=max_score,
        min_score=min_score,
        absolute_margin=absolute_margin,
        relative_margin=relative_margin,
        num_negatives=pool_size,
        sampling_strategy="top",
        query_prompt_name=query_prompt_name,
        corpus_prompt_name=corpus_prompt_name,
        # "labeled-list" keeps rows with fewer than pool_size valid candidates (n-tuple drops them) and returns the
        # candidates in rank order with their scores: [positive, neg_1, ...] / [pos_score, neg_1_score, ...].
        output_format="labeled-list",
        output_scores=True,
        batch_size=batch_size,
        use_faiss=use_faiss,
        verbose=verbose,
    )
    pools: dict[tuple[str, str], tuple[list[str], list[float], float]] = {}
    for query, texts, scores in zip(mined["query"], mined["positive"], mined["scores"]):
        pools[(query, texts[0])] = (list(texts[1:]), [float(s) for s in scores[1:]], float(scores[0]))
    negatives, neg_scores, pos_scores, keep = [], [], [], []
    for index, key in enumerate(zip(queries, positives)):
        pool, scores, pos_score = pools.get(key, ([], [], float("nan")))
        if pool or keep_empty:
            keep.append(index)
            negatives.append(pool)
            neg_scores.append(scores)
            pos_scores.append(pos_score)
    sizes = [len(pools[key][0]) if key in pools else 0 for key in zip(queries, positives)]
    report = MiningReport(
        pool_size=pool_size,
        total=len(sizes),
        full=sum(s == pool_size for s in sizes),
        partial=sum(0 < s < pool_size for s in sizes),
        empty=sum(s == 0 for s in sizes),
        dropped=len(sizes) - len(keep),
        mean_pool_size=float(np.mean(sizes)) if sizes else 0.0,
    )
    out = dataset.select(keep).add_column(negatives_column, negatives)
    if scores_column is not None:
        out = out.add_column(scores_column, neg_scores).add_column("positive_score", pos_scores)
    if verbose:
        print(report.summary())
    return out, report
