"""Wrap a Conan backbone as a `SentenceTransformer`: Transformer → Pooling → Normalize.

The embedding model runs the decoder with bidirectional attention (paper §3.2: the soft mask ends there) and pools
the token states. Instructions go in front of queries as sentence-transformers *prompts*; with mean pooling the
prompt tokens are excluded from the average by default (as NV-Embed-style models do), so the instruction steers
the representation without becoming part of it. Stages 3 and 4, and inference, follow this one convention.

**Prompt boundary.** sentence-transformers measures a prompt by tokenising it alone and leaves that many leading
tokens out of the pool. That is exact only when the prompt ends on a token boundary of the joined text: a prompt
ending in a space (``"...Query: "``) loses it to the first word under byte-level BPE (``Ġpandas``), so the first word
would be left out of the pool as well (a one-word text pooled nothing: a zero vector). Conan's prompts therefore end
with a line break (:data:`QUERY_PROMPT_FORMAT`), which GPT-2/Qwen-style pre-tokenizers, WordPiece and SentencePiece
all keep as a boundary before ordinary text. :func:`check_prompt_boundary` verifies a prompt against a tokenizer:

- on probe texts (:data:`BOUNDARY_PROBES`) for the saved prompts, when a model is built and when it is exported;
- on the actual texts, each time a :class:`ConanSentenceTransformer` applies a prompt (its ``preprocess``, the one
  place `encode`, `encode_query`, `encode_document` and the training collator prepend prompts), and in
  :class:`~conan_hf.encode.FastEncoder` for any `SentenceTransformer`.

A text that begins with whitespace can still join the prompt's final line break when the vocabulary merges runs of
whitespace (``"\\n  x"`` → ``ĊĠ`` under GPT-2-style BPE, ``":\\n\\n"`` under Qwen2's pre-tokenizer): such a text
is refused with a one-line error naming the prompt and the text (strip the leading whitespace), and the saved prompts
are probed with :data:`LEADING_WHITESPACE_PROBES` so a warning says so up front. The empty text pools nothing after
a prompt, as without one (the zero vector, see :meth:`ConanSentenceTransformer.preprocess`). Saved models keep the
prompts, so plain `SentenceTransformer` loading pools exactly the same tokens (it runs no check).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
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

#: Texts that start with whitespace runs, which vocabularies with whitespace merges (``ĊĠ``, ``ĊĊ``) join with a
#: prompt's final line break; a saved prompt that fails one of them gets a warning, the text itself an error.
LEADING_WHITESPACE_PROBES = ("  x", "\tx", "\nx")

logger = logging.getLogger(__name__)


def format_query_prompt(instruction: str) -> str:
    """The prompt for a task instruction: ``"Instruct: {instruction}\nQuery:\n"``."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"an instruction must be a non-empty string, got {instruction!r}")
    return QUERY_PROMPT_FORMAT.format(instruction=instruction.strip())


def measured_prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """The number of leading tokens sentence-transformers leaves out of the pool for ``prompt``: the prompt's own
    token count, less a trailing special token (EOS / SEP) the tokenizer appends."""
    ids = tokenizer(prompt, verbose=False)["input_ids"]
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


def prompt_boundary_failures(tokenizer: PreTrainedTokenizerBase, prompt: str, texts: Sequence[str],
                             joint_ids: Sequence[Sequence[int]] | None = None) -> Iterator[tuple[int, int | None]]:
    """Yield ``(index, prompt tokens)`` for each text of ``texts`` after which sentence-transformers would not pool
    exactly the text's tokens: the prompt's token count in ``tokenizer(prompt + text)`` (None where a token spans the
    boundary) differs from the count it leaves out (:func:`measured_prompt_length`).

    A text is fine at once when the joint encoding starts with the prompt's own ids (those tokens spell exactly the
    prompt); only the others are compared by character offsets. ``joint_ids`` may pass ``tokenizer(prompt + text)``'s
    ids when the caller has them (untruncated).
    """
    measured = measured_prompt_length(tokenizer, prompt)
    prompt_ids = list(tokenizer(prompt, verbose=False)["input_ids"][:measured])
    if joint_ids is None:
        joint_ids = tokenizer([prompt + text for text in texts], verbose=False)["input_ids"] if texts else []
    for index, (text, ids) in enumerate(zip(texts, joint_ids)):
        if list(ids[:measured]) == prompt_ids:
            continue
        exact = prompt_tokens_in_joint_encoding(tokenizer, prompt, text)
        if exact != measured:
            yield index, exact


