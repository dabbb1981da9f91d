"""Wrap a Conan backbone as a `SentenceTransformer`: Transformer → Pooling → Normalize.

The embedding model runs the decoder with bidirectional attention (paper §3.2: the soft mask ends there) and pools
the token states. Instructions go in front of queries as sentence-transformers *prompts*; with mean pooling the
prompt tokens are excluded from the average by default (as NV-Embed-style models do), so the instruction steers
the representation without becoming part of it. Stages 3 and 4, and inference, follow this one convention.

**Prompt boundary.** sentence-transformers measures a prompt by tokenising it alone and leaves that many leading
tokens out of the pool. That is exact only when the prompt ends on a token boundary of the joined text: a prompt
ending in a space (``"...Query: "``) loses it to the first word under byte-level BPE (``Ġthe``), so the first word
would be left out of the pool as well (a one-word text pooled nothing). Conan's prompts therefore end with a line
break (:data:`QUERY_PROMPT_FORMAT`), which GPT-2/Qwen-style pre-tokenizers, WordPiece and SentencePiece all keep
as a boundary, and :func:`check_prompt_boundary` verifies any prompt against a tokenizer before training. (One
case it cannot cover: a text that itself begins with a line break may merge with the prompt's under some
tokenizers.) Saved models keep the prompts, so plain `SentenceTransformer` loading pools exactly the same tokens.
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

#: The query instruction format (the paper's "Instruct: {task}\nQuery: {query}", e5-mistral style), ending on a line
#: break rather than a space so the prompt ends on a token boundary (see the module docstring).
QUERY_PROMPT_FORMAT = "Instruct: {instruction}\nQuery:\n"

#: Texts that start with the kinds of characters pre-tokenizers join across a boundary (letters, punctuation, digits,
#: CJK, a leading space, a contraction).
BOUNDARY_PROBES = ("pandas", "the", "Paris is big", "(see note 3)", "42 apples", "-dash", "'s", "大熊猫吃竹子。",
                   " leading space")


def format_query_prompt(instruction: str) -> str:
    """The prompt for a task instruction: ``"Instruct: {instruction}\nQuery:\n"``."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"an instruction must be a non-empty string, got {instruction!r}")
    return QUERY_PROMPT_FORMAT.format(instruction=instruction.strip())


def measured_prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """The number of leading tokens sentence-transformers leaves out of the pool for ``prompt``: the prompt's own
    token count, less a trailing special token (EOS / SEP) the tokenizer appends."""
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - 1 if ids and ids[-1] in set(tokenizer.all_special_ids) else len(ids)


def prompt_tokens_in_joint_encoding(tokenizer: PreTrainedTokenizerBase, prompt: str, text: str) -> int | None:
    """How many leading tokens of ``tokenizer(prompt + text)`` belong to the prompt, from the character offsets;
    None if a token spans the boundary (part prompt, part text)."""
    encoded = tokenizer(prompt + text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    cut = len(prompt)
    count = 0
    for token_id, (start, end) in zip(ids, offsets):
        if token_id in special and start == end:  # BOS / CLS before the text belong to the prompt's side
            if count == 0 or start < cut:
                count += 1
                continue
            break
        if end <= cut:
            count += 1
        elif start >= cut:
            break
        else:
            return None
    return count


def check_prompt_boundary(tokenizer: PreTrainedTokenizerBase, prompt: str,
                          texts: tuple[str, ...] = BOUNDARY_PROBES, name: str | None = None) -> None:
    """Raise a `ValueError` if sentence-transformers would not pool exactly the text's tokens after ``prompt``.

    For each probe text, the prompt length sentence-transformers measures must equal the number of prompt tokens in
    the joint encoding (from its offsets) and no token may straddle the boundary.

    Example:

    ```python
    >>> from conan_hf.tokenizer import demo_tokenizer
    >>> check_prompt_boundary(demo_tokenizer(), format_query_prompt("Find the answer"))   # fine
    >>> check_prompt_boundary(demo_tokenizer(), "Instruct: Find the answer\nQuery: ")  # raises: ends in a space
    ```
    """
    if not prompt:
        return
    measured = measured_prompt_length(tokenizer, prompt)
    for text in texts:
        exact = prompt_tokens_in_joint_encoding(tokenizer, prompt, text)
        if exact != measured:
            label = f"prompt {name!r}" if name else f"prompt {prompt!r}"
            what = ("a token spans the prompt and the text" if exact is None else
                    f"sentence-transformers would leave {measured} tokens out of the pool, but the prompt is "
                    f"{exact} tokens of the joined text")
            raise ValueError(
                f"{label} does not end on a token boundary for this tokenizer ({type(tokenizer).__name__}): "
                f"followed by {text!r}, {what}, so the pooled tokens would not be exactly the text's. End the prompt "
                f"with a line break, e.g. {format_query_prompt('...')!r}, or pool the prompt too (include_prompt=True)."
            )


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
        prompts: named prompts prepended to inputs, e.g. ``{"query": format_query_prompt("...")}``; stored in
            ``config_sentence_transformers.json`` when saved. Unless the prompt is pooled too, each must end on a
            token boundary (:func:`check_prompt_boundary`).
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
    >>> model = build_sentence_transformer(ConanConfig.tiny(), prompts={"query": format_query_prompt("find the answer")})
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
    if include_prompt is None:
        include_prompt = pooling != "mean"

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
    if not include_prompt:
        for name, prompt in (prompts or {}).items():
            check_prompt_boundary(transformer.tokenizer, prompt, name=name)
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


__all__ = [
    "build_sentence_transformer",
    "check_prompt_boundary",
    "ConanSentenceTransformer",
    "format_query_prompt",
    "QUERY_PROMPT_FORMAT",
]
