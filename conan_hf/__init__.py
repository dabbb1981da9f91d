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
    soft_mask_alpha,
    soft_mask_matrix,
)

__version__ = "0.1.0"

AutoConfig.register("conan", ConanConfig, exist_ok=True)
AutoModel.register(ConanConfig, ConanModel, exist_ok=True)
AutoModelForCausalLM.register(ConanConfig, ConanForCausalLM, exist_ok=True)


def __getattr__(name: str):
    # Heavier pieces (sentence-transformers, tokenizers) load on first use so `import conan_hf` stays cheap.
    lazy = {
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
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'conan_hf' has no attribute {name!r}")


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
    "soft_mask_alpha",
    "soft_mask_matrix",
    "train_tokenizer",
    "demo_tokenizer",
]
