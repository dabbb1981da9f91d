"""The transformers model inside an embedding model, whatever it is, and its attention mode.

Three kinds of backbone go through the embedding stages:

- ``"conan"``: a `ConanModel`; its ``config.attention_mode`` is the source of truth (it derives ``config.is_causal``).
- ``"decoder"``: a stock decoder whose attention layers are causal by construction (Llama, Qwen2, Qwen3, Mistral, ...
  — any model `conan_hf.apply_soft_mask` supports). Bidirectional attention is transformers' own switch: with
  ``config.is_causal = False`` (transformers >= 5.2) the mask functions build a bidirectional mask and the kernels get
  ``is_causal=False``; the value is saved in ``config.json``, so the folder loads bidirectional with stock classes.
  The soft mode (§3.2, eq.4) is `apply_soft_mask`'s forward wrapper.
- ``"encoder"``: a bidirectional encoder (BERT-like); attention is always bidirectional and there is no soft mask.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .configuration_conan import ATTENTION_MODES
from .modeling_conan import ConanModel, restore_attention_implementation, soft_mask_state

BACKBONE_KINDS = ("conan", "decoder", "encoder")


def is_causal_by_construction(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention layers are causal (a decoder LM): transformers marks them with ``is_causal = True``
    (the flag its sdpa / flash kernels read); encoders' layers carry False or nothing."""
    return any(getattr(module, "is_causal", None) is True for module in model.modules())


def backbone_kind(model: PreTrainedModel) -> str:
    """``"conan"``, ``"decoder"`` or ``"encoder"`` (see the module docstring)."""
    if isinstance(model, ConanModel):
        return "conan"
    return "decoder" if is_causal_by_construction(model) else "encoder"


def _is_soft_patched(model: PreTrainedModel) -> bool:
    from .soft_mask import _is_soft_forward

    return _is_soft_forward(model.__dict__.get("forward"))


def get_attention_mode(model: PreTrainedModel) -> str:
    """The attention the backbone runs: ``"causal"``, ``"bidirectional"`` or ``"soft"``."""
    kind = backbone_kind(model)
    if kind == "conan":
        return model.config.attention_mode
    if kind == "encoder":
        return "bidirectional"
    if _is_soft_patched(model):
        return "soft"
    return "bidirectional" if getattr(model.config, "is_causal", True) is False else "causal"


def set_attention_mode(model: PreTrainedModel, mode: str) -> None:
    """Put the backbone in ``mode`` (``"causal"``, ``"bidirectional"`` or ``"soft"``).

    A stock decoder gets ``config.is_causal`` (saved with the model) and, for ``"soft"``, `apply_soft_mask` (α = 0, so
    it starts causal); leaving the soft mode removes the wrapper. An encoder accepts only ``"bidirectional"``.

    Raises:
        ValueError: an unknown mode, or causal / soft attention asked of an encoder.
    """
    from .soft_mask import apply_soft_mask, remove_soft_mask

    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
    kind = backbone_kind(model)
    model_type = getattr(model.config, "model_type", None)
    if kind == "encoder":
        if mode != "bidirectional":
            raise ValueError(
                f"{type(model).__name__} (model_type={model_type!r}) is an encoder: its attention is bidirectional "
                f"only, so attention_mode={mode!r} (and the soft mask of stage 3) does not apply; encoders are "
                "fine-tuned with stage 4 and attention_mode: bidirectional"
            )
        return
    if kind == "conan":
        if model.config.attention_mode == "soft" and mode != "soft":
            restore_attention_implementation(model)
        model.config.attention_mode = mode
        return
    if mode == "soft":
        model.config.is_causal = True  # α = 0 is the model's own (causal) attention
        apply_soft_mask(model)
        return
    if _is_soft_patched(model):
        remove_soft_mask(model)
    elif soft_mask_state(model, create=False) is not None:
        restore_attention_implementation(model)
    model.config.is_causal = mode == "causal"


def padding_side_for(model: PreTrainedModel) -> str | None:
    """The padding side the backbone needs for exact results, or None when either side gives the same states.

    A `ConanModel` restarts RoPE positions at each sequence's first real token, so padding is invisible on either side.
    Stock decoders number positions from the first column (0, 1, ... whether a token is padding or not): only right
    padding gives every sequence the positions it has unpadded. Encoders mask padding keys and use absolute positions
    from the start as well, so right padding (their tokenizers' default) is the exact one.
    """
    return None if backbone_kind(model) == "conan" else "right"


__all__ = [
    "BACKBONE_KINDS",
    "backbone_kind",
    "get_attention_mode",
    "is_causal_by_construction",
    "padding_side_for",
    "set_attention_mode",
]