def check_prompt_boundary(tokenizer: PreTrainedTokenizerBase, prompt: str,
                          texts: Sequence[str] = BOUNDARY_PROBES, name: str | None = None,
                          max_length: int | None = None, joint_ids: Sequence[Sequence[int]] | None = None) -> None:
    """Raise a `ValueError` if sentence-transformers would not pool exactly the text's tokens after ``prompt``.

    For each text (the probes :data:`BOUNDARY_PROBES` by default, or the texts being encoded), the prompt length
    sentence-transformers measures must equal the number of prompt tokens in the joint encoding (from its offsets)
    and no token may straddle the boundary (see :func:`prompt_boundary_failures`). With ``max_length`` (the model's
    ``max_seq_length``) the prompt must also leave room for the text. The message is one line naming the prompt, the
    text and the fix.

    Example:

    ```python
    >>> from conan_hf.tokenizer import demo_tokenizer
    >>> check_prompt_boundary(demo_tokenizer(), format_query_prompt("Find the answer"))   # fine
    >>> check_prompt_boundary(demo_tokenizer(), "Instruct: Find the answer\nQuery: ")  # raises: ends in a space
    ```
    """
    if not prompt:
        return
    shown = repr(prompt) if len(prompt) <= 100 else f"{prompt[:100]!r}..."
    label = f"prompt {name!r} ({shown})" if name and name != repr(prompt) else f"prompt {shown}"
    measured = measured_prompt_length(tokenizer, prompt)
    if max_length is not None and measured >= max_length:
        raise ValueError(f"{label} is {measured} tokens, which leaves no room for the text within max_seq_length="
                         f"{max_length} (nothing would be pooled); shorten the prompt or raise max_seq_length.")
    for index, exact in prompt_boundary_failures(tokenizer, prompt, texts, joint_ids):
        text = texts[index]
        what = ("a token spans the prompt and the text" if exact is None else
                f"sentence-transformers would leave {measured} tokens out of the pool, but the prompt is {exact} "
                "tokens of the joined text")
        fixes = []
        if not prompt.endswith("\n"):
            fixes.append(f"end the prompt with a line break, e.g. {format_query_prompt('...')!r}")
        if text[:1].isspace():
            fixes.append("strip the leading whitespace of the texts (text.lstrip())")
        fixes.append("pool the prompt too (include_prompt=True)")
        raise ValueError(
            f"{label} does not end on a token boundary for this tokenizer ({type(tokenizer).__name__}): followed by "
            f"{text[:40]!r}, {what}, so the pooled tokens would not be exactly the text's. Fix: "
            f"{'; or '.join(fixes)}."
        )


def check_saved_prompts(tokenizer: PreTrainedTokenizerBase, prompts: dict[str, str] | None,
                        max_length: int | None = None) -> None:
    """Check each saved prompt with :func:`check_prompt_boundary` on :data:`BOUNDARY_PROBES` (an error), and log a
    warning for a prompt that texts starting with whitespace (:data:`LEADING_WHITESPACE_PROBES`) would join: such
    texts are refused when they are encoded with it."""
    for name, prompt in (prompts or {}).items():
        if not prompt:
            continue
        check_prompt_boundary(tokenizer, prompt, name=name, max_length=max_length)
        joined = [LEADING_WHITESPACE_PROBES[i] for i, _ in
                  prompt_boundary_failures(tokenizer, prompt, LEADING_WHITESPACE_PROBES)]
        if joined:
            logger.warning("prompt %r (%r): this tokenizer (%s) joins the prompt's last token with leading whitespace "
                           "of a text (%s); encode() refuses such texts, strip their leading whitespace", name, prompt,
                           type(tokenizer).__name__, ", ".join(repr(t[:-1]) for t in joined))


def excludes_prompt(model: SentenceTransformer) -> bool:
    """Whether a Pooling module of ``model`` leaves prompt tokens out (``include_prompt=False``)."""
    return any(isinstance(module, Pooling) and not module.include_prompt for module in model.modules())


class ConanSentenceTransformer(SentenceTransformer):
    """A `SentenceTransformer` that rejects malformed `encode` input with a clear error instead of returning an empty
    array (for ``[]``) or failing deep inside tokenisation, checks every prompted text's boundary (see the module
    docstring), and embeds a batch of empty texts. Saved models load as a plain `SentenceTransformer`."""

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

    def preprocess(self, inputs, prompt: str | None = None, **kwargs):
        """sentence-transformers' `preprocess`, where every prompt is applied (`encode` and its variants, the
        training collator), with two additions:

        - when pooling leaves the prompt out, each text is checked with :func:`check_prompt_boundary` (a `ValueError`
          naming the prompt and the text where the pooled tokens would not be exactly the text's);
        - a batch whose texts have no token at all (``""`` under a tokenizer that adds no special token) gets one
          padding column, so it runs and pools as an empty row of a mixed batch does (mean pooling: the zero vector)
          instead of failing on a tensor of 0 tokens.
        """
        if prompt and self.tokenizer is not None and excludes_prompt(self):
            texts = [item if isinstance(item, str) else item[0] for item in inputs
                     if isinstance(item, str) or (isinstance(item, tuple) and item and isinstance(item[0], str))]
            name = next((key for key, value in (self.prompts or {}).items() if value == prompt), None)
            check_prompt_boundary(self.tokenizer, prompt, texts, name=name,
                                  max_length=kwargs.get("max_length") or self.max_seq_length)
        features = super().preprocess(inputs, prompt=prompt, **kwargs)
        ids = features.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[1] == 0 and "attention_mask" in features:
            pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
            for key, value in features.items():
                if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[1] == 0:
                    features[key] = torch.full((value.shape[0], 1), pad_id if key == "input_ids" else 0,
                                               dtype=value.dtype)
        return features


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
    >>> model = build_sentence_transformer(ConanConfig.tiny(),
    ...                                    prompts={"query": format_query_prompt("find the answer")})
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
        check_saved_prompts(transformer.tokenizer, prompts, max_seq_length)
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
            f"The tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}; "
            "pass a matching tokenizer."
        )
    return tok


__all__ = [
    "build_sentence_transformer",
    "check_prompt_boundary",
    "check_saved_prompts",
    "ConanSentenceTransformer",
    "excludes_prompt",
    "format_query_prompt",
    "QUERY_PROMPT_FORMAT",
]
