"""Hard-negative pool mining with a teacher embedder, at corpus scale (the ranked pools of DHNM, paper §3.4).

Candidates are ranked by the teacher's similarity through a FAISS (or exact) index over embeddings written to a
memory-mapped file, queries searched in chunks; a candidate scoring within ``relative_margin`` of the positive is
skipped as a likely unlabeled positive. :func:`mine_negative_ids` returns the pools as row ids into a text table,
:func:`mine_negative_pools` as texts.

Example::

    >>> from conan_hf.data.mining import mine_negative_pools
    >>> teacher = "sentence-transformers/all-MiniLM-L6-v2"
    >>> pools, report = mine_negative_pools(rows, teacher, pool_size=30)  # doctest: +SKIP
    >>> pools[0]["negatives"][:2], pools[0]["negative_scores"][:2]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .teacher_common import _all_gather_rows, _as_dataset, _check_columns, _load_model, _sharded, _world

__all__ = ["MinedPools", "MiningReport", "mine_negative_ids", "mine_negative_pools"]


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


@dataclass
class MinedPools:
    """Hard-negative pools as row ids into a text table (:func:`mine_negative_ids`).

    Attributes:
        candidate_ids: ``(n_rows, pool_size)`` ``int64``; row ``i`` is the pool of input row ``i``, hardest first, as
            indices into ``texts``; ``-1`` pads pools with fewer than ``pool_size`` candidates (all ``-1``: empty).
        candidate_scores: ``(n_rows, pool_size)`` ``float32`` teacher scores of the candidates (``NaN`` where ``-1``).
        positive_ids: ``(n_rows,)`` ``int64``: each row's positive in ``texts``.
        positive_scores: ``(n_rows,)`` ``float32``: the teacher score of each row's (query, positive).
        texts: the candidate text table: the distinct texts of ``corpus`` in first-occurrence order, then the
            positives not in it. When ``corpus`` is duplicate-free and holds every positive, ids are ``corpus`` rows.
    """

    candidate_ids: np.ndarray
    candidate_scores: np.ndarray
    positive_ids: np.ndarray
    positive_scores: np.ndarray
    texts: list[str] = field(repr=False)

    @property
    def pool_sizes(self) -> np.ndarray:
        """Number of candidates in each row's pool."""
        return (self.candidate_ids >= 0).sum(axis=1)


def _encoder(model: Any, batch_size: int) -> Any:
    """A :class:`~conan_hf.encode.FastEncoder` around ``model`` that leaves its dtype and attention as they are."""
    from conan_hf.encode import FastEncoder

    if isinstance(model, FastEncoder):
        return model
    return FastEncoder(_load_model(model), dtype=None, attn_implementation=None, max_batch_size=batch_size)


def _encode_to_file(encoder: Any, texts: Sequence[str], path: str, *, task: str, prompt_name: str | None,
                    chunk_size: int, desc: str, show_progress_bar: bool) -> int:
    """Embed ``texts`` into the ``float32`` ``.npy`` file ``path``, unit-normalised, ``chunk_size`` texts at a time.

    Each rank encodes its share of a chunk (:func:`_sharded`); the chunk's rows are written with ``os.pwrite`` through
    FastEncoder's row writer, so the file's pages do not stay resident. Returns the embedding dimension.
    """
    from tqdm.auto import tqdm

    from conan_hf.encode import _NpyRowWriter

    dim = int(np.asarray(encoder.encode([texts[0]], task=task, prompt_name=prompt_name,
                                        show_progress_bar=False)).shape[1])
    writer = _NpyRowWriter(path, (len(texts), dim))
    with writer, tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress_bar) as progress:
        for start in range(0, len(texts), chunk_size):
            stop = min(start + chunk_size, len(texts))

            def compute(a: int, b: int, offset: int = start) -> np.ndarray:
                if a == b:
                    return np.zeros((0, dim), dtype=np.float32)
                return np.asarray(encoder.encode(list(texts[offset + a:offset + b]), task=task,
                                                 prompt_name=prompt_name, normalize=True, show_progress_bar=False),
                                  dtype=np.float32)

            embeddings = _sharded(stop - start, compute)
            writer.write(list(range(start, stop)), torch.from_numpy(embeddings))
            progress.update(stop - start)
    return dim


