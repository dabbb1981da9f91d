"""conan-hf: Conan-Embedding-v2 (arXiv 2509.12892) for the Hugging Face ecosystem.

Importing the package registers the ``"conan"`` model type with transformers' Auto classes.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_conan import ConanConfig
from .modeling_conan import ConanForCausalLM, ConanModel, ConanPreTrainedModel
from .soft_mask import (
    SOFT_MASK_SCHEDULES,
    apply_soft_mask,
    get_soft_mask_alpha,
    plot_soft_mask,
    remove_soft_mask,
    set_soft_mask_alpha,
    set_soft_mask_length,
    soft_mask_alpha,
    soft_mask_matrix,
)

__version__ = "0.1.0"

AutoConfig.register("conan", ConanConfig, exist_ok=True)
AutoModel.register(ConanConfig, ConanModel, exist_ok=True)
AutoModelForCausalLM.register(ConanConfig, ConanForCausalLM, exist_ok=True)


#: The public API beyond the model classes: name -> submodule. These load on first use (sentence-transformers,
#: datasets, tokenizers), so `import conan_hf` stays cheap.
_LAZY = {
    "build_sentence_transformer": ("sentence", "build_sentence_transformer"),
    "format_query_prompt": ("sentence", "format_query_prompt"),
    "check_prompt_boundary": ("sentence", "check_prompt_boundary"),
    "train_tokenizer": ("tokenizer", "train_tokenizer"),
    "demo_tokenizer": ("tokenizer", "demo_tokenizer"),
    "FastEncoder": ("encode", "FastEncoder"),
    "InfoNCELoss": ("losses", "InfoNCELoss"),
    "CoSENTLoss": ("losses", "CoSENTLoss"),
    "MatryoshkaLoss": ("losses", "MatryoshkaLoss"),
    "default_matryoshka_dims": ("losses", "default_matryoshka_dims"),
    # Dynamic Hard Negative Mining (paper §3.4, eq. 6) for your own SentenceTransformerTrainer
    "NegativePool": ("dhnm", "NegativePool"),
    "DHNMDataCollator": ("dhnm", "DHNMDataCollator"),
    "DHNMCallback": ("dhnm", "DHNMCallback"),
    "FalseNegativeCountCallback": ("dhnm", "FalseNegativeCountCallback"),
    "HardNegativeScores": ("dhnm", "HardNegativeScores"),
    "HardNegativeScoreSource": ("dhnm", "HardNegativeScoreSource"),
    "MultiTaskScores": ("dhnm", "MultiTaskScores"),
    "dhnm_should_replace": ("dhnm", "dhnm_should_replace"),
    "unrelated_score_baseline": ("dhnm", "unrelated_score_baseline"),
    "mine_negative_ids": ("data.teacher", "mine_negative_ids"),
    # multi-task training (a DatasetDict with a loss per task), as stage 4 trains
    "MultiTaskCollator": ("training.multitask", "MultiTaskCollator"),
    "MultiTaskTrainer": ("training.multitask", "MultiTaskTrainer"),
    "DHNMRequeueMixin": ("training.multitask", "DHNMRequeueMixin"),
    "ProportionalTaskSampler": ("training.multitask", "ProportionalTaskSampler"),
    "RoundRobinTaskSampler": ("training.multitask", "RoundRobinTaskSampler"),
    # the soft-mask schedule (paper §3.2, App. C) as a Trainer callback; LoRA
    "SoftMaskCallback": ("training.callbacks", "SoftMaskCallback"),
    "add_lora": ("training.lora", "add_lora"),
    "merge_lora": ("training.lora", "merge_lora"),
    "load_sources": ("data.sources", "load_sources"),
    "export_embedder": ("export", "export_embedder"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'conan_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConanConfig",
    "ConanModel",
    "ConanForCausalLM",
    "ConanPreTrainedModel",
    "build_sentence_transformer",
    "check_prompt_boundary",
    "format_query_prompt",
    "FastEncoder",
    "InfoNCELoss",
    "CoSENTLoss",
    "MatryoshkaLoss",
    "default_matryoshka_dims",
    "SOFT_MASK_SCHEDULES",
    "apply_soft_mask",
    "get_soft_mask_alpha",
    "plot_soft_mask",
    "remove_soft_mask",
    "set_soft_mask_alpha",
    "set_soft_mask_length",
    "soft_mask_alpha",
    "soft_mask_matrix",
    "train_tokenizer",
    "demo_tokenizer",
    "NegativePool",
    "DHNMDataCollator",
    "DHNMCallback",
    "FalseNegativeCountCallback",
    "HardNegativeScores",
    "HardNegativeScoreSource",
    "MultiTaskScores",
    "dhnm_should_replace",
    "unrelated_score_baseline",
    "mine_negative_ids",
    "MultiTaskCollator",
    "MultiTaskTrainer",
    "DHNMRequeueMixin",
    "ProportionalTaskSampler",
    "RoundRobinTaskSampler",
    "SoftMaskCallback",
    "add_lora",
    "merge_lora",
    "load_sources",
    "export_embedder",
]
