"""Evaluation during training: a dev set of a training task as a sentence-transformers evaluator, which the Trainer
runs every ``eval_steps`` (``eval_strategy: steps``) and which ``load_best_model_at_end`` ranks the checkpoints by.

- an STS dev set (``sentence1, sentence2, score``) becomes an ``EmbeddingSimilarityEvaluator`` (Spearman and
  Pearson correlation of the cosine similarities with the scores; main metric ``spearman_cosine``);
- a retrieval / CLR dev set (``anchor, positive`` and optional negatives) becomes an
  ``InformationRetrievalEvaluator``: the distinct anchors are the queries, the distinct positives and negatives the
  corpus, and each query's positives its relevant documents (main metric ``cosine_ndcg@10``).

Texts are encoded with the prompt the task trains with (the anchors only for retrieval, both sentences for STS), so the
dev score is the one of the model as it is trained. Metric names are prefixed with the task's name, and the Trainer
adds ``eval_``: ``eval_sts_spearman_cosine``.

Example::

    >>> evaluator = dev_evaluator("sts", "sts", [({"sentence1": "a", "sentence2": "b", "score": 1.0}, []), ...],
    ...                           prompt=None)  # doctest: +SKIP
    >>> evaluator(model)["sts_spearman_cosine"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sentence_transformers.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
    SimilarityFunction,
)
from sentence_transformers.util import cos_sim

from conan_hf.errors import DataError

#: The main metric of each dev-set type (without the task-name prefix).
DEV_METRICS = {"sts": "spearman_cosine", "retrieval": "cosine_ndcg@10", "clr": "cosine_ndcg@10"}


def dev_metric(name: str, task_type: str) -> str:
    """The main metric of the dev set of task ``name`` (``"sts_spearman_cosine"``), as the Trainer's
    ``metric_for_best_model`` names it (the Trainer adds the ``eval_`` prefix)."""
    return f"{name}_{DEV_METRICS[task_type]}"


class PromptedSimilarityEvaluator(EmbeddingSimilarityEvaluator):
    """sentence-transformers' ``EmbeddingSimilarityEvaluator`` that encodes both sentences with ``prompt`` (a text
    prepended to each, as ``SentenceTransformer.encode(prompt=...)``; ``None``: none)."""

    def __init__(self, *args: Any, prompt: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prompt = prompt

    def embed_inputs(self, model, sentences, **kwargs):
        return super().embed_inputs(model, sentences, prompt=self.prompt, **kwargs)


def dev_evaluator(name: str, task_type: str, examples: Iterable[tuple[dict[str, Any], list[str]]],
                  prompt: str | None = None, batch_size: int = 32):
    """The evaluator of a task's dev set.

    Args:
        name: the task's name (the prefix of its metric names).
        task_type: ``sts``, ``retrieval`` or ``clr``.
        examples: ``(row, negatives)`` pairs as :func:`conan_hf.stages.supervised.iter_task_examples` yields them
            (``sentence1, sentence2, score`` rows for STS; ``anchor, positive`` rows with ranked negatives otherwise).
        prompt: the task's training prompt (``None``: none).
        batch_size: texts encoded at once.

    Returns:
        an ``EmbeddingSimilarityEvaluator`` (STS) or ``InformationRetrievalEvaluator`` (retrieval, CLR).
    """
    if task_type not in DEV_METRICS:
        raise DataError(f"eval_data: task {name!r} is a {task_type} task, which has no dev evaluation",
                        hint=f"give dev data for tasks of type {sorted(DEV_METRICS)}")
    rows = list(examples)
    if task_type == "sts":
        if len(rows) < 2:
            raise DataError(f"eval_data: the dev set of task {name!r} has {len(rows)} pair(s)",
                            hint="give at least 2 scored pairs (a correlation needs them)")
        return PromptedSimilarityEvaluator([r["sentence1"] for r, _ in rows], [r["sentence2"] for r, _ in rows],
                                           [float(r["score"]) for r, _ in rows], prompt=prompt, batch_size=batch_size,
                                           main_similarity=SimilarityFunction.COSINE, name=name, write_csv=False)
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}

    def text_id(texts: dict[str, str], text: str, prefix: str) -> str:
        return texts.setdefault(text, f"{prefix}{len(texts)}")

    for row, negatives in rows:
        query = text_id(queries, row["anchor"], "q")
        relevant.setdefault(query, set()).add(text_id(corpus, row["positive"], "d"))
        for negative in negatives:
            text_id(corpus, negative, "d")
    return InformationRetrievalEvaluator(
        {i: t for t, i in queries.items()}, {i: t for t, i in corpus.items()}, relevant, batch_size=batch_size,
        name=name, write_csv=False, score_functions={"cosine": cos_sim}, main_score_function="cosine",
        query_prompt=prompt)


__all__ = ["DEV_METRICS", "PromptedSimilarityEvaluator", "dev_evaluator", "dev_metric"]
