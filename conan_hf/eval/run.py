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

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conan_hf.sentence import QUERY_PROMPT_FORMAT as CONAN_INSTRUCTION_TEMPLATE

from .overlap import (
    _model_path,
    _training_task_types,
    stage_records,
    training_overlap,
    training_sources,
)
from .prompting import (
    TRAINING_TASK_PROMPT_KEYS,
    describe_prompts,
    detect_instruction_template,
    encoded_prompts,
    mteb_model_prompts,
    task_prompts,
)
from .report import (
    SUMMARY_FILE,
    EvalReport,
    _merge_summary,
    format_table,
    load_summary,
    results_folder_name,
    summarize_task_result,
)

if TYPE_CHECKING:
    from mteb import AbsTask
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


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


__all__ = [
    "CONAN_INSTRUCTION_TEMPLATE", "TRAINING_TASK_PROMPT_KEYS", "EvalReport", "describe_prompts",
    "detect_instruction_template", "encoded_prompts", "evaluate", "format_table", "get_tasks", "load_model",
    "load_summary", "mteb_model_prompts", "results_folder_name", "stage_records", "summarize_task_result",
    "task_prompts", "training_overlap", "training_sources",
]
