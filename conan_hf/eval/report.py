"""The results of an evaluation: :class:`EvalReport`, its summary rows and table, and ``summary.json`` on disk.

Each summary row (:func:`summarize_task_result`) holds one task's main score and its per-subset metrics, as mteb
computed them; :func:`format_table` prints rows as a plain-text table, :func:`results_folder_name` names a model's
results folder, and :func:`load_summary` reads the ``summary.json`` files :func:`~conan_hf.eval.run.evaluate` writes.

Example::

    >>> from conan_hf.eval.report import format_table, load_summary
    >>> print(format_table(load_summary("results")["tasks"]))
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .prompting import describe_prompts

if TYPE_CHECKING:
    from mteb import AbsTask

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class EvalReport:
    """What :func:`evaluate` returns: mteb's ``ModelResult`` and a compact per-task summary.

    Attributes:
        model_result: ``mteb.results.ModelResult`` with every metric mteb computed.
        summary: One dict per task: ``task``, ``type``, ``main_score_name``, ``main_score`` (mean over subsets and
            splits), ``splits``, ``languages``, ``dataset``, and ``subsets`` ({subset: {metric: value}}).
        settings: Model name, revision, MRL dimension, batch size and prompts used.
        results_dir: Folder holding mteb's result files and ``summary.json`` (None without ``output_folder``).
    """

    model_result: Any
    summary: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    results_dir: Path | None = None

    @property
    def main_scores(self) -> dict[str, float]:
        """``{task name: main score}``."""
        return {row["task"]: row["main_score"] for row in self.summary}

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "tasks": self.summary}

    def table(self) -> str:
        """A plain-text table of the main scores: model, task, type, split, metric, score and prompt."""
        return format_table(self.summary)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Summary rows (of one or several models) as a plain-text table, one line per task, scores in %."""
    columns = [("Model", lambda r: r.get("model", "")), ("Task", lambda r: r["task"]), ("Type", lambda r: r["type"]),
               ("Split", lambda r: ",".join(r.get("splits", []))), ("Metric", lambda r: r["main_score_name"]),
               ("Score", lambda r: f"{100 * r['main_score']:.2f}")]
    cells = [[str(get(row)) for _, get in columns] for row in rows]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, (name, _) in enumerate(columns)]
    lines = ["  ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths)) + "  Prompt"]
    for row, line in zip(rows, cells):
        lines.append("  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths)) + "  "
                     + describe_prompts(row.get("prompts") or {"text": None}))
    return "\n".join(lines)


def summarize_task_result(task: AbsTask | None, task_result: Any) -> dict[str, Any]:
    """One summary row from an mteb ``TaskResult`` (and its task, for the type and metric name)."""
    subsets: dict[str, dict[str, float]] = {}
    languages: set[str] = set()
    values = []
    for split, entries in task_result.scores.items():
        for entry in entries:
            label = entry.get("hf_subset", "default") if len(task_result.scores) == 1 else \
                f"{split}/{entry.get('hf_subset', 'default')}"
            subsets[label] = {k: float(v) for k, v in entry.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            languages.update(entry.get("languages", []))
            values.append(float(entry["main_score"]))
    metadata = task.metadata if task is not None else None
    return {
        "task": task_result.task_name,
        "type": metadata.type if metadata else "",
        "main_score_name": metadata.main_score if metadata else "main_score",
        "main_score": sum(values) / len(values),
        "splits": sorted(task_result.scores),
        "languages": sorted(languages),
        "dataset": metadata.dataset["path"] if metadata else "",
        "subsets": subsets,
    }


def results_folder_name(model_name: str, dim: int | None = None) -> str:
    """The results folder of a model: its name without ``local/``, ``/`` as ``__`` (a Hub id), ``-dim<d>`` added
    for a Matryoshka dimension. ``results_folder_name("local/weak-final", 64) == "weak-final-dim64"``."""
    folder = re.sub(r"[^\w.-]+", "_", model_name.removeprefix("local/").replace("/", "__"))
    return f"{folder}-dim{dim}" if dim is not None else folder


def _merge_summary(path: Path, settings: dict[str, Any], summary: list[dict[str, Any]]) -> None:
    """Add this run's rows to ``summary.json`` (a later run of a task replaces its row)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        other = (previous.get("settings") or {}).get("model_path")
        if other and settings.get("model_path") and other != settings["model_path"]:
            logger.warning("%s held results of another model (%s); replacing them with %s's", path, other,
                           settings["model_path"])
        else:
            rows = {row["task"]: row for row in previous.get("tasks", [])}
    rows.update({row["task"]: row for row in summary})
    path.write_text(json.dumps({"settings": settings, "tasks": list(rows.values())}, indent=2, ensure_ascii=False),
                    encoding="utf-8")


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read ``summary.json`` written by :func:`evaluate` (a file, or a folder searched recursively for it)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob(SUMMARY_FILE))
        if not found:
            raise FileNotFoundError(f"No {SUMMARY_FILE} under {path}")
        merged: dict[str, Any] = {"settings": {}, "tasks": []}
        for file in found:
            data = json.loads(file.read_text(encoding="utf-8"))
            merged["settings"] = merged["settings"] or data.get("settings", {})
            merged["tasks"].extend(data.get("tasks", []))
        return merged
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = ["SUMMARY_FILE", "EvalReport", "format_table", "load_summary", "results_folder_name",
           "summarize_task_result"]
