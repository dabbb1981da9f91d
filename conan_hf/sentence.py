"""Wrap a Conan backbone as a `SentenceTransformer`: Transformer → Pooling → Normalize.

The embedding model runs the decoder with bidirectional attention (paper §3.2: the soft mask ends there) and pools
the token states. Instructions go in front of queries as sentence-transformers *prompts*; with mean pooling the
prompt tokens are excluded from the average by default (as NV-Embed-style models do), so the instruction steers
the representation without becoming part of it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Literal

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .configuration_conan import ConanConfig
from .modeling_conan import ConanForCausalLM, ConanModel

#: The query instruction format of the paper's evaluation (an instruction line, then the query).
QUERY_PROMPT_FORMAT = "Instruct: {instruction}\nQuery: "


class ConanSentenceTransformer(SentenceTransformer):
    """A `SentenceTransformer` that rejects malformed `encode` input with a clear error instead of returning an empty
    array (for ``[]``) or failing deep inside tokenisation. Saved models load as a plain `SentenceTransformer`."""

    def encode(self, inputs, *args, **kwargs):
        sentences = inputs
        if isinstance(sentences, (list, tuple)):
            if len(sentences) == 0:
                raise ValueError("encode() got an empty list of sentences; pass at least one string.")
            for i, item in enumerate(sentences):
                if not isinstance(item, str):
                    raise TypeError(f"encode() expects strings; item {i} is {type(item).__name__}: {item!r:.80}")
        elif not isinstance(sentences, str):
            raise TypeError(f"encode() expects a string or a list of strings, got {type(sentences).__name__}.")
        return super().encode(inputs, *args, **kwargs)


def build_sentence_transformer(
    model_or_path: str | os.PathLike | ConanConfig | PreTrainedModel,
    pooling: Literal["mean", "lasttoken"] = "mean",
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    max_seq_length: int = 512,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    attention_mode: Literal["causal", "bidirectional", "soft"] | None = "bidirectional",
    include_prompt: bool | None = None,
    truncate_dim: int | None = None,
    attn_implementation: str | None = None,
    device: str | None = None,
) -> ConanSentenceTransformer:
    """Build a Conan `SentenceTransformer`.

    Args:
        model_or_path: a `ConanConfig` (random initialisation), a `ConanModel` / `ConanForCausalLM` instance (its
            backbone weights are used), or a local directory / Hub id of a saved model.
        pooling: ``"mean"`` over non-padding tokens, or ``"lasttoken"`` (the final non-padding token).
        prompts: named prompts prepended to inputs, e.g. ``{"query": "Instruct: ...\\nQuery: "}``; stored in
            ``config_sentence_transformers.json`` when saved.
        default_prompt_name: the prompt used when `encode` gets none.
        max_seq_length: inputs are truncated to this many tokens.
        tokenizer: a tokenizer or its path; defaults to the one saved with `model_or_path`, else the demo tokenizer
            (for configs whose vocabulary it fits).
        attention_mode: overrides the backbone's attention mode (``None`` keeps it). Embeddings use bidirectional.
        include_prompt: whether prompt tokens take part in pooling (default: False for mean, True for lasttoken).
        truncate_dim: Matryoshka dimension the model returns by default.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``"flex_attention"`` or ``"flash_attention_2"``.

    Example:

    ```python
    >>> from conan_hf import ConanConfig, build_sentence_transformer
    >>> model = build_sentence_transformer(ConanConfig.tiny(), prompts={"query": "Instruct: find the answer\\nQuery: "})
    >>> model.save("conan-tiny")
    >>> from sentence_transformers import SentenceTransformer
    >>> SentenceTransformer("conan-tiny", trust_remote_code=True).encode(["hello", "你好"]).shape
    (2, 128)
    ```
    """
    if pooling not in ("mean", "lasttoken"):
        raise ValueError(f"pooling must be 'mean' or 'lasttoken', got {pooling!r}.")
    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}.")
    if prompts is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise TypeError("prompts must map prompt names (str) to prompt texts (str).")

    with tempfile.TemporaryDirectory(prefix="conan-st-") as staging:
        source = _stage_backbone(model_or_path, tokenizer, staging)
        config_kwargs = {"attention_mode": attention_mode} if attention_mode is not None else {}
        model_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        transformer = Transformer(
            source,
            max_seq_length=max_seq_length,
            config_kwargs=config_kwargs,
            model_kwargs=model_kwargs,
        )
    dim = transformer.auto_model.config.hidden_size
    if include_prompt is None:
        include_prompt = pooling != "mean"
    pool = Pooling(dim, pooling_mode=pooling, include_prompt=include_prompt)
    if truncate_dim is not None and not (0 < truncate_dim <= dim):
        raise ValueError(f"truncate_dim must be in [1, {dim}], got {truncate_dim}.")
    return ConanSentenceTransformer(
        modules=[transformer, pool, Normalize()],
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        truncate_dim=truncate_dim,
        device=device,
    )


def _stage_backbone(model_or_path, tokenizer, staging: str) -> str:
    """Return a directory the sentence-transformers `Transformer` module can load (backbone + tokenizer)."""
    if isinstance(model_or_path, ConanConfig):
        model_or_path = ConanModel(model_or_path)
    if isinstance(model_or_path, ConanForCausalLM):
        model_or_path = model_or_path.model
    if isinstance(model_or_path, PreTrainedModel):
        model_or_path.save_pretrained(staging)
        tok = _resolve_tokenizer(tokenizer, None, model_or_path.config.vocab_size)
        tok.save_pretrained(staging)
        return staging
    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
        if tokenizer is None:
            return path
        # A separate tokenizer: stage the weights and that tokenizer side by side.
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        AutoModel.from_pretrained(path).save_pretrained(staging)
        _resolve_tokenizer(tokenizer, None, config.vocab_size).save_pretrained(staging)
        return staging
    raise TypeError(
        "model_or_path must be a ConanConfig, a transformers PreTrainedModel or a path, "
        f"got {type(model_or_path).__name__}."
    )


def _resolve_tokenizer(tokenizer, path, vocab_size: int) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tok = tokenizer
    elif tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    else:
        from .tokenizer import demo_tokenizer

        tok = demo_tokenizer(vocab_size=min(vocab_size, 4096))
    if len(tok) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}; pass a matching tokenizer."
        )
    return tok


__all__ = ["build_sentence_transformer", "ConanSentenceTransformer", "QUERY_PROMPT_FORMAT"]