def _read_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a ``.npy`` file, read into memory (the mapping is closed again)."""
    mapped = np.load(path, mmap_mode="r")
    rows = np.array(mapped[start:stop], dtype=np.float32)
    del mapped
    return rows


def _take_rows(path: str, rows: np.ndarray) -> np.ndarray:
    mapped = np.load(path, mmap_mode="r")
    out = np.asarray(mapped[rows], dtype=np.float32)
    del mapped
    return out


class _CorpusIndex:
    """Top-k inner-product search over the unit-norm corpus embeddings in a ``.npy`` file.

    ``kind``:
        - ``"flat"`` — exact: a ``faiss.IndexFlatIP`` filled chunk by chunk (RAM: ``n x dim x 4`` bytes).
        - ``"stream"`` — exact, without holding the corpus: for each query chunk, the corpus is read back
          ``chunk_size`` rows at a time, searched with a temporary ``IndexFlatIP`` and the results merged in a
          ``faiss.ResultHeap`` (RAM: one corpus chunk; the file is re-read once per query chunk, from the page cache
          when it fits there).
        - any other string — a ``faiss.index_factory`` description with the inner-product metric, e.g.
          ``"IVF4096,Flat"``, ``"HNSW32"``, ``"IVF16384,PQ64"`` (approximate; trained on ``train_size`` corpus rows
          sampled with a fixed seed, filled chunk by chunk); ``search_params`` sets its search-time parameters
          (``{"nprobe": 64}``, ``{"efSearch": 256}``) through ``faiss.ParameterSpace``.
    """

    def __init__(self, path: str, n: int, dim: int, kind: str, chunk_size: int, train_size: int,
                 search_params: Mapping[str, Any] | None) -> None:
        import faiss

        self.path, self.n, self.dim, self.kind, self.chunk_size = path, n, dim, kind, chunk_size
        self.index = None
        if kind in ("flat", "stream") and search_params:
            raise ValueError(f"search_params {dict(search_params)} only apply to an approximate index, not {kind!r}")
        if kind == "stream":
            return
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
            if not self.index.is_trained:
                rng = np.random.default_rng(0)
                sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
                self.index.train(_take_rows(path, sample))
        for start in range(0, n, chunk_size):
            self.index.add(_read_rows(path, start, min(start + chunk_size, n)))
        for name, value in (search_params or {}).items():
            faiss.ParameterSpace().set_index_parameter(self.index, name, value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` best corpus rows per query, best first; ids ``-1`` where fewer exist."""
        import faiss

        if self.index is not None:
            scores, ids = self.index.search(queries, k)
            return scores, ids
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        block = faiss.IndexFlatIP(self.dim)
        for start in range(0, self.n, self.chunk_size):
            block.add(_read_rows(self.path, start, min(start + self.chunk_size, self.n)))
            scores, ids = block.search(queries, min(k, block.ntotal))
            block.reset()
            heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
        heap.finalize()
        return heap.D, heap.I


