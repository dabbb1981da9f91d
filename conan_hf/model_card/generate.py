"""Generate the README.md (Hugging Face model card) of a trained Conan embedding model.

Everything in the card is read from the run, never typed in by hand (a Hub-ready folder: YAML front matter with
``library_name``, ``pipeline_tag``, tags, ``license`` (apache-2.0 unless ``run_info`` says otherwise), ``language`` (the
training data's, see :func:`training_languages`), ``base_model`` (see :func:`base_model`) and the mteb
``model-index`` from the evaluation results passed in, only those, and only their evaluation splits):

* the saved SentenceTransformer folder: ``config.json`` (architecture table; encoder or decoder, see
  :func:`backbone_attention`), ``model*.safetensors`` headers (parameter count), ``config_sentence_transformers.json``
  (prompts, similarity), ``1_Pooling/config.json``, ``tokenizer_config.json`` (maximum sequence length);
* ``run_info``: what the training stages actually used (see :func:`load_run_info`): the Matryoshka section appears
  only when Matryoshka representation learning was trained, DHNM only when stage 4 ran it on hard negatives the data
  had (the ``tasks`` / ``dhnm`` entries of its record);
* ``results``: evaluation results from :func:`conan_hf.eval.evaluate` / :func:`conan_hf.eval.evaluate_cross_lingual`
  (objects, their ``summary.json`` files, or a results folder), rendered as tables and as the ``model-index`` YAML
  the Hub shows. Scores on a ``train`` split are shown in the table with a note, never in the model-index.

The title and the model id in the usage snippets are ``hub_model_id`` (``--hub-model-id``; else ``run_info``'s
``hub_model_id`` / ``repo_id``, or a stage's recorded ``hub_model_id``), else the output folder's name (a stage's
``<output_dir>/final`` is named after ``<output_dir>``). A decoder exported with stock classes runs bidirectionally
through ``"is_causal": false`` in its ``config.json``, which transformers honours from version :data:`MIN_TRANSFORMERS`
on; the card says so.

Every ``python`` block of the card runs as written in a folder holding the model under its name (tests execute
them). Whether they pass ``trust_remote_code=True`` follows the folder: only a ``config.json`` with ``auto_map``
(Conan's own remote code) needs it, so the card never shows a line that stops at transformers' y/N prompt.

Publishing: the folder (with this README.md) uploads as it is with sentence-transformers'
``SentenceTransformer("conan-v2").push_to_hub("you/conan-v2", local_model_path="conan-v2")``; without
``local_model_path`` sentence-transformers would save the model again and write its own card.

Command line (see :func:`main`)::

    python -m conan_hf.model_card runs/supervised/final --results results/ --hub-model-id me/conan-v2

Example::

    >>> from conan_hf.model_card import generate_model_card
    >>> from conan_hf.eval import evaluate, sts_task
    >>> report = evaluate("out/final", [sts_task("stsb-en-dev.csv")])
    >>> card = generate_model_card("out/final", run_info="runs/run_info.json", results=report)
"""

from __future__ import annotations

import itertools
import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conan_hf.errors import (
    DataError,
    DataFileNotFoundError,
    OneLineArgumentParser,
    cli_errors,
)

TEMPLATE_PATH = Path(__file__).with_name("template.md")
#: The oldest transformers that runs a stock-exported decoder as it was trained: its ``config.json`` says
#: ``"is_causal": false``, which transformers reads from 5.2.0 on (``masking_utils.create_causal_mask`` then builds a
#: bidirectional mask, ``utils.generic.merge_with_config_defaults`` passes ``is_causal`` to the attention kernels);
#: 5.0 and 5.1 ignore it and silently run the decoder causally. setup.cfg's floor is the same.
MIN_TRANSFORMERS = "5.2"

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


#: Rows read from each data source to tell its languages (:func:`data_languages`).
LANGUAGE_SAMPLE_ROWS = 200
#: Scripts that name one language (a text is counted in the script most of its letters are written in; Han text
#: with any kana is Japanese). Latin text is English when English function words are frequent (see below); other
#: scripts (Cyrillic, Arabic, Devanagari, ...) and other Latin-script languages are not told apart: "not recorded".
_SCRIPT_LANGUAGES = {"HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko", "CJK": "zh", "GREEK": "el", "HEBREW": "he",
                     "THAI": "th"}
