"""Teacher filtering: score (query, positive) pairs with a teacher embedder and drop those below a threshold.

The weakly-supervised stage drops pairs a teacher scores below 0.4 (the paper's threshold), removing noisy pairs
before training. :func:`teacher_scores` scores pairs; :func:`filter_by_teacher` filters a ``Dataset``, an
``IterableDataset`` or any iterable of rows. Pairs are scored in chunks (encode a chunk, score it, drop its
embeddings), so memory does not grow with the number of pairs. Under ``torch.distributed`` every rank scores its
share of each chunk and the scores are all-gathered: every rank gets the same result.

Hard-negative mining lives in :mod:`conan_hf.data.mining`; its names are re-exported here.

Example::

    >>> from sentence_transformers import SentenceTransformer
    >>> from conan_hf.data.teacher import filter_by_teacher, mine_negative_pools
    >>> teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> kept, report = filter_by_teacher(rows, teacher, threshold=0.4)  # doctest: +SKIP
    >>> pools, mining = mine_negative_pools(kept, teacher, pool_size=30)  # doctest: +SKIP
    >>> pools[0]["negatives"][:2], pools[0]["negative_scores"][:2]  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .mining import MinedPools, MiningReport, mine_negative_ids, mine_negative_pools
from .teacher_common import _check_columns, _load_model, _sharded, _world

__all__ = [
    "MinedPools",
    "MiningReport",
    "TeacherFilterReport",
    "filter_by_teacher",
    "mine_negative_ids",
    "mine_negative_pools",
    "teacher_scores",
]


_SCORE_BLOCK = 2048  # pairs scored at once from a chunk's embeddings


# ---- teacher scores and filter -----------------------------------------------------------------------------------
def _pair_scores(model: Any, queries: list[str], positives: list[str], prompts: list[str | None], *,
                 batch_size: int, query_prompt_name: str | None, document_prompt_name: str | None,
                 show_progress_bar: bool) -> np.ndarray:
    """Teacher score of each pair of one chunk; each distinct text of the chunk is encoded once."""
    if not queries:
        return np.zeros(0, dtype=np.float32)
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
    q_idx = torch.tensor([q_pos[key] for key in zip(prompts, queries)])
    p_idx = torch.tensor([p_pos[t] for t in positives])
    # Scored in blocks, so the gathered (query, positive) embeddings never add two more chunk-sized copies.
    return np.concatenate([
        model.similarity_pairwise(q_emb[q_idx[i:i + _SCORE_BLOCK]], p_emb[p_idx[i:i + _SCORE_BLOCK]]).float().cpu()
        .numpy() for i in range(0, len(q_idx), _SCORE_BLOCK)
    ])


def teacher_scores(
    model: Any,
    queries: list[str],
    positives: list[str],
    *,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    query_prompt: str | Sequence[str | None] | None = None,
    chunk_size: int = 16384,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Teacher similarity of each (query, positive) pair, with the model's own similarity function (usually cosine).

    Queries go through ``encode_query`` and positives through ``encode_document``, so models with query/document
    prompts use them. Pairs are scored ``chunk_size`` at a time (each distinct text of a chunk encoded once, the
    embeddings dropped after the chunk), so memory stays at one chunk of embeddings; when ``torch.distributed`` is
    initialised each rank scores its share of every chunk and the scores are all-gathered (same result on all ranks).

    ``query_prompt`` replaces the teacher's own query prompt: one string for every query (``""``: encode the queries
    exactly as given, for queries that already carry their instruction), or one entry per query (e.g. each row's own
    instruction as ``"Instruct: ...\nQuery: "``; ``None`` entries get the teacher's own prompt). ``None``: the
    teacher's own query prompt (or ``query_prompt_name``) for all.

    Args:
        model: the teacher SentenceTransformer, or a path/name to load one from.
        queries / positives: the pairs, aligned by position.
        batch_size: encoding batch size.
        query_prompt_name / document_prompt_name: prompt names of the teacher for queries / positives.
        query_prompt: see above.
        chunk_size: pairs encoded and scored at once.
        show_progress_bar: show encoding progress.

    Returns:
        A ``float32`` array of one score per pair, in input order.
    """
    if len(queries) != len(positives):
        raise ValueError(f"{len(queries)} queries but {len(positives)} positives")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if query_prompt is None or isinstance(query_prompt, str):
        prompts = [query_prompt] * len(queries)
    else:
        prompts = list(query_prompt)
        if len(prompts) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(prompts)} query prompts")
    model = _load_model(model)
    scores = []
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))

        def compute(a: int, b: int, offset: int = start) -> np.ndarray:
            return _pair_scores(model, list(queries[offset + a:offset + b]), list(positives[offset + a:offset + b]),
                                prompts[offset + a:offset + b], batch_size=batch_size,
                                query_prompt_name=query_prompt_name, document_prompt_name=document_prompt_name,
                                show_progress_bar=show_progress_bar)

        scores.append(_sharded(stop - start, compute))
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


