"""Evaluate a SentenceTransformer with mteb 2.x (paper §4: MTEB / C-MTEB, MRL dimensions, instructions).

`evaluate` runs `mteb.evaluate` on named benchmarks (``"MTEB(eng, v1)"``, ``"MTEB(cmn, v1)"``), mteb task names, or
local tasks from :mod:`conan_hf.eval.tasks`, and returns an :class:`EvalReport` whose summary (one row per task, main
score first) feeds the command line and the model card. mteb computes every metric; each task's mteb result file goes
to ``<output_folder>/<model>/<Task>.json`` (``<model>-dim<d>`` for a Matryoshka dimension), with ``summary.json``
beside them.

Prompts. By default a model is scored exactly as it was trained, and exactly as plain
``mteb.evaluate(SentenceTransformer(path), [task])`` scores it: with its own saved ``prompts`` (stage 4 saves them
under mteb's keys, ``"Retrieval-query"``, ``"Classification"``, ``"STS"``, ``"query"``: see :mod:`conan_hf.prompts`),
and none where it has none. On top of that, optionally:

1. ``instructions={task name or task type: instruction}`` passed here (``--instruction`` on the command line),
2. ``instruction_template`` (opt-in; ``"auto"`` detects it from a ``"query"`` prompt of the form
   ``"Instruct: ...\\nQuery:\n"``): the task's own instruction (``task.metadata.prompt``) formatted with it, for tasks
   the model has no prompt for.

Retrieval instructions go to queries only; symmetric tasks (STS, classification, clustering, ...) prefix every text.

Saved prompt names of older models that mteb does not know (``retrieval``, ``clr``, ``classification``, ``sts``) are
mapped to mteb keys by the task's type (see :func:`mteb_model_prompts`); the others are left out, so mteb sees only
keys it accepts. Each summary row records the prompts a task was encoded with.

Results are filed under the model's name: ``local/<folder>`` for a local folder (``local/<parent>-final`` for a
stage's ``final`` folder), the Hub id otherwise; ``summary.json`` records the model's path and never mixes two models.
When an evaluated file or split is one the model (or a stage before it) was trained on, according to the
``conan_stage.json`` records, a warning says so and the row's ``training_overlap`` lists it.

Example::

    >>> from sentence_transformers import SentenceTransformer
    >>> from conan_hf.eval import evaluate, sts_task
    >>> model = SentenceTransformer("path/to/conan-model", trust_remote_code=True)
    >>> report = evaluate(model, [sts_task("stsb-en-dev.csv")], output_folder="results", dim=256)
    >>> report.main_scores
    {'LocalSTS-stsb-en-dev': 0.81...}
    >>> report = evaluate(model, benchmark="MTEB(cmn, v1)", batch_size=64)   # needs the Hub for the datasets
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conan_hf.prompts import TASK_TYPE_ORDER, TASK_TYPE_PROMPT_KEYS
from conan_hf.sentence import QUERY_PROMPT_FORMAT as CONAN_INSTRUCTION_TEMPLATE

if TYPE_CHECKING:
    from mteb import AbsTask
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

# Also matches the older "...\nQuery:\n" prompts (a space instead of the closing line break) of earlier checkpoints.
_TEMPLATE_PATTERN = re.compile(r"^(Instruct:\s*)(.+?)(\s*\n\s*Query:\s*)$", re.DOTALL)
SUMMARY_FILE = "summary.json"


def detect_instruction_template(prompts: Mapping[str, str | None] | None) -> str | None:
    """The instruction template implied by a model's ``"query"`` prompt, if it has the Conan / E5 form
    ``"Instruct: <instruction>\\nQuery:\n"``; otherwise None.

    >>> detect_instruction_template({"query": "Instruct: Find passages.\\nQuery:\\n"})
    'Instruct: {instruction}\\nQuery:\\n'
    """
    query = (prompts or {}).get("query")
    if not query:
        return None
    match = _TEMPLATE_PATTERN.match(query)
    if not match:
        return None
    return match.group(1) + "{instruction}" + match.group(3)


def load_model(model: str | Path | SentenceTransformer, *, device: str | None = None,
               trust_remote_code: bool = True) -> SentenceTransformer:
    """A SentenceTransformer from a path / Hub id, as saved (:func:`conan_hf.training.models.load_sentence_model`;
    remote code allowed for Conan checkpoints), or the model itself."""
    from sentence_transformers import SentenceTransformer

    from conan_hf.training.models import load_sentence_model

    if isinstance(model, SentenceTransformer):
        return model
    return load_sentence_model(str(model), attention_mode=None, max_seq_length=None, device=device,
                               trust_remote_code=trust_remote_code)


#: Stage-4 task types → the mteb prompt key their prompt serves (see :mod:`conan_hf.prompts`).
TRAINING_TASK_PROMPT_KEYS = TASK_TYPE_PROMPT_KEYS


def _is_mteb_prompt_key(key: str) -> bool:
    """Whether mteb accepts ``key`` (a prompt type, a task type, ``<type>-<prompt type>``, or a registry task name,
    optionally with ``-<prompt type>``) — the rule of ``AbsEncoder.validate_task_to_prompt_name``, without its
    warnings."""
    from typing import get_args

    from mteb.abstasks.task_metadata import TaskType
    from mteb.types import PromptType

    prompt_types = [e.value for e in PromptType]
    base = key.rsplit("-", 1)[0] if key.endswith(tuple(f"-{p}" for p in prompt_types)) else key
    if base in prompt_types or base in get_args(TaskType):
        return True
    import mteb

    try:
        mteb.get_task(base)
    except KeyError:
        return False
    return True


def mteb_model_prompts(
    prompts: Mapping[str, str | None] | None,
    task_types: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """The model's prompts under keys mteb accepts, and the names left out.

    Keys mteb already accepts are kept. Another name is mapped through its training task type (``task_types``, from
    the model's ``conan_stage.json``; a name that is itself a type, as in the demo, is its own type) with
    :data:`TRAINING_TASK_PROMPT_KEYS`, unless the model already has a prompt for that key. ``None`` prompts are
    dropped.

    >>> mteb_model_prompts({"query": "q: ", "qa": "Instruct: find\\nQuery: ", "sts": "s: ", "misc": "m: "},
    ...                    {"qa": "retrieval"})
    ({'query': 'q: ', 'Retrieval-query': 'Instruct: find\\nQuery: ', 'STS': 's: '}, ['misc'])
    """
    task_types = dict(task_types or {})
    mapped: dict[str, str] = {}
    dropped: list[str] = []
    pending: list[tuple[str, str]] = []
    for name, text in (prompts or {}).items():
        if text is None:
            continue
        if _is_mteb_prompt_key(name):
            mapped[name] = text
        else:
            pending.append((name, text))
    # retrieval before clr, so a clr prompt serves Retrieval-query only without a retrieval one
    order = {task_type: rank for rank, task_type in enumerate(TASK_TYPE_ORDER)}
    pending.sort(key=lambda item: order.get(task_types.get(item[0], item[0]), 9))
    for name, text in pending:
        key = TRAINING_TASK_PROMPT_KEYS.get(task_types.get(name, name))
        if key is not None and key not in mapped:
            mapped[key] = text
        else:
            dropped.append(name)
    return mapped, dropped


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


def get_tasks(
    tasks: Iterable[str | AbsTask] | None = None,
    benchmark: str | None = None,
    languages: Sequence[str] | None = None,
) -> list[AbsTask]:
    """Resolve a benchmark name and/or task names (mteb registry) and task objects into one list of tasks."""
    import mteb

    resolved: list[AbsTask] = []
    if benchmark:
        try:
            bench = mteb.get_benchmark(benchmark)
        except KeyError as error:
            raise ValueError(f"Unknown mteb benchmark {benchmark!r}: {error}") from None
        resolved.extend(bench.tasks)
    for task in tasks or ():
        if isinstance(task, str):
            resolved.append(mteb.get_task(task, languages=list(languages) if languages else None))
        else:
            resolved.append(task)
    if not resolved:
        raise ValueError("Nothing to evaluate: give tasks and/or a benchmark.")
    return resolved


def _is_asymmetric(task: AbsTask) -> bool:
    return task.metadata.simplified_task_type == "retrieval" or "Retrieval" in task.metadata.type \
        or "Reranking" in task.metadata.type


def encoded_prompts(task: AbsTask, prompts: Mapping[str, str] | None,
                    model_prompts: Mapping[str, str | None] | None = None,
                    default_prompt_name: str | None = None) -> dict[str, str | None]:
    """The prompts a task's texts are encoded with: ``{"query": ..., "document": ...}`` for retrieval and reranking,
    ``{"text": ...}`` otherwise (None: no prompt). mteb's lookup in ``prompts`` (its ``get_prompt_name``) first;
    without a match, sentence-transformers falls back to the model's own ``"query"`` / ``"document"`` prompt
    (``encode_query`` / ``encode_document``) or its default prompt (``encode``)."""
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType

    model_prompts = model_prompts or {}
    sides = [PromptType.query, PromptType.document] if _is_asymmetric(task) else [None]
    used: dict[str, str | None] = {}
    for side in sides:
        name = get_prompt_name(dict(prompts or {}), task.metadata, side)
        if name is not None:
            text = (prompts or {})[name]
        elif side is not None:
            text = model_prompts.get(side.value)
        else:
            text = model_prompts.get(default_prompt_name) if default_prompt_name else None
        used[side.value if side is not None else "text"] = text or None
    return used


def describe_prompts(used: Mapping[str, str | None]) -> str:
    """One line for :func:`encoded_prompts`: the prompt's repr or ``none`` (``query ..., document ...`` for
    retrieval)."""
    if list(used) == ["text"]:
        return repr(used["text"]) if used["text"] else "none"
    return ", ".join(f"{side} {repr(text) if text else 'none'}" for side, text in used.items())


def _instruction_text(task: AbsTask, instructions: Mapping[str, str] | None) -> str | None:
    """The query instruction of a task: an explicit one (by name, then type), else the task metadata's."""
    if instructions:
        for key in (task.metadata.name, task.metadata.type):
            if key in instructions:
                return instructions[key]
    prompt = task.metadata.prompt
    if isinstance(prompt, dict):
        prompt = prompt.get("query")
    return prompt or None


