"""Configuration of Conan-Embedding-v2 (arXiv 2509.12892).

This file travels with saved checkpoints as remote code, so it imports only torch and transformers.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

ATTENTION_MODES = ("causal", "bidirectional", "soft")

#: How `attention_mode="soft"` runs for 0 < alpha < 1: "auto" follows the model's `attn_implementation` (sdpa / eager
#: -> dense log-M bias, flex_attention -> on-the-fly score_mod); the others force that backend while alpha = 0 and
#: alpha >= 1 keep the model's own (possibly flash) implementation.
SOFT_MASK_BACKENDS = ("auto", "eager", "sdpa", "flex_attention")

#: What l of eq.4 is (besides a fixed positive int): "sequence" = each sequence's (or packed document's) real length,
#: "max_seq_length" = the padded length of the batch, the training sequence length when inputs are padded to it.
SOFT_MASK_LENGTHS = ("sequence", "max_seq_length")


def check_soft_mask_length(value) -> None:
    """Raise a ValueError unless `value` is one of `SOFT_MASK_LENGTHS` or a positive int (l of eq.4)."""
    if isinstance(value, str):
        if value in SOFT_MASK_LENGTHS:
            return
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    raise ValueError(f"soft_mask_length must be one of {SOFT_MASK_LENGTHS} or a positive integer, got {value!r}.")


@strict
class ConanConfig(LlamaConfig):
    r"""Configuration of a Conan decoder: a Llama-style transformer whose attention can be causal (LLM stages),
    bidirectional (embedding inference) or *soft* (paper §3.2: moving from causal to bidirectional during
    weakly-supervised training).

    The defaults are the released architecture (8 layers, hidden 3584, 32 query heads of size 112, 8 key/value
    heads, SwiGLU FFN 8192, vocabulary 150,000, 32k positions, RMSNorm, RoPE, no biases, untied LM head), which gives
    ``ConanModel(ConanConfig())`` exactly 1,499,205,120 parameters.

    Argument names are `LlamaConfig`'s, so weights move between Llama and Conan checkpoints with a config change only.

    Args:
        attention_mode (`str`, defaults to `"causal"`):
            `"causal"` (decoder LM), `"bidirectional"` (every token sees every non-padding token), or `"soft"`
            (eq.4: causal plus a partial view of later tokens controlled by `soft_mask_alpha`).
        soft_mask_alpha (`float`, defaults to 0.0):
            α(t) of eq.4 for `attention_mode="soft"`; 0 is exactly causal, >= 1 exactly bidirectional. Training
            callbacks update it every step.
        soft_mask_backend (`str`, defaults to `"auto"`):
            Attention backend for the soft mask at 0 < α < 1, one of `SOFT_MASK_BACKENDS`. `"auto"` follows
            `attn_implementation` (falling back from flex to sdpa for CPU training and from sdpa to eager on Ascend
            NPU); set `"flex_attention"` to keep flash attention for the causal / bidirectional phases and run the
            soft phase without an L×L tensor.
        soft_mask_length (`str` or `int`, defaults to `"sequence"`):
            l of eq.4. `"sequence"`: each sequence's real (unpadded) length, or each document's in a packed row — the
            mask of a text then depends on nothing else in the batch; `"max_seq_length"`: the padded length of the
            batch (the paper's "training sequence length" when inputs are padded to it); an int: that fixed l.

    Example:

    ```python
    >>> from conan_hf import ConanConfig, ConanModel
    >>> config = ConanConfig.tiny(attention_mode="bidirectional")
    >>> model = ConanModel(config)
    ```
    """

    model_type = "conan"

    vocab_size: int = 150_000
    hidden_size: int = 3584
    intermediate_size: int = 8192
    num_hidden_layers: int = 8
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    attention_mode: str = "causal"
    soft_mask_alpha: float = 0.0
    soft_mask_backend: str = "auto"
    soft_mask_length: int | str = "sequence"

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 1_000_000.0}
        # Saved configs may carry a derived `is_causal`; `attention_mode` is the single source of truth.
        kwargs.pop("is_causal", None)
        kwargs.pop("_is_causal_override", None)
        self._validate_conan_arguments()
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # Written into config.json so `trust_remote_code=True` resolves every Auto class from the checkpoint.
            self.auto_map = {
                "AutoConfig": "configuration_conan.ConanConfig",
                "AutoModel": "modeling_conan.ConanModel",
                "AutoModelForCausalLM": "modeling_conan.ConanForCausalLM",
            }

    def _validate_conan_arguments(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ConanConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0 and self.head_dim is None:
            raise ValueError(
                f"ConanConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        kv_heads = self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads
        if kv_heads <= 0 or self.num_attention_heads % kv_heads != 0:
            raise ValueError(
                f"ConanConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})."
            )
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(
                f"ConanConfig.attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}."
            )
        if not (self.soft_mask_alpha >= 0):  # also rejects NaN
            raise ValueError(f"ConanConfig.soft_mask_alpha must be >= 0, got {self.soft_mask_alpha!r}.")
        if self.soft_mask_backend not in SOFT_MASK_BACKENDS:
            raise ValueError(
                f"ConanConfig.soft_mask_backend must be one of {SOFT_MASK_BACKENDS}, got {self.soft_mask_backend!r}."
            )
        try:
            check_soft_mask_length(self.soft_mask_length)
        except ValueError as error:
            raise ValueError(f"ConanConfig.{error}") from None

    @property
    def is_causal(self) -> bool:
        """Read by transformers' mask creation and attention kernels (`merge_with_config_defaults`): False switches
        to the bidirectional mask and non-causal kernels. Derived from `attention_mode`; the soft mode supplies its
        own mask and is causal wherever transformers' default path is taken.
        """
        override = self.__dict__.get("_is_causal_override")
        return (self.attention_mode != "bidirectional") if override is None else override

    @is_causal.setter
    def is_causal(self, value: bool) -> None:
        # transformers sets this temporarily for a forward pass (an `is_causal=` kwarg) and then restores it;
        # restoring the derived value clears the override, so `attention_mode` stays the source of truth.
        derived = self.attention_mode != "bidirectional"
        self.__dict__["_is_causal_override"] = None if value is None or bool(value) == derived else bool(value)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("_is_causal_override", None)
        return output

    @classmethod
    def tiny(cls, **kwargs) -> ConanConfig:
        """A ~0.8M-parameter backbone preset (1.35M with the LM head) with the released shape ratios (GQA 4:1,
        SwiGLU), for tests and the CPU demo; ``kwargs`` override its values.

        Example::

            >>> ConanConfig.tiny(attention_mode="soft").hidden_size
            128
        """
        defaults = dict(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=288,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
        )
        defaults.update(kwargs)
        return cls(**defaults)


__all__ = ["ConanConfig", "ATTENTION_MODES", "SOFT_MASK_BACKENDS", "SOFT_MASK_LENGTHS", "check_soft_mask_length"]