@dataclass
class TeacherFilterReport:
    """Outcome of :func:`filter_by_teacher`; ``scores`` holds the teacher score of every input row, in input order
    (a ``float32`` array: 4 bytes per row)."""

    threshold: float
    total: int
    kept: int
    dropped: int
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)

    def summary(self) -> str:
        s = np.asarray(self.scores)
        stats = f"; scores mean {s.mean():.3f}, min {s.min():.3f}, max {s.max():.3f}" if len(s) else ""
        return (
            f"Teacher filter (threshold {self.threshold}): kept {self.kept} of {self.total} pairs, "
            f"dropped {self.dropped} ({self.dropped / max(self.total, 1):.1%}){stats}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"] = np.asarray(self.scores).tolist()
        return out


_END = object()  # marks an exhausted iterator (a prompt entry may be None)


def _column_chunks(data: Any, chunk_size: int) -> tuple[Iterator[dict[str, list]], list[str] | None]:
    """Iterate ``data`` as ``{column: values}`` chunks of ``chunk_size`` rows; also its column names when known."""
    from datasets import Dataset, IterableDataset

    if isinstance(data, (Dataset, IterableDataset)):
        return data.iter(batch_size=chunk_size), data.column_names

    def rows_to_columns() -> Iterator[dict[str, list]]:
        iterator = iter(data)
        offset, columns = 0, None
        while True:
            rows = [dict(row) for row in itertools.islice(iterator, chunk_size)]
            if not rows:
                return
            columns = columns or list(rows[0])
            for index, row in enumerate(rows):
                if list(row) != columns:
                    raise ValueError(f"row {offset + index + 1} has columns {list(row)}, unlike row 1 ({columns}); "
                                     "every row needs the same columns")
            yield {c: [row[c] for row in rows] for c in columns}
            offset += len(rows)

    return rows_to_columns(), None


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
    query_prompt: str | Sequence[str | None] | Callable[[Mapping[str, Any]], str | None] | None = None,
    chunk_size: int = 16384,
    output_dir: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
    verbose: bool = True,
) -> tuple[Any, TeacherFilterReport]:
    """Drop (query, positive) pairs a teacher scores below ``threshold`` (paper: 0.4; kept iff ``score >= threshold``).

    The data is read and scored ``chunk_size`` rows at a time (see :func:`teacher_scores`): no more than one chunk of
    rows and embeddings is held, plus the kept row numbers and one ``float32`` score per row. Under
    ``torch.distributed`` each rank encodes its share of every chunk; every rank returns the same kept rows.

    Args:
        data: a ``datasets.Dataset`` (the kept rows are a ``select`` of it: nothing is copied), a
            ``datasets.IterableDataset`` or any iterable of row dicts (the kept rows are written chunk by chunk to an
            Arrow file under ``output_dir`` and returned memory-mapped).
        model: a SentenceTransformer or a path/name to load one from.
        score_column: name of the added column holding each kept row's teacher score (``None``: add nothing).
        query_prompt: text put before the queries instead of the teacher's own query prompt: one string for all, one
            per row (``None`` entries: the teacher's own), or a function of the row (for streamed data). Pass ``""``
            when the queries already carry their instruction (e.g. ``"Instruct: ...\nQuery: ..."``), or each row's
            instruction as its prompt, so the teacher sees one instruction, the row's, never its own on top of it.
            ``None`` (default): the teacher's ``query`` prompt, if it has one.
        chunk_size: rows scored at a time.
        output_dir: folder for the kept rows of an iterable input (default: a new temporary folder, kept because
            the returned dataset reads from it). Under ``torch.distributed`` each rank writes its own file.

    Returns:
        ``(kept_dataset, report)``; the kept rows keep their order and all their columns. ``report.total`` counts
        every row read, ``kept + dropped == total``.
    """
    from datasets import Dataset

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    model = _load_model(model)
    chunks, columns = _column_chunks(data, chunk_size)
    if columns is not None:
        _check_columns(columns, query_column, positive_column)
    per_row_prompts = None
    if query_prompt is not None and not isinstance(query_prompt, str) and not callable(query_prompt):
        per_row_prompts = iter(query_prompt)
    in_memory = isinstance(data, Dataset)
    keep_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    writer = path = None
    total = 0
    for chunk in chunks:
        _check_columns(list(chunk), query_column, positive_column)
        queries, positives = chunk[query_column], chunk[positive_column]
        if per_row_prompts is not None:
            prompts = list(itertools.islice(per_row_prompts, len(queries)))
            if len(prompts) != len(queries):
                raise ValueError(f"query_prompt has {total + len(prompts)} entries but the data has more rows")
        elif callable(query_prompt):
            prompts = [query_prompt({c: v[i] for c, v in chunk.items()}) for i in range(len(queries))]
        else:
            prompts = query_prompt
        scores = teacher_scores(model, queries, positives, batch_size=batch_size, query_prompt_name=query_prompt_name,
                                document_prompt_name=document_prompt_name, query_prompt=prompts,
                                chunk_size=len(queries), show_progress_bar=show_progress_bar)
        if np.isnan(scores).any():
            rows = (total + np.flatnonzero(np.isnan(scores))[:10] + 1).tolist()
            raise ValueError(f"the teacher produced NaN scores for rows {rows} (1-based)")
        keep = np.flatnonzero(scores >= threshold)
        score_parts.append(scores.astype(np.float32))
        if in_memory:
            keep_parts.append(total + keep)
        elif len(keep):
            kept_chunk = {c: [v[i] for i in keep] for c, v in chunk.items()}
            if score_column is not None:
                kept_chunk[score_column] = scores[keep].astype(np.float64).tolist()
            if writer is None:
                writer, path = _open_writer(output_dir)
            writer.write_batch(kept_chunk)
        total += len(queries)
    if per_row_prompts is not None and next(per_row_prompts, _END) is not _END:
        raise ValueError(f"query_prompt has more entries than the data has rows ({total})")
    if total == 0:
        raise ValueError("no rows given")
    scores = np.concatenate(score_parts)
    if in_memory:
        keep = np.concatenate(keep_parts)
        dataset = data.add_column(score_column, scores.astype(np.float64)) if score_column is not None else data
        kept = dataset.select(keep)
    elif writer is not None:
        writer.finalize()
        writer.close()
        kept = Dataset.from_file(path)
    else:  # nothing passed: an empty dataset with the input's columns
        names = list(columns or chunk) + ([score_column] if score_column is not None else [])
        kept = Dataset.from_dict({name: [] for name in names})
    n_kept = len(kept)
    report = TeacherFilterReport(threshold=threshold, total=total, kept=n_kept, dropped=total - n_kept, scores=scores)
    if verbose:
        print(report.summary())
    return kept, report


def _open_writer(output_dir: str | os.PathLike | None) -> tuple[Any, str]:
    from datasets.arrow_writer import ArrowWriter

    rank, world = _world()
    folder = str(output_dir) if output_dir is not None else tempfile.mkdtemp(prefix="teacher_filter_")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"kept.rank{rank}.arrow" if world > 1 else "kept.arrow")
    return ArrowWriter(path=path), path
