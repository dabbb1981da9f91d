"""LoRA fine-tuning of a SentenceTransformer's backbone (paper Table 6 compares it with full fine-tuning):
:func:`add_lora` before training, :func:`merge_lora` before saving.

Example:
    ::

        add_lora(model, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05})
        trainer.train()
        merge_lora(model)  # a plain checkpoint again
        model.save("out/final")
"""

from __future__ import annotations

from typing import Any

__all__ = ["LORA_TARGETS", "add_lora", "merge_lora"]

#: peft's "every linear layer of the backbone": q/k/v/o and gate/up/down for Llama-shaped decoders, the attention
#: and feed-forward projections for BERT-like encoders.
LORA_TARGETS = "all-linear"


def add_lora(model, settings: dict[str, Any]) -> None:
    """Wrap the backbone in a peft `PeftModel` with LoRA adapters (only they train).

    peft is called directly (`get_peft_model`) rather than through transformers' `add_adapter`, whose minimum peft
    version moves with each transformers release (5.24 asks for a peft that does not exist yet)."""
    from peft import LoraConfig, get_peft_model

    settings = {"target_modules": LORA_TARGETS, **settings}
    model[0].model = get_peft_model(model[0].model, LoraConfig(**settings))


def merge_lora(model) -> int:
    """Fold the LoRA weights into the backbone (`merge_and_unload`), so the saved model is a plain checkpoint;
    returns how many layers were merged."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = model[0].model
    if not isinstance(wrapped, PeftModel):
        raise ValueError("merge_lora: the backbone carries no LoRA adapters (call add_lora first)")
    merged = sum(isinstance(module, BaseTunerLayer) for module in wrapped.modules())
    model[0].model = wrapped.merge_and_unload()
    return merged