def task_prompts(
    tasks: Sequence[AbsTask],
    model_prompts: Mapping[str, str | None] | None,
    *,
    instructions: Mapping[str, str] | None = None,
    instruction_template: str | None = None,
) -> dict[str, str]:
    """The per-task prompts to add to mteb's prompt lookup (keys ``"<Task>-query"`` for retrieval queries, ``"<Task>"``
    for symmetric tasks); tasks the model's prompts already name keep them unless ``instructions`` overrides."""
    model_prompts = model_prompts or {}
    added: dict[str, str] = {}
    for task in tasks:
        name = task.metadata.name
        key = f"{name}-query" if _is_asymmetric(task) else name
        explicit = bool(instructions) and (name in instructions or task.metadata.type in instructions)
        if not explicit and (key in model_prompts or name in model_prompts):
            continue
        text = _instruction_text(task, instructions)
        if text is None:
            continue
        if instruction_template is not None:
            added[key] = instruction_template.format(instruction=text)
        elif explicit:
            added[key] = text
    return added


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


def evaluate(
    model: str | Path | SentenceTransformer,
    tasks: Iterable[str | AbsTask] | None = None,
    *,
    benchmark: str | None = None,
    languages: Sequence[str] | None = None,
    instructions: Mapping[str, str] | None = None,
    instruction_template: str | None = None,
    dim: int | None = None,
    batch_size: int = 32,
    output_folder: str | Path | None = None,
    model_name: str | None = None,
    revision: str | None = None,
    overwrite: bool = True,
    show_progress_bar: bool = False,
    raise_error: bool = True,
    embedding_cache: str | Path | None = None,
) -> EvalReport:
    """Evaluate ``model`` with ``mteb.evaluate``.

    Args:
        model: A SentenceTransformer or a path / Hub id to load one from.
        tasks: mteb task names and/or task objects (e.g. from :mod:`conan_hf.eval.tasks`).
        benchmark: An mteb benchmark name such as ``"MTEB(eng, v1)"`` or ``"MTEB(cmn, v1)"`` (added to ``tasks``).
        languages: Language filter for task names (mteb codes, e.g. ``["eng"]``).
        instructions: ``{task name or task type: instruction}``: prompts for these tasks, overriding the model's
            (formatted with ``instruction_template`` when one is given).
        instruction_template: Opt-in. How a task's own instruction becomes a prompt for tasks the model has no
            prompt for, with ``{instruction}``; ``"auto"`` detects it from the model's ``"query"`` prompt (see
            :func:`detect_instruction_template`). None (default): the model's own prompts only, as trained.
        dim: Matryoshka dimension: embeddings are truncated to their first ``dim`` values (cosine similarity
            re-normalises them). Results go to the folder ``<model>-dim<dim>``.
        batch_size: Encoding batch size.
        output_folder: Where the result files go (``<output_folder>/<model>/<Task>.json`` and ``summary.json``);
            None keeps results in memory only.
        model_name: Name recorded in the results (default: ``local/<folder name>`` or the model card's name).
        revision: Revision recorded in the results (default ``"local"``).
        overwrite: Re-run tasks that already have results in ``output_folder``.
        show_progress_bar: Show mteb's and the encoder's progress bars.
        raise_error: Raise on a failing task (else it is logged and skipped).
        embedding_cache: Folder for mteb's ``CachedEmbeddingWrapper``: texts already embedded for a task (e.g. the
            corpus shared by the language subsets of a cross-lingual task) are not encoded again.
    """
    import mteb
    from mteb.models import SentenceTransformerEncoderWrapper

    st_model = load_model(model)
    task_list = get_tasks(tasks, benchmark=benchmark, languages=languages)

    if instruction_template == "auto":
        instruction_template = detect_instruction_template(st_model.prompts)
    if instruction_template is not None and "{instruction}" not in instruction_template:
        raise ValueError(f"instruction_template must contain '{{instruction}}', got {instruction_template!r}")
    if dim is not None:
        full = st_model.get_embedding_dimension() if hasattr(st_model, "get_embedding_dimension") \
            else st_model.get_sentence_embedding_dimension()
        if not 0 < dim <= (full or dim):
            raise ValueError(f"dim must be in 1..{full}, got {dim}")

    model_path = _model_path(model, st_model)
    own_prompts, dropped = mteb_model_prompts(st_model.prompts, _training_task_types(model_path))
    if dropped:
        logger.info("prompts %s have no mteb task type; not used by mteb", dropped)
    saved_prompts = st_model.prompts
    st_model.prompts = own_prompts  # mteb validates (and warns about) the model's prompt names when wrapping it
    try:
        wrapper = SentenceTransformerEncoderWrapper(st_model)
    finally:
        st_model.prompts = saved_prompts
    extra_prompts = task_prompts(task_list, wrapper.model_prompts, instructions=instructions,
                                 instruction_template=instruction_template)
    # mteb validates prompt keys against its task registry, which local tasks are not in; its lookup by task name
    # works for any name, so the per-task prompts are added after validation.
    prompts = {**(wrapper.model_prompts or {}), **extra_prompts}
    wrapper.model_prompts = prompts or None

    name = model_name or _default_model_name(model, st_model, model_path)
    meta_update: dict[str, Any] = {"name": name, "revision": revision or "local"}
    if dim is not None:
        meta_update["embed_dim"] = dim
        meta_update["experiment_kwargs"] = {"dim": dim}
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(update=meta_update)

    encoder: Any = wrapper
    if embedding_cache is not None:
        from mteb.models.cache_wrappers import CachedEmbeddingWrapper

        from conan_hf.eval.cache import EmbeddingCache

        encoder = CachedEmbeddingWrapper(wrapper, embedding_cache, cache_backend=EmbeddingCache)

    results_dir = Path(output_folder) / results_folder_name(name, dim) if output_folder is not None else None
    done: list[Any] = []
    if results_dir is not None and not overwrite:
        from mteb.results import TaskResult

        done = [TaskResult.from_disk(results_dir / f"{t.metadata.name}.json") for t in task_list
                if (results_dir / f"{t.metadata.name}.json").is_file()]
    finished = {result.task_name for result in done}
    sources = training_sources(model_path)
    overlaps = {task.metadata.name: training_overlap(task, sources) for task in task_list}
    for task_name, found in overlaps.items():
        if found:
            logger.warning("%s evaluates data that %s was trained on (its conan_stage.json lists %s): the score is "
                           "not a held-out score", task_name, name, "; ".join(found))
    remaining = [t for t in task_list if t.metadata.name not in finished]
    previous_dim = st_model.truncate_dim
    st_model.truncate_dim = dim
    try:
        model_result = mteb.evaluate(
            encoder, remaining, cache=None,
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
            show_progress_bar=show_progress_bar, raise_error=raise_error, co2_tracker=False,
        ) if remaining else mteb.results.ModelResult(model_name=name, model_revision=meta_update["revision"],
                                                     task_results=[])
    finally:
        st_model.truncate_dim = previous_dim
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        for result in model_result.task_results:
            result.to_disk(results_dir / f"{result.task_name}.json")
    model_result.task_results = [*done, *model_result.task_results]

    by_name = {task.metadata.name: task for task in task_list}
    summary = []
    for result in model_result.task_results:
        task = by_name.get(result.task_name)
        row = {"model": name, **summarize_task_result(task, result)}
        if task is not None:
            row["prompts"] = encoded_prompts(task, prompts, saved_prompts, st_model.default_prompt_name)
            row["training_overlap"] = overlaps[result.task_name]
        summary.append(row)
    settings = {"model_name": name, "model_path": str(model_path.resolve()) if model_path else None,
                "revision": meta_update["revision"], "dim": dim, "batch_size": batch_size,
                "instruction_template": instruction_template, "prompts": prompts,
                "mteb_version": mteb.__version__}
    if results_dir is not None:
        _merge_summary(results_dir / SUMMARY_FILE, settings, summary)
    for error in model_result.exceptions or []:
        logger.error("Task %s failed: %s", error.task_name, error.exception)
    return EvalReport(model_result=model_result, summary=summary, settings=settings, results_dir=results_dir)


