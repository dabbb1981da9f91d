"""What the model card reads from the training run and the saved model folder.

The run's record (:func:`load_run_info`: a ``run_info`` dict or JSON file, a stage record ``conan_stage.json`` or a
folder of them) and the saved folder (``config.json``, ``*.safetensors`` headers) give the facts the card states:
:func:`stage4_facts` (what stage 4 actually did), :func:`base_model`, :func:`backbone_attention` (encoder or
decoder, and how it attends), :func:`count_parameters`, the Matryoshka dimensions and the Hub id. Unreadable input is
a :class:`~conan_hf.errors.DataError` naming the file (and line).

Example::

    >>> from conan_hf.model_card.run_info import load_run_info, stage4_facts
    >>> info = load_run_info("runs/supervised/final")  # its run_info.json or conan_stage.json
    >>> facts = [stage4_facts(s) for s in info["stages"] if s.get("name") == "supervised"]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError, DataFileNotFoundError


def _stage_config(stage: Mapping[str, Any]) -> Mapping[str, Any]:
    config = stage.get("config")
    if config is None:
        config = stage.get("hyperparameters")
    return config if isinstance(config, Mapping) else {}


def _data_sources(config: Mapping[str, Any]) -> list[Any]:
    """Every data source of a stage config (``data``, and each ``tasks[*].data`` of stage 4)."""
    def as_list(value: Any) -> list[Any]:
        if value is None:
            return []
        return [value] if isinstance(value, (str, Mapping)) else list(value)

    sources = as_list(config.get("data"))
    for task in config.get("tasks") or []:
        if isinstance(task, Mapping):
            sources += as_list(task.get("data", ["demo"]))
    return sources


def _is_demo_source(source: Any) -> bool:
    """``demo``, or a file the main job wrote from the demo corpus (``<work_dir>/demo-data/*.jsonl``, see
    ``conan_hf.stages.run_all.prepare_demo_data``)."""
    if source == "demo":
        return True
    path = source.get("path") if isinstance(source, Mapping) else source
    return isinstance(path, str) and Path(path).parent.name == "demo-data"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model(info: Mapping[str, Any]) -> str | None:
    """The Hub model this one was fine-tuned from: ``run_info["base_model"]``, else the ``model`` of the earliest
    recorded stage when it names a Hub model (``org/name`` that is no local folder). A model pre-trained from scratch
    (stage 1: ``model`` is ``tiny``/``full``/a config) or started from a local folder has none."""
    if info.get("base_model"):
        return str(info["base_model"])
    for stage in info.get("stages") or []:
        name = str(stage.get("name") or stage.get("stage") or "")
        if name == "tokenizer":
            continue
        if name == "pretrain":
            return None  # trained from scratch
        model = _stage_config(stage).get("model")
        if isinstance(model, str) and _HUB_ID.match(model) and not Path(model).exists():
            return model
        return None
    return None


def backbone_attention(config: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(kind, attention)`` of a saved model: kind ``"encoder"``, ``"decoder"`` or ``"unknown"``; attention
    ``"bidirectional"``, ``"causal"`` or ``"soft"``.

    Read from ``config.json`` first (the folder is the model): Conan's own architecture (``auto_map`` /
    ``model_type: conan``) is a decoder run in its ``attention_mode``; a stock decoder exported by the stages carries
    ``is_causal``. Else the stage records' ``attention`` entry (:func:`conan_hf.training.models.describe_attention`),
    else transformers' registries (a masked-LM architecture is an encoder, a causal-LM one a causal decoder).
    """
    if config.get("auto_map") or config.get("model_type") == "conan":
        return "decoder", str(config.get("attention_mode") or "causal")
    if isinstance(config.get("is_causal"), bool):
        return "decoder", "causal" if config["is_causal"] else "bidirectional"
    for stage in reversed((info or {}).get("stages") or []):
        attention = (stage.get("summary") or {}).get("attention")
        if isinstance(attention, Mapping) and attention.get("kind") in ("encoder", "decoder", "conan"):
            kind = "encoder" if attention["kind"] == "encoder" else "decoder"
            return kind, str(attention.get("attention_mode") or "bidirectional")
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder", "bidirectional"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder", "causal"
    return "unknown", "bidirectional"


def _hub_id(hub_model_id: str | None, info: Mapping[str, Any]) -> str | None:
    """The Hub repo id: the argument, else ``run_info``'s ``hub_model_id`` / ``repo_id``, else the last stage's
    recorded ``hub_model_id``. A malformed id is a :class:`DataError` naming ``--hub-model-id``."""
    hub = hub_model_id or info.get("hub_model_id") or info.get("repo_id")
    if not hub:
        hub = next((_stage_config(stage).get("hub_model_id") for stage in reversed(info.get("stages") or [])
                    if _stage_config(stage).get("hub_model_id")), None)
    if hub and not re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[\w.-]+", str(hub)):
        raise DataError(f"--hub-model-id: {hub!r} is not a Hub repo id", hint="write it as NAME or OWNER/NAME")
    return str(hub) if hub else None


def _output_name(model_dir: Path) -> str:
    """The name a stage's output goes by: the folder's, or for ``<output_dir>/final`` the ``<output_dir>``'s."""
    folder = model_dir.resolve()
    return folder.parent.name if folder.name == "final" and folder.parent.name else folder.name


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`DataError` naming the file (and line) when it is missing or unreadable."""
    if not path.is_file():
        raise DataFileNotFoundError("no such file" if not path.exists() else "not a file", where=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON ({error.msg}, column {error.colno})", where=f"{path}:{error.lineno}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text (byte {error.start})", where=str(path)) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", where=str(path))
    return data


def count_parameters(model_dir: str | Path) -> int | None:
    """Number of parameters in the folder's ``*.safetensors`` files, from their headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _stage_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, (str, Path)):
        return _read_json(Path(item))
    if isinstance(item, Mapping):
        return dict(item)
    raise TypeError(f"A training stage must be a dict or a JSON path, got {type(item).__name__}")


def load_run_info(run_info: Any, model_dir: str | Path | None = None) -> dict[str, Any]:
    """Normalise ``run_info`` (see the module docstring) to ``{..., "stages": [stage dicts]}``."""
    if run_info is None:
        if model_dir is not None:
            folder = Path(model_dir)
            if (folder / "run_info.json").exists():
                return load_run_info(folder / "run_info.json")
            if (folder / "conan_stage.json").exists():
                return {"stages": [_read_json(folder / "conan_stage.json")]}
        return {"stages": []}
    if isinstance(run_info, (str, Path)):
        path = Path(run_info)
        if path.is_dir():
            info: dict[str, Any] = {}
            if (path / "run.json").exists():
                info = _read_json(path / "run.json")
            stage_files = sorted(p for p in path.glob("*.json") if p.name != "run.json")
            info.setdefault("stages", [])
            info["stages"] = list(info["stages"]) + [_read_json(p) for p in stage_files]
            return info
        data = _read_json(path)
        if "stages" not in data and ("stage" in data or "hyperparameters" in data):
            return {"stages": [data]}
        data.setdefault("stages", [])
        return data
    if isinstance(run_info, Mapping):
        info = dict(run_info)
        info["stages"] = [_stage_dict(s) for s in info.get("stages", [])]
        return info
    if isinstance(run_info, Sequence):
        return {"stages": [_stage_dict(s) for s in run_info]}
    raise TypeError(f"run_info must be a dict, a JSON path, a folder or a list of stages, got {type(run_info)}")


def stage4_facts(stage: Mapping[str, Any]) -> dict[str, Any]:
    """What a stage-4 (``supervised``) record says the run did, read from its summary (see
    :func:`conan_hf.stages.supervised.run`), never from its options alone.

    Returns:
        ``{"task_types": [...], "hard_negatives": int | None, "dhnm": dict | None, "matryoshka": bool}``:
        ``hard_negatives`` is the number of candidate negatives the data gave (None when not recorded); ``dhnm`` the
        replacement counts of DHNM when it ran on them (None when it did not, or no negatives to mine were there).
    """
    config = _stage_config(stage)
    summary = stage.get("summary") or {}
    tasks = summary.get("tasks") if isinstance(summary.get("tasks"), Mapping) else {}
    types = [str(t.get("type")) for t in tasks.values() if isinstance(t, Mapping)] or [
        str(t.get("type")) for t in config.get("tasks") or [] if isinstance(t, Mapping) and t.get("type")]
    counts = [t.get("negative_candidates") for t in tasks.values() if isinstance(t, Mapping)]
    negatives = sum(int(c or 0) for c in counts) if counts and all(c is not None for c in counts) else None
    dhnm = summary.get("dhnm") if negatives and config.get("dhnm", True) and isinstance(summary.get("dhnm"),
                                                                                         Mapping) else None
    matryoshka = bool(summary.get("matryoshka_dims")) or (bool(config.get("matryoshka")) and
                                                           "matryoshka_dims" not in summary)
    return {"task_types": types, "hard_negatives": negatives, "dhnm": dhnm, "matryoshka": matryoshka}


def _matryoshka_dims(info: Mapping[str, Any], embedding_dim: int | None) -> list[int]:
    if info.get("matryoshka_dims"):
        return sorted(int(d) for d in info["matryoshka_dims"])
    for stage in info.get("stages") or []:
        config = stage.get("config") or stage.get("hyperparameters") or {}
        summary = stage.get("summary") or {}
        if "matryoshka_dims" in summary:  # a stage-4 record: the dims its loss trained, None without Matryoshka
            if summary["matryoshka_dims"]:
                return sorted(int(d) for d in summary["matryoshka_dims"])
        elif config.get("matryoshka"):
            if config.get("matryoshka_dims"):
                return sorted(int(d) for d in config["matryoshka_dims"])
            if embedding_dim:
                from conan_hf.losses import default_matryoshka_dims

                return list(default_matryoshka_dims(embedding_dim))
    return []


__all__ = ["backbone_attention", "base_model", "count_parameters", "load_run_info", "stage4_facts"]
