"""Conan-Embedding-v2 backbone (arXiv 2509.12892) on transformers' Llama blocks.

`ConanModel` and `ConanForCausalLM` reuse `LlamaModel`'s layers, parameter names and attention interface; what is
Conan-specific is the attention *mode* (causal / bidirectional / soft, paper §3.2), expressed through transformers'
own mechanisms: `config.is_causal` for mask creation and the `is_causal` attention kwarg for kernels that skip a
materialised mask (sdpa, flash attention).

This file travels with saved checkpoints as remote code, so it imports only torch and transformers.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .configuration_conan import ConanConfig


def padding_aware_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that start at 0 on each sequence's first real token, so left padding changes nothing.

    Padding positions get 0 (they are masked as keys anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ConanPreTrainedModel(LlamaPreTrainedModel):
    config_class = ConanConfig
    config: ConanConfig
    base_model_prefix = "model"


class ConanModel(ConanPreTrainedModel, LlamaModel):
    """The Conan decoder backbone: token ids → `last_hidden_state`.

    Example:

    ```python
    >>> import torch
    >>> from conan_hf import ConanConfig, ConanModel
    >>> model = ConanModel(ConanConfig.tiny(attention_mode="bidirectional"))
    >>> out = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 1]]))
    >>> out.last_hidden_state.shape
    torch.Size([1, 3, 128])
    ```
    """

    def __init__(self, config: ConanConfig):
        LlamaModel.__init__(self, config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        mode = self.config.attention_mode
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ConanModel needs exactly one of `input_ids` or `inputs_embeds`.")
        if mode != "causal":
            if past_key_values is not None or use_cache:
                raise ValueError(f"A KV cache only makes sense for causal attention, not attention_mode={mode!r}.")
            use_cache = False
        if position_ids is None and past_key_values is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = padding_aware_position_ids(attention_mask)
        if mode == "soft":
            attention_mask, kwargs = self._soft_attention_inputs(attention_mask, input_ids, inputs_embeds, kwargs)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    def _soft_attention_inputs(self, attention_mask, input_ids, inputs_embeds, kwargs):
        raise NotImplementedError("attention_mode='soft' is not available yet.")


class ConanForCausalLM(ConanPreTrainedModel, LlamaForCausalLM):
    """`ConanModel` with an (untied by default) LM head, for the pre-training and SFT stages (paper §3.1)."""

    def __init__(self, config: ConanConfig):
        ConanPreTrainedModel.__init__(self, config)
        self.model = ConanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# `save_pretrained` copies this file and configuration_conan.py next to the weights.
ConanConfig.register_for_auto_class()
ConanModel.register_for_auto_class("AutoModel")
ConanForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ConanPreTrainedModel", "ConanModel", "ConanForCausalLM", "padding_aware_position_ids"]