def results_folder_name(model_name: str, dim: int | None = None) -> str:
    """The results folder of a model: its name without ``local/``, ``/`` as ``__`` (a Hub id), ``-dim<d>`` added
    for a Matryoshka dimension. ``results_folder_name("local/weak-final", 64) == "weak-final-dim64"``."""
    folder = re.sub(r"[^\w.-]+", "_", model_name.removeprefix("local/").replace("/", "__"))
    return f"{folder}-dim{dim}" if dim is not None else folder


def _default_model_name(model: Any, st_model: SentenceTransformer, path: Path | None = None) -> str:
    """``local/<folder>`` for a local model (``local/<parent>-<folder>`` for a stage's ``final`` or a
    ``checkpoint-N``), the Hub id for a Hub model, else the model card's name."""
    if path is not None:
        path = path.resolve()
        label = path.name
        if label == "final" or label.startswith("checkpoint-"):
            label = f"{path.parent.name}-{label}"
        return "local/" + re.sub(r"[^\w.-]+", "_", label)
    if isinstance(model, (str, Path)):
        return str(model)
    card_name = getattr(getattr(st_model, "model_card_data", None), "model_name", None)
    return card_name if card_name and "/" in card_name else f"local/{card_name or 'model'}"


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


__all__ = [
    "CONAN_INSTRUCTION_TEMPLATE", "TRAINING_TASK_PROMPT_KEYS", "EvalReport", "describe_prompts",
    "detect_instruction_template", "encoded_prompts", "evaluate", "format_table", "get_tasks", "load_model",
    "load_summary", "mteb_model_prompts", "results_folder_name", "stage_records", "summarize_task_result",
    "task_prompts", "training_overlap", "training_sources",
]
