"""Data tooling: the data layer (:mod:`~conan_hf.data.sources`), readers, the cross-lingual retrieval (CLR) builder
(§3.3), translators, teacher filtering and mining. One concept per module; ``docs/data_layer.md`` describes them.

Names are resolved lazily from their submodules, so ``import conan_hf.data`` stays cheap and
``python -m conan_hf.data.clr`` does not import the CLI module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cache": ("RunMemo", "TranslationCache"),
    "clr_build": ("CLRReport", "build_clr_dataset", "write_clr_dataset"),
    "clr_languages": ("TABLE7", "assign_languages", "language_counts", "language_shares"),
    "clr_source": ("RowStream",),
    "tables": ("DataFormatError", "Row", "Rows", "read_table"),
    "corpora": (
        "SquadRows", "beir_pairs", "beir_splits", "read_beir", "read_beir_corpus", "read_bitext", "read_qrels",
        "read_squad", "read_stsb_multi_mt",
    ),
    "readers": ("load_rows",),
    "teacher": ("TeacherFilterReport", "filter_by_teacher", "teacher_scores"),
    "mining": ("MinedPools", "MiningReport", "mine_negative_ids", "mine_negative_pools"),
    "translator": ("CompletedTranslation", "TranslationError", "Translator"),
    "translate_local": ("TransformersTranslator",),
    "translate_openai": ("OpenAITranslator",),
    "translate_parallel": ("ParallelCorpusTranslator",),
    "validate": ("TranslationValidator",),
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
