"""Generate the README.md (Hugging Face model card) of a trained Conan embedding model.

Everything in the card is read from the run, never typed in by hand (a Hub-ready folder: YAML front matter with
``library_name``, ``pipeline_tag``, tags, ``license`` (apache-2.0 unless ``run_info`` says otherwise), ``language`` (the
training data's, see :func:`training_languages`), ``base_model`` (see :func:`base_model`) and the mteb
``model-index`` from the evaluation results passed in, only those):

* the saved SentenceTransformer folder: ``config.json`` (architecture table), ``model*.safetensors`` headers
  (parameter count), ``config_sentence_transformers.json`` (prompts, similarity), ``1_Pooling/config.json``,
  ``tokenizer_config.json`` (maximum sequence length);
* ``run_info``: what the training stages actually used (see :func:`load_run_info`);
* ``results``: evaluation results from :func:`conan_hf.eval.evaluate` / :func:`conan_hf.eval.evaluate_cross_lingual`
  (objects, their ``summary.json`` files, or a results folder), rendered as tables and as the ``model-index`` YAML
  the Hub shows.

``run_info`` format (a dict, a JSON file, a list of stage dicts / JSON files, or a folder of stage JSON files)::

    {
      "model_name": "conan-embedding-v2-demo",          # optional: title and model-index name
      "repo_id": "me/conan-embedding-v2-demo",         # optional: used in the usage snippets
      "description": "...", "license": "apache-2.0", "languages": ["en", "zh"], "tags": ["..."],
      "matryoshka_dims": [64, 128],                    # optional; else from the supervised stage's config
      "stages": [
        {"stage": "pretrain", "config": {...}, "summary": {...}},   # = trainers' conan_stage.json records
        {"name": "sft", "objective": "...", "datasets": ["..."], "hyperparameters": {...}}
      ]
    }

A stage is either a ``conan_stage.json`` record written by the trainers (``stage``, ``config``, ``summary``) or a
hand-written dict (``name``, ``objective``, ``datasets``, ``hyperparameters``). Without ``run_info`` the generator
looks for ``conan_stage.json`` / ``run_info.json`` in the model folder.

Every ``python`` block of the card runs as written in a folder holding the model under its name (tests execute
them). Whether they pass ``trust_remote_code=True`` follows the folder: only a ``config.json`` with ``auto_map``
(Conan's own remote code) needs it, so the card never shows a line that stops at transformers' y/N prompt.

Publishing: the folder (with this README.md) uploads as it is with sentence-transformers'
``SentenceTransformer("conan-v2").push_to_hub("you/conan-v2", local_model_path="conan-v2")``; without
``local_model_path`` sentence-transformers would save the model again and write its own card.

Example::

    >>> from conan_hf.model_card import generate_model_card
    >>> from conan_hf.eval import evaluate, sts_task
    >>> report = evaluate("out/final", [sts_task("stsb-en-dev.csv")])
    >>> card = generate_model_card("out/final", run_info="runs/run_info.json", results=report)
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).with_name("template.md")

STAGE_OBJECTIVES = {
    "tokenizer": "Byte-level BPE tokenizer trained on the corpus (stage 0)",
    "pretrain": "LLM pre-training: next-token prediction (§3.1, stage 1)",
    "sft": "Supervised fine-tuning of the LLM on instruction–response pairs (§3.1, stage 2)",
    "weak": "Weakly-supervised contrastive training (InfoNCE) with the soft mask moving attention from causal to "
            "bidirectional (§3.2, stage 3)",
    "supervised": "Supervised multi-task fine-tuning: InfoNCE with dynamic hard-negative mining, CoSENT for STS, "
                  "Matryoshka (§3.4–3.5, stage 4)",
}

# Hyper-parameters worth a line in the card (a raw TrainingArguments dump has ~100 keys).
KEY_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "warmup_ratio", "warmup_steps", "weight_decay", "lr_scheduler_type", "optim", "max_seq_length",
    "temperature", "num_negatives", "cosent_scale", "matryoshka", "matryoshka_dims", "dhnm", "dhnm_s0_min",
    "dhnm_drop_ratio", "dhnm_s_max", "soft_mask_schedule", "soft_mask_steps", "pooling", "lora", "bf16", "fp16",
    "gradient_checkpointing", "seed", "vocab_size", "min_frequency", "multi_dataset_sampler", "pool_size",
)
_SKIP_KEYS = {"output_dir", "logging_dir", "resume", "resume_from_checkpoint", "presets", "run_name", "push_to_hub",
              "hub_model_id", "report_to", "num_threads", "save_steps", "save_total_limit", "logging_steps"}

ARCHITECTURE_FIELDS = (
    ("model_type", "Model type"), ("architectures", "Architecture"), ("num_hidden_layers", "Layers"),
    ("hidden_size", "Hidden size"), ("num_attention_heads", "Attention heads (query)"),
    ("num_key_value_heads", "Key/value heads"), ("head_dim", "Head dimension"),
    ("intermediate_size", "FFN size"), ("hidden_act", "Activation"), ("vocab_size", "Vocabulary"),
    ("max_position_embeddings", "Max positions"), ("rms_norm_eps", "RMSNorm epsilon"),
    ("attention_mode", "Attention (embedding)"), ("tie_word_embeddings", "Tied embeddings"),
)


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


def training_languages(info: Mapping[str, Any]) -> list[str] | None:
    """Languages of the training data: ``run_info["languages"]`` when given; else, when every data source of the
    recorded stages is the embedded demo corpus, its languages (:data:`conan_hf.demo.LANGUAGES`); else None (the card
    then says "not recorded" rather than guess)."""
    if info.get("languages"):
        return list(info["languages"])
    sources = [src for stage in info.get("stages") or [] for src in _data_sources(_stage_config(stage))]
    if sources and all(_is_demo_source(src) for src in sources):
        from conan_hf.demo import LANGUAGES

        return list(LANGUAGES)
    return None


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


def _citation() -> str:
    from conan_hf.losses import CONAN_CITATION

    return CONAN_CITATION.strip()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None


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


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


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


def _stage_fields(stage: Mapping[str, Any]) -> tuple[str, str, list[str], dict[str, Any], dict[str, Any]]:
    """(name, objective, datasets, hyper-parameters, summary) of a stage in either accepted form."""
    name = str(stage.get("name") or stage.get("stage") or "stage")
    objective = stage.get("objective") or STAGE_OBJECTIVES.get(name, "")
    config = stage.get("hyperparameters")
    explicit = config is not None
    if config is None:
        config = stage.get("config")
    if config is None:
        config = {k: v for k, v in stage.items() if k not in {"name", "stage", "objective", "datasets", "summary"}}
    datasets = stage.get("datasets")
    if datasets is None:
        datasets = _datasets_from_config(config)
    if not explicit:
        interesting = {k: config[k] for k in KEY_HYPERPARAMETERS if k in config}
        config = interesting if interesting or len(config) > 30 else \
            {k: v for k, v in config.items() if k not in _SKIP_KEYS}
    hyper = {k: v for k, v in config.items() if k not in _SKIP_KEYS and k not in {"tasks", "data", "datasets"}}
    summary = stage.get("summary") or {}
    return name, objective, [str(d) for d in datasets], hyper, summary


def _datasets_from_config(config: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    tasks = config.get("tasks")
    if isinstance(tasks, list):
        for task in tasks:
            if isinstance(task, Mapping):
                label = task.get("name", "task")
                if task.get("type"):
                    label += f" ({task['type']})"
                names.append(label)
    for key in ("data", "dataset", "datasets", "train_data", "corpus"):
        value = config.get(key)
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, list):
            names.extend(str(v) if not isinstance(v, Mapping) else str(v.get("path", v)) for v in value)
    return names


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    return str(value)


def _md_cell(value: Any) -> str:
    return _format_value(value).replace("|", "\\|").replace("\n", "\\n")


def _training_section(info: Mapping[str, Any]) -> str:
    stages = info.get("stages") or []
    if not stages:
        return "_No training record was provided (`run_info`)._"
    lines = ["| # | Stage | Objective | Data |", "|---|---|---|---|"]
    parsed = [_stage_fields(stage) for stage in stages]
    for i, (name, objective, datasets, _, _) in enumerate(parsed, start=1):
        lines.append(f"| {i} | {_md_cell(name)} | {_md_cell(objective)} | {_md_cell(datasets) or '—'} |")
    for name, _, _, hyper, summary in parsed:
        lines += ["", f"#### {name}", ""]
        if hyper:
            lines += ["| Hyper-parameter | Value |", "|---|---|"]
            lines += [f"| `{k}` | {_md_cell(v)} |" for k, v in hyper.items()]
        else:
            lines.append("_No hyper-parameters recorded._")
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
        if scalars:
            lines += ["", "Run summary: " + ", ".join(f"{k} = {_format_value(v)}" for k, v in scalars.items())]
    return "\n".join(lines)


def _matryoshka_dims(info: Mapping[str, Any], embedding_dim: int | None) -> list[int]:
    if info.get("matryoshka_dims"):
        return sorted(int(d) for d in info["matryoshka_dims"])
    for stage in info.get("stages") or []:
        config = stage.get("config") or stage.get("hyperparameters") or {}
        summary = stage.get("summary") or {}
        if summary.get("matryoshka_dims"):
            return sorted(int(d) for d in summary["matryoshka_dims"])
        if config.get("matryoshka"):
            if config.get("matryoshka_dims"):
                return sorted(int(d) for d in config["matryoshka_dims"])
            if embedding_dim:
                from conan_hf.losses import default_matryoshka_dims

                return list(default_matryoshka_dims(embedding_dim))
    return []


# ------------------------------------------------------------------------------------------------ results ------


def _result_rows(results: Any) -> list[dict[str, Any]]:
    """Summary rows (the format of :class:`conan_hf.eval.run.EvalReport.summary`) from any accepted input."""
    if results is None:
        return []
    if isinstance(results, (list, tuple)):
        return [row for item in results for row in _result_rows(item)]
    if isinstance(results, (str, Path)):
        from conan_hf.eval.run import load_summary

        return _result_rows(load_summary(results))
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


def _evaluation_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_No evaluation results were provided._"
    lines = ["| Task | Type | Metric | Score |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {_md_cell(row['task'])} | {_md_cell(row.get('type') or '—')} | "
                     f"{_md_cell(row.get('main_score_name', 'main_score'))} | {100 * row['main_score']:.2f} |")
    for row in rows:
        if _is_cross_lingual(row):
            lines += ["", f"#### Cross-lingual retrieval: {row['task']} (queries in each language, English corpus)",
                      "", "| Language | nDCG@10 | Recall@20 | Recall@100 |", "|---|---|---|---|"]
            metrics = ("ndcg_at_10", "recall_at_20", "recall_at_100")
            table = {subset.split("-")[0]: values for subset, values in row["subsets"].items()}
            for language, values in table.items():
                lines.append(f"| {language} | " + " | ".join(f"{100 * values[m]:.2f}" for m in metrics) + " |")
            averages = [sum(v[m] for v in table.values()) / len(table) for m in metrics]
            lines.append("| **Avg** | " + " | ".join(f"**{100 * a:.2f}**" for a in averages) + " |")
    settings_note = "Scores are percentages, computed with mteb."
    return "\n".join(lines + ["", settings_note])


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


# ------------------------------------------------------------------------------------------------- card ---------


def _prompts_section(prompts: Mapping[str, str], default_prompt: str | None) -> str:
    if not prompts or not any(prompts.values()):
        return "The model uses no prompts."
    lines = ["Prompts are prepended by `encode_query` / `encode_document` / `encode(prompt_name=...)`.", "",
             "| Name | Prompt |", "|---|---|"]
    lines += [f"| `{name}` | `{_md_cell(text)}` |" for name, text in prompts.items()]
    if default_prompt:
        lines += ["", f"Default prompt: `{default_prompt}`."]
    return "\n".join(lines)


def _pooling_code(mode: str) -> str:
    if mode == "lasttoken":
        return ("mask = batch[\"attention_mask\"]\n"
                "last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # last real token, left or right padding\n"
                "embeddings = hidden[torch.arange(hidden.size(0)), last]")
    if mode == "cls":
        return "embeddings = hidden[:, 0]"
    return ("mask = batch[\"attention_mask\"].unsqueeze(-1).to(hidden.dtype)\n"
            "embeddings = (hidden * mask).sum(dim=1) / mask.sum(dim=1)")


def render_model_card(model_dir: str | Path, run_info: Any = None, results: Any = None) -> str:
    """The model card of ``model_dir`` as a string (see :func:`generate_model_card`)."""
    import yaml

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a saved SentenceTransformer folder")
    config = _read_json(model_dir / "config.json")
    st_config = _read_json(model_dir / "config_sentence_transformers.json") \
        if (model_dir / "config_sentence_transformers.json").exists() else {}
    pooling = _read_json(model_dir / "1_Pooling" / "config.json") if (model_dir / "1_Pooling" / "config.json").exists() \
        else {}
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json") \
        if (model_dir / "tokenizer_config.json").exists() else {}
    bert_config = _read_json(model_dir / "sentence_bert_config.json") \
        if (model_dir / "sentence_bert_config.json").exists() else {}
    info = load_run_info(run_info, model_dir)
    rows = _result_rows(results)

    embedding_dim = pooling.get("embedding_dimension") or pooling.get("word_embedding_dimension") \
        or config.get("hidden_size")
    max_seq_length = bert_config.get("max_seq_length") or tokenizer_config.get("model_max_length") or 512
    if isinstance(max_seq_length, (int, float)) and max_seq_length > 10**8:
        max_seq_length = config.get("max_position_embeddings", 512)
    pooling_mode = pooling.get("pooling_mode") or next(
        (k.replace("pooling_mode_", "").replace("_tokens", "") for k, v in pooling.items()
         if k.startswith("pooling_mode_") and v), "mean")
    if pooling_mode == "mean" and pooling.get("include_prompt") is False:
        pooling_label = "mean over input tokens (prompt tokens excluded)"
    else:
        pooling_label = pooling_mode
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v is not None}
    similarity = st_config.get("similarity_fn_name") or "cosine"
    mrl_dims = _matryoshka_dims(info, embedding_dim)
    parameters = count_parameters(model_dir)
    name = info.get("model_name") or model_dir.name
    repo_id = info.get("repo_id") or name
    languages = training_languages(info)
    license_name = info.get("license") or "apache-2.0"
    model_index = _model_index(name, rows)
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "conan-embedding"]
    if mrl_dims:
        tags.append("matryoshka")
    if model_index:
        tags.append("mteb")  # the model-index below holds mteb results
    tags += [t for t in info.get("tags", []) if t not in tags]

    metadata: dict[str, Any] = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                                "tags": tags, "license": license_name}
    if languages:
        metadata["language"] = list(languages)
    base = base_model(info)
    if base:
        metadata["base_model"] = base
    if model_index:
        metadata["model-index"] = model_index
    # Conan's own architecture is loaded through the folder's code (config.json `auto_map`); a stock architecture
    # loads without it, and asking for it would only add a needless trust decision.
    remote_code = bool(config.get("auto_map"))

    architecture = []
    for key, label in ARCHITECTURE_FIELDS:
        if key in config and config[key] is not None:
            architecture.append(f"| {label} | {_md_cell(config[key])} |")
    rope = config.get("rope_parameters") or {}
    if isinstance(rope, Mapping) and rope.get("rope_theta"):
        architecture.append(f"| RoPE theta | {_format_value(rope['rope_theta'])} |")

    details = [
        f"| Parameters | {_human(parameters) if parameters else 'unknown'} |",
        f"| Embedding dimension | {embedding_dim} |",
        f"| Maximum sequence length | {max_seq_length} tokens |",
        f"| Pooling | {pooling_label} |",
        f"| Similarity | {similarity} |",
        f"| Languages | {', '.join(languages) if languages else 'not recorded'} |",
        f"| License | {license_name} |",
    ]
    if mrl_dims:
        mrl = ("Trained with Matryoshka Representation Learning: the first *d* values of an embedding form a usable "
               f"*d*-dimensional embedding for *d* in {', '.join(str(d) for d in mrl_dims)}.")
        mrl_example = mrl_dims[0] if mrl_dims[0] < (embedding_dim or 0) else embedding_dim
    else:
        mrl = "No Matryoshka dimensions were recorded for this model; truncation is not guaranteed to work well."
        mrl_example = max(1, (embedding_dim or 2) // 2)

    description = info.get("description") or (
        f"A Conan-Embedding-v2 style text embedding model (arXiv 2509.12892) trained with conan-hf: "
        f"a {config.get('num_hidden_layers', '?')}-layer decoder backbone "
        f"run bidirectionally, mapping text to {embedding_dim}-dimensional vectors for retrieval, semantic "
        "similarity, classification and clustering.")

    substitutions = {
        "metadata": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000).strip(),
        "title": name,
        "description": description,
        "details": "\n".join(details),
        "architecture": "\n".join(architecture) or "| (not recorded) | |",
        "mrl": mrl,
        "mrl_example": str(mrl_example),
        "prompts": _prompts_section(prompts, st_config.get("default_prompt_name")),
        "repo_id": repo_id,
        "remote_code": ", trust_remote_code=True" if remote_code else "",
        "transformers_note": " (the folder's own model code: `trust_remote_code=True`)" if remote_code else "",
        "embedding_dim": str(embedding_dim),
        "max_seq_length": str(max_seq_length),
        "transformers_example": '"Paris is the capital of France.", "巴黎是法国的首都。"',
        "pooling_code": _pooling_code(pooling_mode),
        "training": _training_section(info),
        "evaluation": _evaluation_section(rows),
        "citation": _citation(),
    }
    template = string.Template(TEMPLATE_PATH.read_text(encoding="utf-8"))
    return template.substitute(substitutions)


def generate_model_card(model_dir: str | Path, run_info: Any = None, results: Any = None) -> str:
    """Render the model card of ``model_dir`` and write it to ``model_dir/README.md``; returns the text.

    Args:
        model_dir: A saved SentenceTransformer folder.
        run_info: Training record (dict, JSON file, list of stage dicts/files, or folder; see the module docstring).
            Default: ``run_info.json`` or ``conan_stage.json`` in ``model_dir`` when present.
        results: Evaluation results: an ``EvalReport``, a ``CrossLingualReport``, an mteb ``ModelResult``, a
            ``summary.json`` path or results folder, a ``{task: score}`` dict, or a list of these.
    """
    card = render_model_card(model_dir, run_info=run_info, results=results)
    (Path(model_dir) / "README.md").write_text(card, encoding="utf-8")
    return card


__all__ = ["base_model", "count_parameters", "generate_model_card", "load_run_info", "render_model_card",
           "training_languages"]