def _filter_candidates(scores: np.ndarray, ids: np.ndarray, positives: np.ndarray, min_positive: np.ndarray, *,
                       range_min: int, pool_size: int, relative_margin: float | None, absolute_margin: float | None,
                       max_score: float | None, min_score: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The pool of each query from its ranked candidates, with ``mine_hard_negatives``' rules (``"top"`` sampling).

    ``positives``: ``(c, P)`` the own-positive ids of each query (``-1`` padded), never candidates;
    ``min_positive``: the lowest (query, positive) score of each query, the reference of the margins. A candidate is
    dropped when ``score + absolute_margin > min_positive`` or ``score > min_positive - |min_positive| *
    relative_margin`` (likely an unlabeled positive), ``score > max_score`` or ``score < min_score``; of those left
    (best first), the first ``range_min`` are skipped and the next ``pool_size`` form the pool.
    """
    scores = scores.astype(np.float32, copy=True)
    removed = ids < 0
    removed |= (ids[:, :, None] == positives[:, None, :]).any(axis=2)
    if absolute_margin is not None:
        removed |= scores + np.float32(absolute_margin) > min_positive[:, None]
    if relative_margin is not None:
        threshold = min_positive - np.abs(min_positive) * np.float32(relative_margin)
        removed |= scores > threshold[:, None]
    if max_score is not None:
        removed |= scores > max_score
    if min_score is not None:
        removed |= scores < min_score
    kept = ~removed
    rank = np.cumsum(kept, axis=1) - 1 - range_min  # position in the pool of each kept candidate
    take = kept & (rank >= 0) & (rank < pool_size)
    rows, cols = np.nonzero(take)
    pool_ids = np.full((len(ids), pool_size), -1, dtype=np.int64)
    pool_scores = np.full((len(ids), pool_size), np.nan, dtype=np.float32)
    pool_ids[rows, rank[rows, cols]] = ids[rows, cols]
    pool_scores[rows, rank[rows, cols]] = scores[rows, cols]
    return pool_ids, pool_scores


def mine_negative_ids(
    data: Iterable[Mapping[str, Any]] | Any,
    model: Any,
    pool_size: int = 30,
    *,
    query_column: str = "query",
    positive_column: str = "positive",
    corpus: Sequence[str] | None = None,
    range_min: int = 0,
    range_max: int | None = None,
    relative_margin: float | None = 0.05,
    absolute_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    corpus_prompt_name: str | None = None,
    index: str = "flat",
    chunk_size: int = 16384,
    search_params: Mapping[str, Any] | None = None,
    train_size: int = 262_144,
    work_dir: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
    verbose: bool = True,
) -> tuple[MinedPools, MiningReport]:
    """Mine a ranked pool of hard negatives for every row and return it as row ids into a text table.

    The candidates are ``corpus`` plus the positives of all rows (deduplicated: :attr:`MinedPools.texts`). They and
    the distinct queries are encoded ``chunk_size`` texts at a time with :class:`~conan_hf.encode.FastEncoder`
    (queries with the teacher's ``query`` prompt or ``query_prompt_name``, candidates with its ``document`` prompt or
    ``corpus_prompt_name``) into unit-norm ``float32`` ``.npy`` files under ``work_dir`` (default: a temporary folder,
    removed at the end; ``(len(texts) + distinct queries) x dim x 4`` bytes of disk). The queries are then searched
    ``chunk_size`` at a time in a FAISS inner-product (= cosine) index (``index``: ``"flat"``, ``"stream"`` or a
    ``faiss.index_factory`` string, see below) for their ``range_max + max_positives`` best candidates, and each
    query's pool is cut from those: a query's own positives are never candidates; candidates within the
    false-negative margin of the query's lowest positive score (``relative_margin``: above ``positive_score -
    |positive_score| * margin``; ``absolute_margin``: above ``positive_score - margin``), above ``max_score`` or
    below ``min_score`` are skipped; of the rest, hardest first, the ``range_min`` best are skipped and the next
    ``pool_size`` form the pool. These are the rules, defaults (``range_max``) and results of sentence-transformers'
    ``mine_hard_negatives(sampling_strategy="top")``, with bounded memory: one chunk of embeddings and scores, plus
    the index and ``n_queries x pool_size`` ids and scores.

    Under ``torch.distributed`` each rank encodes its share of every chunk (the embeddings are all-gathered, and every
    rank writes the whole files to its own ``work_dir``), searches every ``world_size``-th query chunk, and the pools
    are all-gathered: every rank returns the same :class:`MinedPools`.

    Args:
        data: a ``datasets.Dataset`` or an iterable of row dicts with query and positive columns.
        model: the teacher: a SentenceTransformer, a path/name, or a :class:`~conan_hf.encode.FastEncoder` (for its
            batching options; a SentenceTransformer is wrapped in one that leaves its dtype alone).
        pool_size: candidates per pool (DHNM keeps k of them active, the rest are replacements).
        range_max: how many ranked candidates per query the margins and ``range_min`` are applied to (default as
            ``mine_hard_negatives``: ``range_min + 10 * pool_size + max_positives`` with a margin or ``max_score``,
            else ``range_min + pool_size + max_positives``, where ``max_positives`` is the most rows one query has).
        index: ``"flat"`` (exact, ``faiss.IndexFlatIP`` in RAM: ``len(texts) x dim x 4`` bytes), ``"stream"`` (exact,
            the corpus re-read from the file chunk by chunk for each query chunk: RAM independent of the corpus) or a
            ``faiss.index_factory`` description of an approximate index for large corpora (``"HNSW32"``,
            ``"IVF4096,Flat"``, ``"IVF16384,PQ64"``), trained on ``train_size`` sampled corpus embeddings, searched
            with ``search_params`` (e.g. ``{"nprobe": 64}``).
        chunk_size: texts encoded, and queries searched, at a time.

    Returns:
        ``(pools, report)``: :class:`MinedPools` (one pool per input row, in input order; rows of the same query share
        it) and a :class:`MiningReport` (``dropped`` is 0: no row is removed).
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={range_min}")
    dataset = _as_dataset(data)
    _check_columns(dataset.column_names, query_column, positive_column)
    queries, positives = list(dataset[query_column]), list(dataset[positive_column])
    # The text table and the distinct queries, as mine_hard_negatives builds them.
    texts = list(dict.fromkeys([*(corpus if corpus is not None else []), *positives]))
    text_row = {text: i for i, text in enumerate(texts)}
    unique_queries = list(dict.fromkeys(queries))
    query_row = {text: i for i, text in enumerate(unique_queries)}
    row_query = np.fromiter((query_row[q] for q in queries), dtype=np.int64, count=len(queries))
    row_positive = np.fromiter((text_row[p] for p in positives), dtype=np.int64, count=len(positives))
    del text_row, query_row
    max_positives = int(np.bincount(row_query).max())  # rows per query, as mine_hard_negatives counts them
    if range_max is None:
        wide = relative_margin is not None or absolute_margin is not None or max_score is not None
        range_max = range_min + (10 * pool_size if wide else pool_size) + max_positives
    if range_min >= range_max:
        raise ValueError(f"range_min must be smaller than range_max, got range_min={range_min} and "
                         f"range_max={range_max}")
    if pool_size > range_max - range_min:
        raise ValueError(f"Cannot mine {pool_size} negatives per query: only {range_max - range_min} candidates "
                         f"remain after skipping the first range_min={range_min} of range_max={range_max}")
    # Distinct positives of each query as a -1 padded (n_queries, P) table.
    pairs = np.unique(row_query * len(texts) + row_positive)
    pair_query, pair_positive = pairs // len(texts), pairs % len(texts)
    per_query = np.bincount(pair_query, minlength=len(unique_queries))
    starts = np.r_[0, np.cumsum(per_query)[:-1]]
    own_positives = np.full((len(unique_queries), int(per_query.max())), -1, dtype=np.int64)
    own_positives[pair_query, np.arange(len(pairs)) - starts[pair_query]] = pair_positive
    del pairs, pair_query, pair_positive

    encoder = _encoder(model, batch_size)
    owned_dir = None
    if work_dir is None:
        owned_dir = tempfile.TemporaryDirectory(prefix="mining_")
        work_dir = owned_dir.name
    os.makedirs(work_dir, exist_ok=True)
    rank, world = _world()
    suffix = f".rank{rank}" if world > 1 else ""
    corpus_path = os.path.join(str(work_dir), f"corpus_embeddings{suffix}.npy")
    query_path = os.path.join(str(work_dir), f"query_embeddings{suffix}.npy")
    try:
        dim = _encode_to_file(encoder, texts, corpus_path, task="document", prompt_name=corpus_prompt_name,
                              chunk_size=chunk_size, desc="Encoding corpus", show_progress_bar=show_progress_bar)
        _encode_to_file(encoder, unique_queries, query_path, task="query", prompt_name=query_prompt_name,
                        chunk_size=chunk_size, desc="Encoding queries", show_progress_bar=show_progress_bar)
        # Each row's (query, positive) score; the margins refer to the lowest positive score of each query.
        positive_scores = np.empty(len(queries), dtype=np.float32)
        for start in range(0, len(queries), chunk_size):
            stop = min(start + chunk_size, len(queries))
            q = _take_rows(query_path, row_query[start:stop])
            p = _take_rows(corpus_path, row_positive[start:stop])
            positive_scores[start:stop] = (q * p).sum(axis=1)
        min_positive = np.full(len(unique_queries), np.inf, dtype=np.float32)
        np.minimum.at(min_positive, row_query, positive_scores)

        searcher = _CorpusIndex(corpus_path, len(texts), dim, index, chunk_size, train_size, search_params)
        k = range_max + max_positives
        pool_ids = np.full((len(unique_queries), pool_size), -1, dtype=np.int64)
        pool_scores = np.full((len(unique_queries), pool_size), np.nan, dtype=np.float32)
        chunk_starts = list(range(0, len(unique_queries), chunk_size))
        from tqdm.auto import tqdm

        for round_start in tqdm(range(0, len(chunk_starts), world), desc="Searching", unit="chunk",
                                disable=not show_progress_bar):
            # Ranks search different query chunks of a round; their pools are then all-gathered.
            mine = chunk_starts[round_start + rank] if round_start + rank < len(chunk_starts) else None
            if mine is not None:
                stop = min(mine + chunk_size, len(unique_queries))
                scores, ids = searcher.search(_read_rows(query_path, mine, stop), k)
                chunk_ids, chunk_scores = _filter_candidates(
                    scores, ids, own_positives[mine:stop], min_positive[mine:stop], range_min=range_min,
                    pool_size=pool_size, relative_margin=relative_margin, absolute_margin=absolute_margin,
                    max_score=max_score, min_score=min_score)  # fmt: skip
            else:
                chunk_ids = np.zeros((0, pool_size), dtype=np.int64)
                chunk_scores = np.zeros((0, pool_size), dtype=np.float32)
            if world > 1:
                spans = [(s, min(s + chunk_size, len(unique_queries)))
                         for s in chunk_starts[round_start:round_start + world]]
                sizes = [b - a for a, b in spans] + [0] * (world - len(spans))
                chunk_ids = _all_gather_rows(chunk_ids, sizes)
                chunk_scores = _all_gather_rows(chunk_scores, sizes)
                first, last = spans[0][0], spans[-1][1]
            else:
                first, last = mine, stop
            pool_ids[first:last], pool_scores[first:last] = chunk_ids, chunk_scores
        del searcher
    finally:
        for path in (corpus_path, query_path):
            if owned_dir is not None and os.path.exists(path):
                os.remove(path)
        if owned_dir is not None:
            owned_dir.cleanup()

    pools = MinedPools(candidate_ids=pool_ids[row_query], candidate_scores=pool_scores[row_query],
                       positive_ids=row_positive, positive_scores=positive_scores, texts=texts)
    sizes = pools.pool_sizes
    report = MiningReport(
        pool_size=pool_size,
        total=len(sizes),
        full=int((sizes == pool_size).sum()),
        partial=int(((sizes > 0) & (sizes < pool_size)).sum()),
        empty=int((sizes == 0).sum()),
        dropped=0,
        mean_pool_size=float(sizes.mean()) if len(sizes) else 0.0,
    )
    if verbose:
        print(report.summary())
    return pools, report


