"""The prompts a model is evaluated with: its saved prompts under the keys mteb accepts, and optional instructions.

:func:`mteb_model_prompts` maps a model's saved prompt names to mteb's keys (through the training task types of its
``conan_stage.json``), :func:`task_prompts` adds per-task instructions (``instructions=`` or the task metadata's,
formatted with an instruction template such as the one :func:`detect_instruction_template` finds), and
:func:`encoded_prompts` / :func:`describe_prompts` tell which prompt each task's texts were encoded with (the
``prompts`` of a summary row). See :mod:`conan_hf.eval.run` for how :func:`~conan_hf.eval.run.evaluate` uses them.

Example::

    >>> detect_instruction_template({"query": "Instruct: Find passages.\\nQuery:\\n"})
    'Instruct: {instruction}\\nQuery:\\n'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from conan_hf.prompts import TASK_TYPE_ORDER, TASK_TYPE_PROMPT_KEYS

if TYPE_CHECKING:
    from mteb import AbsTask


# Also matches the older "...\nQuery:\n" prompts (a space instead of the closing line break) of earlier checkpoints.
_TEMPLATE_PATTERN = re.compile(r"^(Instruct:\s*)(.+?)(\s*\n\s*Query:\s*)$", re.DOTALL)


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


__all__ = ["TRAINING_TASK_PROMPT_KEYS", "describe_prompts", "detect_instruction_template", "encoded_prompts",
           "mteb_model_prompts", "task_prompts"]