#: English function words; in English running text they are a quarter or more of the words, in German, French,
#: Spanish and other Latin-script languages a few percent.
_ENGLISH_WORDS = frozenset(["the", "of", "and", "to", "is", "that", "for", "with", "are", "this", "from", "which", "have", "it", "by", "on", "as", "be", "not", "or"])
_ENGLISH_SHARE = 0.10
#: A language is listed when at least this share of a source's sampled texts is in it.
_LANGUAGE_SHARE = 0.05


def _script(text: str) -> str | None:
    """The script most letters of ``text`` are written in (``"LATIN"``, ``"CJK"``, ``"CYRILLIC"``, ...), with
    ``"KATAKANA"`` for Han text that has any kana; None when it has no letters."""
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            counts[name.split(" ", 1)[0] if name else "OTHER"] += 1
    if not counts:
        return None
    script = counts.most_common(1)[0][0]
    if script == "CJK" and (counts["HIRAGANA"] or counts["KATAKANA"]):
        return "KATAKANA"
    return script


def detect_languages(texts: Iterable[str]) -> list[str] | None:
    """ISO 639-1 codes of the languages ``texts`` are written in, or None when some of them cannot be told (see
    :data:`_SCRIPT_LANGUAGES`): every script with at least :data:`_LANGUAGE_SHARE` of the texts must name one
    language, and Latin-script texts must be English (English function words at least :data:`_ENGLISH_SHARE` of
    their words).

    Example::

        >>> detect_languages(["The cat is on the mat.", "大熊猫吃竹子。"])
        ['en', 'zh']
    """
    scripts: Counter[str] = Counter()
    latin_words: list[str] = []
    for text in texts:
        script = _script(text)
        if script is None:
            continue
        scripts[script] += 1
        if script == "LATIN":
            words = re.findall(r"[a-z]+", text.lower())
            if len(words) < 2:  # an id or a label ("doc12", "positive"), not running text
                scripts[script] -= 1
                continue
            latin_words += words
    total = sum(scripts.values())
    languages = set()
    for script, count in scripts.items():
        if count < _LANGUAGE_SHARE * total:
            continue
        if script == "LATIN":
            if not latin_words or sum(w in _ENGLISH_WORDS for w in latin_words) < _ENGLISH_SHARE * len(latin_words):
                return None
            languages.add("en")
        elif script in _SCRIPT_LANGUAGES:
            languages.add(_SCRIPT_LANGUAGES[script])
        else:
            return None
    return sorted(languages) or None


def _source_path(source: Any) -> str | None:
    path = source.get("path") if isinstance(source, Mapping) else source
    return str(path) if isinstance(path, (str, Path)) else None


def _source_languages(source: Any) -> list[str] | None:
    """The languages of one local data source, from its first :data:`LANGUAGE_SAMPLE_ROWS` rows (their texts, and a
    ``language`` column as CLR data has); None for a source that is not on this machine (a Hub name is never
    fetched) or cannot be read or told."""
    import glob

    from conan_hf.data.sources import LOCATION, iter_sources

    path = _source_path(source)
    if path is None or not (Path(path).exists() or glob.glob(path)):
        return None
    texts, named = [], set()
    try:
        for row in itertools.islice(iter_sources([source], None, (), what="model card"), LANGUAGE_SAMPLE_ROWS):
            # conan_hf.data.clr rows: the query is in the row's `language`, the passages in the source language
            language = row.get("language")
            if isinstance(language, str):
                named.add(language)
            for key, value in row.items():
                if key not in (LOCATION, "language") and not (key == "query" and isinstance(language, str)):
                    values = value if isinstance(value, list) else [value]
                    texts += [v for v in values if isinstance(v, str)]
    except (DataError, OSError, ValueError):
        return None
    detected = detect_languages(texts)
    return None if detected is None else sorted(named | set(detected))


def data_languages(info: Mapping[str, Any]) -> list[str] | None:
    """Languages of every data source of the recorded stages (:func:`detect_languages` on a sample of each; the demo
    corpus: :data:`conan_hf.demo.LANGUAGES`), or None when there are no sources or one cannot be told."""
    sources = [src for stage in info.get("stages") or [] for src in _data_sources(_stage_config(stage))]
    if not sources:
        return None
    languages: set[str] = set()
    for source in sources:
        if _is_demo_source(source):
            from conan_hf.demo import LANGUAGES

            found: list[str] | None = list(LANGUAGES)
        else:
            found = _source_languages(source)
        if found is None:
            return None
        languages.update(found)
    return sorted(languages)


