"""Data tooling: readers, the cross-lingual retrieval (CLR) builder (§3.3), translators, teacher filtering and mining.

Names are resolved lazily from their submodules, so ``import conan_hf.data`` stays cheap and
``python -m conan_hf.data.clr`` does not import the CLI module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cache": ("RunMemo", "TranslationCache"),
    "clr": (
        "TABLE7", "CLRReport", "RowStream", "assign_languages", "build_clr_dataset", "language_counts",
        "language_shares", "write_clr_dataset",
    ),
    "readers": (
        "DataFormatError", "Row", "Rows", "SquadRows", "beir_pairs", "beir_splits", "load_rows", "read_beir",
        "read_beir_corpus", "read_bitext", "read_qrels", "read_squad", "read_stsb_multi_mt", "read_table",
    ),
    "teacher": (
        "MinedPools", "MiningReport", "TeacherFilterReport", "filter_by_teacher", "mine_negative_ids",
        "mine_negative_pools", "teacher_scores",
    ),
    "translate": (
        "CompletedTranslation", "OpenAITranslator", "ParallelCorpusTranslator", "TransformersTranslator",
        "TranslationError", "Translator",
    ),
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
