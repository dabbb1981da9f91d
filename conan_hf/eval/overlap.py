"""What a model was trained on, from the ``conan_stage.json`` records of its folder and of the stages before it.

:func:`stage_records` follows a model folder back through the stages it was trained from; :func:`training_sources`
lists the local data they read, and :func:`training_overlap` the evaluated files or splits of a local task that are
among them (:func:`~conan_hf.eval.run.evaluate` warns about those and records them in the summary row's
``training_overlap``).

Example::

    >>> from pathlib import Path
    >>> from conan_hf.eval.overlap import training_overlap, training_sources
    >>> from conan_hf.eval.tasks import sts_task
    >>> training_overlap(sts_task("data/sts/stsb-en-train.jsonl"), training_sources(Path("runs/supervised/final")))
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mteb import AbsTask
    from sentence_transformers import SentenceTransformer


def _model_path(model: Any, st_model: SentenceTransformer) -> Path | None:
    """The local folder the model was loaded from, if any."""
    if isinstance(model, (str, Path)):
        return Path(model) if Path(model).exists() else None
    try:
        source = st_model[0].auto_model.config._name_or_path
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return Path(source) if source and Path(source).exists() else None


def stage_records(path: Path | None, max_depth: int = 8) -> list[dict[str, Any]]:
    """The ``conan_stage.json`` records of a model folder and of the stages it was trained from (each record's
    ``config.model``, while that is a folder with a record), newest first; empty when the folder has none."""
    from conan_hf.training.checkpoints import STAGE_RECORD

    records: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while path is not None and len(records) < max_depth and path.resolve() not in seen:
        seen.add(path.resolve())
        try:
            record = json.loads((path / STAGE_RECORD).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            break
        if not isinstance(record, dict):
            break
        records.append(record)
        previous = (record.get("config") or {}).get("model")
        path = Path(previous) if isinstance(previous, str) and Path(previous).is_dir() else None
    return records


def _training_task_types(path: Path | None) -> dict[str, str]:
    """``{task name: type}`` of the stage-4 record in the model folder (empty when there is none)."""
    records = stage_records(path, max_depth=1)
    tasks = ((records[0].get("summary") or {}).get("tasks") or {}) if records else {}
    return {name: info.get("type") for name, info in tasks.items() if isinstance(info, dict) and info.get("type")}


def _data_entries(config: Any) -> Iterable[tuple[str, str]]:
    """``(path, split)`` of every ``data:`` source in a stage config, stage 4's ``tasks`` included (the split of a
    source defaults to ``train``, as in :class:`conan_hf.data.sources.Source`)."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            if key != "data":
                yield from _data_entries(value)
                continue
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, str):
                    yield entry, "train"
                elif isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
                    yield entry["path"], str(entry.get("split") or "train")
    elif isinstance(config, list):
        for item in config:
            yield from _data_entries(item)


def training_sources(path: Path | None) -> list[tuple[Path, str]]:
    """``(resolved path, split)`` of the local data the model in ``path`` and its earlier stages were trained on,
    from their ``conan_stage.json`` records (globs expanded; the demo corpus and Hub names left out)."""
    sources = []
    for record in stage_records(path):
        for source, split in _data_entries(record.get("config") or {}):
            matches = glob.glob(source) if any(c in source for c in "*?[") else [source]
            sources.extend((Path(m).resolve(), split) for m in matches if source != "demo" and Path(m).exists())
    return sources


def training_overlap(task: AbsTask, sources: Sequence[tuple[Path, str]]) -> list[str]:
    """The evaluated files / splits of a local task that are among the training ``sources``: the same file, the same
    BEIR folder with the same split, or a file ``<split>.*`` inside the evaluated folder (its qrels)."""
    location = str(task.metadata.dataset.get("path", ""))
    if not location.startswith("local:") or not sources:
        return []
    splits = set(task.metadata.eval_splits)
    found = []
    for part in location[len("local:"):].split("|"):
        evaluated = Path(part).resolve()
        if not evaluated.exists():
            continue
        for trained, split in sources:
            same = trained == evaluated and (trained.is_file() or split in splits)
            inside = evaluated.is_dir() and evaluated in trained.parents and trained.stem in splits
            if same or inside:
                found.append(f"{trained} (split {split})" if trained.is_dir() else str(trained))
    return sorted(set(found))


__all__ = ["stage_records", "training_overlap", "training_sources"]
