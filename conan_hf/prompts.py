"""The prompt names a trained model saves, chosen so that mteb and sentence-transformers use them as trained.

mteb 2.x looks a model's ``prompts`` up by key (``AbsEncoder.validate_task_to_prompt_name`` / ``get_prompt_name``):
a task name of its registry, a task type (``"STS"``, ``"Retrieval"``, ...), either followed by ``-query`` /
``-document``, or a prompt type alone (``"query"``, ``"document"``). Any other key (``"sts"``, ``"qa"``) is refused
with a warning ("Task name sts is not valid") and ignored. Stage 4 therefore saves each training task's prompt under
the key of its task type:

==================  =====================  =============================================================
stage-4 task type   saved prompt name      what mteb encodes with it
==================  =====================  =============================================================
``retrieval``       ``Retrieval-query``    the queries of retrieval tasks (documents: no prompt)
``clr``             ``Retrieval-query``    the same, when no ``retrieval`` task has a prompt
``classification``  ``Classification``     every text of classification tasks
``sts``             ``STS``                both sentences of STS tasks
==================  =====================  =============================================================

A task trained without a prompt saves nothing, so its task type is evaluated without a prompt, as it was trained.
Two tasks whose prompts would share one name keep the first (``retrieval`` before ``clr``, then config order); the
other prompt is left out with a warning (the stage record still lists every task's prompt).

Example::

    >>> mteb_prompt_names([("qa", "retrieval", "Instruct: find\\nQuery:\\n"), ("sim", "sts", None)])
    {'Retrieval-query': 'Instruct: find\\nQuery:\\n'}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)

#: Stage-4 task type -> the mteb prompt key its prompt is saved under.
TASK_TYPE_PROMPT_KEYS = {"retrieval": "Retrieval-query", "clr": "Retrieval-query", "classification": "Classification",
                         "sts": "STS"}
#: Which task type claims a shared key first (a ``clr`` prompt serves retrieval only without a ``retrieval`` one).
TASK_TYPE_ORDER = ("retrieval", "classification", "sts", "clr")


def mteb_prompt_names(tasks: Iterable[tuple[str, str, str | None]]) -> dict[str, str]:
    """The prompts a model trained on ``tasks`` saves, under the names mteb accepts (see the module docstring).

    Args:
        tasks: ``(task name, task type, prompt text or None)`` of each training task, in config order.

    Returns:
        ``{mteb prompt key: prompt text}``; tasks without a prompt contribute nothing.
    """
    ordered = sorted(tasks, key=lambda task: TASK_TYPE_ORDER.index(task[1]) if task[1] in TASK_TYPE_ORDER else 9)
    saved: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name, task_type, prompt in ordered:
        key = TASK_TYPE_PROMPT_KEYS.get(task_type)
        if not prompt or key is None:
            continue
        if key not in saved:
            saved[key], owner[key] = prompt, name
        elif saved[key] != prompt:
            logger.warning("the prompt of task %r is not saved with the model: task %r's prompt already serves mteb's "
                           "%r; give tasks of one type the same prompt to evaluate each as trained", name,
                           owner[key], key)
    return saved


__all__ = ["TASK_TYPE_ORDER", "TASK_TYPE_PROMPT_KEYS", "mteb_prompt_names"]