def training_languages(info: Mapping[str, Any]) -> list[str] | None:
    """Languages of the training data: ``run_info["languages"]`` when given, else :func:`data_languages` (the
    recorded stages' data, read back); None when they cannot be told (the card then says "not recorded" rather than
    guess)."""
    if info.get("languages"):
        return list(info["languages"])
    return data_languages(info)


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


def _citation() -> str:
    from conan_hf.losses import CONAN_CITATION

    return CONAN_CITATION.strip()


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


# ------------------------------------------------------------------------------------------------ results ------


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


def render_model_card(model_dir: str | Path, run_info: Any = None, results: Any = None,
                      hub_model_id: str | None = None) -> str:
    """The model card of ``model_dir`` as a string (see :func:`generate_model_card`)."""
    import yaml

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataFileNotFoundError("no such model folder" if not model_dir.exists() else "not a folder",
                                    where=str(model_dir), hint="pass a saved SentenceTransformer folder")
    if not (model_dir / "config.json").is_file():
        raise DataFileNotFoundError("no config.json; expected a saved SentenceTransformer folder",
                                    where=str(model_dir))

    def optional_json(*parts: str) -> dict[str, Any]:
        path = model_dir.joinpath(*parts)
        return _read_json(path) if path.exists() else {}

    config = _read_json(model_dir / "config.json")
    st_config = optional_json("config_sentence_transformers.json")
    pooling = optional_json("1_Pooling", "config.json")
    tokenizer_config = optional_json("tokenizer_config.json")
    bert_config = optional_json("sentence_bert_config.json")
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
    hub = _hub_id(hub_model_id, info)
    name = info.get("model_name") or (hub.rsplit("/", 1)[-1] if hub else _output_name(model_dir))
    repo_id = hub or name
    languages = training_languages(info)
    license_name = info.get("license") or "apache-2.0"
    model_index = _model_index(name, rows)
    kind, attention = backbone_attention(config, info)
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

    stock_bidirectional = kind == "decoder" and config.get("is_causal") is False and not remote_code
    requirements = f"Requires `sentence-transformers` and `transformers >= {MIN_TRANSFORMERS}`"
    requirements += (": the decoder runs bidirectionally through `\"is_causal\": false` in its config.json, which "
                     "older transformers ignore (they would silently run it causally)." if stock_bidirectional else ".")
    details = [
        f"| Parameters | {_human(parameters) if parameters else 'unknown'} |",
        f"| Backbone | {kind}, {attention} attention |",
        f"| Embedding dimension | {embedding_dim} |",
        f"| Maximum sequence length | {max_seq_length} tokens |",
        f"| Pooling | {pooling_label} |",
        f"| Similarity | {similarity} |",
        f"| Languages | {', '.join(languages) if languages else 'not recorded'} |",
        f"| License | {license_name} |",
    ]
    if mrl_dims:
        mrl_example = mrl_dims[0] if mrl_dims[0] < (embedding_dim or 0) else embedding_dim
        mrl_section = (
            "### Matryoshka dimensions\n\nTrained with Matryoshka Representation Learning: the first *d* values of "
            "an embedding form a usable *d*-dimensional embedding for *d* in "
            f"{', '.join(str(d) for d in mrl_dims)}.\n\n")
        mrl_usage = string.Template(MRL_USAGE).substitute(
            repo_id=repo_id, remote_code=", trust_remote_code=True" if remote_code else "", mrl_example=mrl_example)
        fast_dim, fast_shape = f"dim={mrl_example}, ", str(mrl_example)
    else:
        mrl_section = mrl_usage = ""
        fast_dim, fast_shape = "", str(embedding_dim)

    description = info.get("description") or (
        "A text embedding model trained with conan-hf following the Conan-Embedding-v2 recipe (arXiv 2509.12892): "
        f"{_backbone_phrase(config, kind, attention)}{f', fine-tuned from `{base}`' if base else ''}, mapping text "
        f"to {embedding_dim}-dimensional vectors for retrieval, semantic similarity, classification and clustering.")

    substitutions = {
        "metadata": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000).strip(),
        "title": name,
        "description": description,
        "details": "\n".join(details),
        "architecture": "\n".join(architecture) or "| (not recorded) | |",
        "mrl_section": mrl_section,
        "mrl_usage": mrl_usage,
        "fast_dim": fast_dim,
        "fast_shape": fast_shape,
        "prompts": _prompts_section(prompts, st_config.get("default_prompt_name")),
        "repo_id": repo_id,
        "remote_code": ", trust_remote_code=True" if remote_code else "",
        "transformers_note": " (the folder's own model code: `trust_remote_code=True`)" if remote_code else "",
        "requirements": requirements,
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