def mine_negative_pools(
    data: Iterable[Mapping[str, Any]] | Any,
    model: Any,
    pool_size: int = 30,
    *,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str = "negatives",
    scores_column: str | None = "negative_scores",
    corpus: Sequence[str] | None = None,
    range_min: int = 0,
    range_max: int | None = None,
    relative_margin: float | None = 0.05,
    absolute_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    corpus_prompt_name: str | None = None,
    use_faiss: bool = True,
    index: str = "flat",
    chunk_size: int = 16384,
    search_params: Mapping[str, Any] | None = None,
    train_size: int = 262_144,
    work_dir: str | os.PathLike | None = None,
    return_ids: bool = False,
    keep_empty: bool = False,
    show_progress_bar: bool = True,
    verbose: bool = True,
) -> tuple[Any, MiningReport]:
    """Attach to each row a ranked pool of hard negatives for DHNM (see :func:`mine_negative_ids` for how).

    Candidates are the positives of all rows plus ``corpus``; a row's own positives are never its negatives. The pool
    is the top ``pool_size`` candidates by teacher score, after skipping the ``range_min`` best and any candidate
    within the false-negative margin (``relative_margin``: score above ``positive_score - |positive_score| * margin``;
    ``absolute_margin``: above ``positive_score - margin``), ordered from hardest to easiest.

    Args:
        data: a ``datasets.Dataset`` or an iterable of row dicts with query and positive columns.
        model: the teacher SentenceTransformer (or a path/name, or a :class:`~conan_hf.encode.FastEncoder`).
        pool_size: candidates per pool (DHNM keeps k of them active, the rest are replacements).
        negatives_column / scores_column: added columns: the pool (list of texts) and its teacher scores.
        use_faiss: ignored: mining always searches a FAISS index (``index`` chooses which).
        index / chunk_size / search_params / train_size / work_dir: see :func:`mine_negative_ids`.
        return_ids: return :func:`mine_negative_ids`' :class:`MinedPools` (row ids into a text table, ``-1``
            padded, plus scores; every row kept) instead of a dataset with text pools.
        keep_empty: keep rows for which no candidate passed the filters (with an empty pool) instead of dropping them.

    Returns:
        ``(dataset, report)``: the input rows (input order, all columns) with the pool columns (and, with a
        ``scores_column``, the teacher's ``positive_score``; NaN for kept empty pools), and a :class:`MiningReport`.
        With ``return_ids=True``: ``(MinedPools, report)``.
    """
    dataset = _as_dataset(data)
    _check_columns(dataset.column_names, query_column, positive_column)
    if not return_ids:
        for column in (negatives_column, scores_column, "positive_score" if scores_column else None):
            if column is not None and column in dataset.column_names:
                raise ValueError(f"the data already has a {column!r} column; pick another negatives/scores column "
                                 "name")
    pools, report = mine_negative_ids(
        dataset, model, pool_size, query_column=query_column, positive_column=positive_column, corpus=corpus,
        range_min=range_min, range_max=range_max, relative_margin=relative_margin, absolute_margin=absolute_margin,
        max_score=max_score, min_score=min_score, batch_size=batch_size, query_prompt_name=query_prompt_name,
        corpus_prompt_name=corpus_prompt_name, index=index, chunk_size=chunk_size, search_params=search_params,
        train_size=train_size, work_dir=work_dir, show_progress_bar=show_progress_bar, verbose=False,
    )  # fmt: skip
    if return_ids:
        if verbose:
            print(report.summary())
        return pools, report
    sizes = pools.pool_sizes
    keep = np.flatnonzero(sizes > 0) if not keep_empty else np.arange(len(sizes))
    texts = pools.texts
    negatives = [[texts[i] for i in pools.candidate_ids[row, :sizes[row]]] for row in keep]
    report.dropped = int(len(sizes) - len(keep))
    out = dataset.select(keep).add_column(negatives_column, negatives)
    if scores_column is not None:
        neg_scores = [pools.candidate_scores[row, :sizes[row]].astype(np.float64).tolist() for row in keep]
        positive_scores = np.where(sizes[keep] > 0, pools.positive_scores[keep], np.nan).astype(np.float64)
        out = out.add_column(scores_column, neg_scores).add_column("positive_score", positive_scores.tolist())
    if verbose:
        print(report.summary())
    return out, report
