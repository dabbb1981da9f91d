"""Evaluation results as the model card shows them: summary rows and the Hub's mteb ``model-index``.

:func:`_result_rows` accepts every form results come in (an ``EvalReport``, a ``CrossLingualReport``, an mteb
``ModelResult``, a ``summary.json`` file or a results folder written by ``conan-eval``, a ``{task: score}`` dict, or
a list of these) and returns rows in the format of :class:`conan_hf.eval.run.EvalReport.summary`;
:func:`_model_index` turns them into the ``model-index`` YAML, leaving out scores on training splits
(:func:`is_training_split`).

Example::

    >>> rows = _result_rows({"MyHeldOutCheck": 0.81})
    >>> rows[0]["task"], rows[0]["main_score"], _model_index("conan-v2", rows)
    ('MyHeldOutCheck', 0.81, [])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError, DataFileNotFoundError

from .run_info import _read_json


def _result_rows(results: Any) -> list[dict[str, Any]]:
    """Summary rows (the format of :class:`conan_hf.eval.run.EvalReport.summary`) from any accepted input."""
    if results is None:
        return []
    if isinstance(results, (list, tuple)):
        return [row for item in results for row in _result_rows(item)]
    if isinstance(results, (str, Path)):
        from conan_hf.eval.run import SUMMARY_FILE

        path = Path(results)
        if not path.exists():
            raise DataFileNotFoundError("no such results file or folder", where=str(path))
        files = sorted(path.rglob(SUMMARY_FILE)) if path.is_dir() else [path]
        if not files:
            raise DataFileNotFoundError(f"no {SUMMARY_FILE} under this folder", where=str(path),
                                        hint="pass the folder conan-eval wrote, or its summary.json")
        rows = []
        for file in files:
            try:
                found = _result_rows(_read_json(file))
            except DataError:
                raise
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(f"not an evaluation summary ({error})", where=str(file)) from None
            if not all(isinstance(row, Mapping) and "task" in row and "main_score" in row for row in found):
                raise DataError("not an evaluation summary (a task without `task` or `main_score`)", where=str(file))
            rows += found
        return rows
    if isinstance(results, Mapping):
        if "tasks" in results:
            return [dict(row) for row in results["tasks"]]
        if "per_language" in results:  # CrossLingualReport.to_dict()
            return [_xling_row(results["per_language"], results.get("name", "CrossLingualRetrieval"))]
        if all(isinstance(v, (int, float)) for v in results.values()):  # {task: main score}
            return [{"task": k, "type": "", "main_score_name": "main_score", "main_score": float(v), "splits": [],
                     "languages": [], "dataset": "", "subsets": {}} for k, v in results.items()]
        raise ValueError("Unrecognised results mapping: expected an EvalReport dict / summary.json content, "
                         "a cross-lingual report dict or {task: score}")
    if hasattr(results, "summary") and isinstance(results.summary, list):  # EvalReport
        return [dict(row) for row in results.summary]
    if hasattr(results, "per_language"):  # CrossLingualReport
        if getattr(results, "eval_report", None) is not None:
            return _result_rows(results.eval_report)
        name = getattr(getattr(results, "task_result", None), "task_name", "CrossLingualRetrieval")
        return [_xling_row(results.per_language, name)]
    if hasattr(results, "task_results"):  # mteb ModelResult
        from conan_hf.eval.run import summarize_task_result

        return [summarize_task_result(_registry_task(r.task_name), r) for r in results.task_results]
    raise TypeError(f"Unsupported results object {type(results).__name__}")


def _registry_task(name: str):
    try:
        import mteb

        return mteb.get_task(name)
    except (ImportError, KeyError):  # local tasks are not in the registry; the row then has no type
        return None


def _xling_row(per_language: Mapping[str, Mapping[str, float]], name: str) -> dict[str, Any]:
    subsets = {f"{lang}-en": dict(values) for lang, values in per_language.items()}
    values = [row["recall_at_20"] for row in per_language.values()]
    return {"task": name, "type": "Retrieval", "main_score_name": "recall_at_20",
            "main_score": sum(values) / len(values), "splits": ["test"], "languages": [], "dataset": name,
            "subsets": subsets}


def _is_cross_lingual(row: Mapping[str, Any]) -> bool:
    subsets = row.get("subsets") or {}
    return row.get("type") == "Retrieval" and len(subsets) > 0 and all(
        re.fullmatch(r"[a-z_]+-[a-z_]+", s) for s in subsets) and all("recall_at_100" in v for v in subsets.values())


def is_training_split(split: str) -> bool:
    """Whether an evaluation split is a training split (``train``, ``train_small``, ...): a score on it may be on the
    very examples the model was trained with, so it never goes into the model-index."""
    return str(split).lower().startswith("train")


def _row_splits(row: Mapping[str, Any]) -> list[str]:
    """The splits a summary row was scored on (its ``splits``, or the ``<split>/`` prefixes of its subsets)."""
    splits = list(row.get("splits") or [])
    splits += [subset.split("/", 1)[0] for subset in row.get("subsets") or {} if "/" in subset]
    return sorted(set(splits))


def _model_index(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for row in rows:
        if not row.get("type") and not row.get("splits"):
            continue  # a bare {name: score} (e.g. a held-out check) is no MTEB task: table only, not model-index
        for subset, scores in (row.get("subsets") or {"default": {"main_score": row["main_score"]}}).items():
            if "/" in subset:  # several splits: summary labels are "<split>/<subset>"
                split, config = subset.split("/", 1)
            else:
                split, config = (row.get("splits") or ["test"])[0], subset
            if is_training_split(split):
                continue
            metrics = [{"type": "main_score", "value": round(100 * scores.get("main_score", row["main_score"]), 3)}]
            metric_name = row.get("main_score_name")
            if metric_name and metric_name in scores and metric_name != "main_score":
                metrics.insert(0, {"type": metric_name, "value": round(100 * scores[metric_name], 3)})
            results.append({
                "task": {"type": row.get("type") or "Other"},
                "dataset": {"type": row.get("dataset") or row["task"], "name": f"MTEB {row['task']} ({config})",
                            "config": config, "split": split},
                "metrics": metrics,
            })
    return [{"name": name, "results": results}] if results else []


__all__ = ["is_training_split"]