#: The Matryoshka truncation snippet of the usage section (only for a model trained with Matryoshka).
MRL_USAGE = """### Matryoshka truncation

```python
from sentence_transformers import SentenceTransformer

# keep the first ${mrl_example} values of every embedding (re-normalised before cosine similarity)
model = SentenceTransformer("${repo_id}"${remote_code}, truncate_dim=${mrl_example})
embeddings = model.encode(["Matryoshka embeddings nest smaller ones inside."], normalize_embeddings=True)
print(embeddings.shape)  # (1, ${mrl_example})
```

"""


def generate_model_card(model_dir: str | Path, run_info: Any = None, results: Any = None,
                        hub_model_id: str | None = None, output: str | Path | None = None) -> str:
    """Render the model card of ``model_dir`` and write it to ``output`` (default ``model_dir/README.md``); returns
    the text.

    Args:
        model_dir: A saved SentenceTransformer folder.
        run_info: Training record (dict, JSON file, list of stage dicts/files, or folder; see the module docstring).
            Default: ``run_info.json`` or ``conan_stage.json`` in ``model_dir`` when present.
        results: Evaluation results: an ``EvalReport``, a ``CrossLingualReport``, an mteb ``ModelResult``, a
            ``summary.json`` path or results folder, a ``{task: score}`` dict, or a list of these.
        hub_model_id: The Hub repo id (``owner/name``) the card's title and snippets name; default: see the module
            docstring.
        output: Where to write the card.

    Raises:
        DataError: a missing or unreadable input, named with its file (and line).
    """
    card = render_model_card(model_dir, run_info=run_info, results=results, hub_model_id=hub_model_id)
    Path(output or Path(model_dir) / "README.md").write_text(card, encoding="utf-8")
    return card


def build_parser() -> OneLineArgumentParser:
    """The command line of :func:`main` (``python -m conan_hf.model_card``)."""
    parser = OneLineArgumentParser(
        prog="python -m conan_hf.model_card",
        description="Write the model card (README.md with Hub metadata) of a trained Conan embedding model, from "
                    "the saved folder, its training record and evaluation results.")
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a saved SentenceTransformer folder (e.g. runs/supervised/final)")
    parser.add_argument("--run-info", metavar="PATH",
                        help="training record: a run_info JSON, a stage record (conan_stage.json) or a folder of "
                             "stage JSON files (default: MODEL_DIR/run_info.json or MODEL_DIR/conan_stage.json)")
    parser.add_argument("--results", metavar="PATH", nargs="+", action="extend", default=[],
                        help="evaluation results: summary.json files or results folders written by conan-eval")
    parser.add_argument("--hub-model-id", metavar="ID",
                        help="Hub repo id (OWNER/NAME) for the title and the usage snippets (default: the recorded "
                             "hub_model_id, else the output folder's name)")
    parser.add_argument("--output", metavar="README.md",
                        help="where to write the card (default: MODEL_DIR/README.md)")
    return parser


@cli_errors("python -m conan_hf.model_card")
def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m conan_hf.model_card MODEL_DIR [--run-info PATH] [--results PATH ...] [--hub-model-id ID]
    [--output README.md]``: write the card and print where. Bad input (a missing folder or file, unreadable JSON) is
    one line naming the file, exit status 2."""
    args = build_parser().parse_args(argv)
    output = Path(args.output) if args.output else Path(args.model_dir) / "README.md"
    if args.output and not output.parent.is_dir():
        raise DataFileNotFoundError("--output: its folder does not exist", where=str(output))
    generate_model_card(args.model_dir, run_info=args.run_info, results=args.results or None,
                        hub_model_id=args.hub_model_id, output=output)
    print(f"wrote {output}")
    return output


__all__ = ["MIN_TRANSFORMERS", "backbone_attention", "base_model", "build_parser", "count_parameters",
           "data_languages", "detect_languages", "generate_model_card", "is_training_split", "load_run_info", "main",
           "render_model_card", "stage4_facts", "training_languages"]
