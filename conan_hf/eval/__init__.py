"""Evaluation of Conan embedding models (paper §4) on mteb 2.x.

* :mod:`~conan_hf.eval.tasks` — mteb tasks built from local files (STS, pair classification, BEIR and SQuAD
  retrieval, Tatoeba bitext, classification, clustering), so nothing needs the Hub; the files are read by
  :mod:`~conan_hf.eval.local_data`, named by :mod:`~conan_hf.eval.naming`.
* :mod:`~conan_hf.eval.run` — :func:`evaluate` a SentenceTransformer on benchmarks / tasks with the prompts it was
  trained with (as plain ``mteb.evaluate`` does; task instructions on request), an MRL dimension and result files
  ``<output>/<model>/<task>.json``; its prompts come from :mod:`~conan_hf.eval.prompting`, its warnings about
  training data from :mod:`~conan_hf.eval.overlap`, its :class:`EvalReport` and ``summary.json`` from
  :mod:`~conan_hf.eval.report`.
* :mod:`~conan_hf.eval.xling` — MKQA-style cross-lingual retrieval (Tables 3 and 13).
* :mod:`~conan_hf.eval.plot` — the language-distribution plot of Fig. 3.
* ``python -m conan_hf.eval`` / ``conan-eval`` — the command line.

mteb, matplotlib and scikit-learn are imported only when a function needs them.
"""

from __future__ import annotations

from .plot import plot_language_distribution
from .run import (
    EvalReport,
    detect_instruction_template,
    evaluate,
    get_tasks,
    load_summary,
)
from .tasks import (
    DataFormatError,
    bitext_task,
    classification_task,
    clustering_task,
    pair_task,
    retrieval_task,
    squad_retrieval_task,
    sts_task,
    task_from_path,
)
from .xling import (
    CrossLingualData,
    CrossLingualReport,
    evaluate_cross_lingual,
    load_mkqa,
    load_xquad,
)

__all__ = [
    "CrossLingualData",
    "CrossLingualReport",
    "DataFormatError",
    "EvalReport",
    "bitext_task",
    "classification_task",
    "clustering_task",
    "detect_instruction_template",
    "evaluate",
    "evaluate_cross_lingual",
    "get_tasks",
    "load_mkqa",
    "load_summary",
    "load_xquad",
    "pair_task",
    "plot_language_distribution",
    "retrieval_task",
    "squad_retrieval_task",
    "sts_task",
    "task_from_path",
]
