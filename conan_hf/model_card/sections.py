"""The Markdown sections of the model card: the backbone phrase, the training stages, the evaluation tables, the
prompts and the pooling snippet.

Each function returns the text that fills one ``${...}`` slot of ``template.md`` (see
:func:`conan_hf.model_card.generate.render_model_card`); what a section states comes from the run's record
(:mod:`conan_hf.model_card.run_info`) and the evaluation rows (:mod:`conan_hf.model_card.results`).

Example::

    >>> _prompts_section({"query": "Represent this question: "}, None).splitlines()[-1]
    '| `query` | `Represent this question: ` |'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .results import _is_cross_lingual, _row_splits, is_training_split
from .run_info import stage4_facts

STAGE_OBJECTIVES = {
    "tokenizer": "Byte-level BPE tokenizer trained on the corpus (stage 0)",
    "pretrain": "LLM pre-training: next-token prediction (§3.1, stage 1)",
    "sft": "Supervised fine-tuning of the LLM on instruction–response pairs (§3.1, stage 2)",
    "weak": "Weakly-supervised contrastive training (InfoNCE) with the soft mask moving attention from causal to "
            "bidirectional (§3.2, stage 3)",
    "supervised": "Supervised multi-task fine-tuning (§3.4–3.5, stage 4)",
}

# Hyper-parameters worth a line in the card (a raw TrainingArguments dump has ~100 keys).
KEY_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "warmup_ratio", "warmup_steps", "weight_decay", "lr_scheduler_type", "optim", "max_seq_length",
    "temperature", "num_negatives", "cosent_scale", "matryoshka", "matryoshka_dims", "dhnm", "dhnm_s0_min",
    "dhnm_drop_ratio", "dhnm_s_max", "dhnm_score_baseline", "soft_mask_schedule", "soft_mask_steps", "pooling", "lora",
    "bf16", "fp16", "gradient_checkpointing", "seed", "vocab_size", "min_frequency", "multi_dataset_sampler",
    "pool_size",
)
_SKIP_KEYS = {"output_dir", "logging_dir", "resume", "resume_from_checkpoint", "presets", "run_name", "push_to_hub",
              "hub_model_id", "report_to", "num_threads", "save_steps", "save_total_limit", "logging_steps"}


def _backbone_phrase(config: Mapping[str, Any], kind: str, attention: str) -> str:
    """E.g. "a 6-layer BERT encoder (`BertModel`, bidirectional attention)"."""
    layers = config.get("num_hidden_layers")
    size = f"{layers}-layer " if layers else ""
    architecture = (config.get("architectures") or [None])[0] or config.get("model_type") or "transformer"
    if kind == "encoder":
        return f"a {size}encoder backbone (`{architecture}`, bidirectional attention)"
    if kind == "decoder":
        how = {"bidirectional": "run bidirectionally", "causal": "with causal attention",
               "soft": "with the soft attention mask of stage 3"}.get(attention, f"with {attention} attention")
        return f"a {size}decoder backbone (`{architecture}`) {how}"
    return f"a {size}`{architecture}` backbone"


def _stage4_objective(facts: Mapping[str, Any]) -> str:
    """The objective line of a stage-4 record: only the losses and mechanisms the run used."""
    parts = []
    if any(t != "sts" for t in facts["task_types"]):
        infonce = "InfoNCE"
        if facts["hard_negatives"]:
            infonce += " with hard negatives from the data"
            if facts["dhnm"] is not None:
                infonce += ", replaced when they became easy by dynamic hard-negative mining (DHNM, eq. 6)"
        elif facts["hard_negatives"] == 0:
            infonce += " with in-batch negatives only (the data had no hard negatives)"
        parts.append(infonce)
    if "sts" in facts["task_types"]:
        parts.append("CoSENT for STS")
    if facts["matryoshka"]:
        parts.append("Matryoshka representation learning")
    if not parts:
        return STAGE_OBJECTIVES["supervised"]
    return f"Supervised multi-task fine-tuning: {'; '.join(parts)} (§3.4–3.5, stage 4)"


def _stage_fields(stage: Mapping[str, Any]) -> tuple[str, str, list[str], dict[str, Any], dict[str, Any]]:
    """(name, objective, datasets, hyper-parameters, summary) of a stage in either accepted form."""
    name = str(stage.get("name") or stage.get("stage") or "stage")
    objective = stage.get("objective") or STAGE_OBJECTIVES.get(name, "")
    facts = stage4_facts(stage) if name == "supervised" else None
    if facts is not None and not stage.get("objective"):
        objective = _stage4_objective(facts)
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
    if facts is not None and facts["dhnm"] is None:  # DHNM's options mean nothing for a run it did not act in
        hyper = {k: v for k, v in hyper.items() if not k.startswith("dhnm")}
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
    for stage, (name, _, _, hyper, summary) in zip(stages, parsed):
        lines += ["", f"#### {name}", ""]
        if hyper:
            lines += ["| Hyper-parameter | Value |", "|---|---|"]
            lines += [f"| `{k}` | {_md_cell(v)} |" for k, v in hyper.items()]
        else:
            lines.append("_No hyper-parameters recorded._")
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
        if scalars:
            lines += ["", "Run summary: " + ", ".join(f"{k} = {_format_value(v)}" for k, v in scalars.items())]
        dhnm = stage4_facts(stage)["dhnm"] if name == "supervised" else None
        if dhnm is not None:
            note = f"DHNM: {dhnm.get('replaced', 0)} hard negatives replaced, {dhnm.get('used', 0)} of them trained on"
            lines += ["", note + " at a later visit."]
    return "\n".join(lines)


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
    notes = ["Scores are percentages, computed with mteb."]
    trained_on = sorted({str(row["task"]) for row in rows if any(is_training_split(s) for s in _row_splits(row))})
    if trained_on:
        notes.append(f"Scored on a training split, which the model may have been trained on (not in the "
                     f"model-index): {', '.join(trained_on)}.")
    return "\n".join(lines + ["", " ".join(notes)])


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
