"""The opt-in score scale of eq. 6: cosines rescaled so that unrelated texts score about 0.

Eq. 6's thresholds (0.4, 0.7) assume cosines where unrelated texts score near 0. Some models (small or
freshly trained decoders in particular) put every pair near 1; :func:`unrelated_score_baseline` measures the cosine b of
unrelated texts and :func:`rescale_scores` maps a cosine S to ``(S - b) / (1 - b)`` before the rule is applied
(``score_baseline`` of :func:`~conan_hf.dhnm.pool.dhnm_should_replace`, ``DHNMCallback`` and stage 4's
``dhnm_score_baseline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["rescale_scores", "unrelated_score_baseline"]


def rescale_scores(scores: Any, score_baseline: float) -> Any:
    """``(scores - b) / (1 - b)`` for ``b = score_baseline``: b maps to 0 and 1 stays 1. ``scores``: a number, numpy
    array or torch tensor. Raises ValueError unless ``0 <= b < 1``."""
    if not 0.0 <= score_baseline < 1.0:
        raise ValueError(f"score_baseline must be in [0, 1), got {score_baseline!r}")
    return (scores - score_baseline) / (1.0 - score_baseline)


def unrelated_score_baseline(model: Any, queries: Sequence[str], documents: Sequence[str], *,
                             prompt: str | None = None, batch_size: int = 32) -> float:
    """The median cosine between each query and the documents of the *other* rows: the score of unrelated texts under
    ``model`` (a SentenceTransformer), to pass as ``score_baseline``.

    ``queries[i]`` and ``documents[i]`` are a training pair (e.g. a retrieval task's query and positive), so every
    off-diagonal pair of the n × n score matrix is unrelated. Pass a sample of a few hundred rows (the matrix is
    n²); needs at least 2. ``prompt``: the query prompt training uses.

    Example:
        >>> b = unrelated_score_baseline(model, rows["query"][:512], rows["positive"][:512])  # doctest: +SKIP
        >>> # stage 4: --dhnm_score_baseline {b}; your own trainer: DHNMCallback(pool, loss, score_baseline=b)
    """
    n = len(queries)
    if n < 2 or len(documents) != n:
        raise ValueError(f"unrelated_score_baseline needs at least 2 pairs of equal length, got {n} queries and "
                         f"{len(documents)} documents")
    kwargs = {"batch_size": batch_size, "convert_to_numpy": True, "normalize_embeddings": True}
    q = model.encode(list(queries), prompt=prompt, **kwargs)
    d = model.encode(list(documents), **kwargs)
    scores = q @ d.T
    return float(np.median(scores[~np.eye(n, dtype=bool)]))
