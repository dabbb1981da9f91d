"""Fast, user-facing embedding of many texts, through `SentenceTransformer.encode`.

`SentenceTransformer.encode` batches a fixed number of texts after sorting them by *character* length, so a batch
still pads its texts to the longest one in *tokens*, and short texts run in batches as small as long ones.
:class:`FastEncoder` keeps the model and its `encode` (prompts, pooling, Matryoshka truncation, Router tasks all
behave as usual) and only decides what each call gets:

* **length-sorted, token-budget batching** — texts are sorted by their exact token count (prompt included) and cut
  into batches of at most ``token_budget`` padded tokens whose padding stays under ``padding_tolerance``; short texts
  go in large batches, long texts in small ones, and a batch of equal lengths needs no attention mask at all;
* **half precision** — bf16 (fp16 where bf16 is unsupported) on CUDA/NPU/XPU, and on CPUs with native bf16
  (AVX512-BF16 / AMX); fp32 on other CPUs;
* **un-padded attention** — when FlashAttention-2 is installed the backbone is switched to it and
  sentence-transformers' `Transformer` concatenates the texts of a batch without padding (``unpad_inputs``,
  flash-attention variable-length kernels);
* **Matryoshka truncation** to ``dim`` with re-normalisation (paper §3.5), and optional ``int8`` / ``uint8`` /
  ``binary`` / ``ubinary`` output via `sentence_transformers.quantize_embeddings`;
* **a truncation policy** — texts longer than ``max_seq_length`` tokens are cut to their first ``max_seq_length``
  tokens (as `SentenceTransformer` does), and each call says so once, with the count (``truncation="warn"``), or
  refuses (``"error"``), or stays silent (``"ignore"``);
* **prompts checked** — when pooling leaves the prompt out, each prompted text must follow the prompt on a token
  boundary (`conan_hf.sentence.check_prompt_boundary`, on the token ids the batching computes anyway): a prompt such
  as ``"...Query: "`` under byte-level BPE, or a text whose leading whitespace joins the prompt's last token, is a
  one-line `ValueError` naming the prompt, the text and the fix, never a silently shifted (or zero) embedding;
* **empty texts** — a text with no token at all (``""`` with a tokenizer that adds no special tokens) is embedded as
  `SentenceTransformer.encode` embeds it next to other texts (an all-padding row: the zero vector under mean pooling),
  also when it would otherwise form a batch of its own, where `SentenceTransformer.encode` fails.

Example::

    >>> from conan_hf.encode import FastEncoder
    >>> encoder = FastEncoder("path/to/conan-model")                 # or an existing SentenceTransformer
    >>> docs = encoder.encode_document(passages, dim=256)           # (n, 256), unit norm
    >>> queries = encoder.encode_query(questions, dim=256, precision="int8")
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's ``max_seq_length`` and were truncated."""


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type in ("npu", "xpu", "hpu"):
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    # CPUs with native bf16 (AVX512-BF16, AMX) run bf16 matmuls 2-3x faster than fp32 (benchmarks/results/
    # encode_cpu.txt; cosine to the fp32 embeddings > 0.9999); elsewhere bf16 is emulated and slower, so fp32.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), as PyTorch's CPU backend reports."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _flash_attention_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover
        return False
    return bool(is_flash_attn_2_available())


def plan_batches(
    lengths: Sequence[int],
    token_budget: int,
    max_batch_size: int | None = None,
    padding_tolerance: float = 0.05,
    unpadded: bool = False,
) -> list[list[int]]:
    """Cut texts into batches by token length.

    Texts are taken longest first. A padded batch holds ``n`` texts padded to its first (longest) length ``L``: it
    closes before ``n * L`` exceeds ``token_budget`` or its padding exceeds ``padding_tolerance * n * L``. An
    ``unpadded`` batch (flash-attention varlen) only counts real tokens.

    Args:
        lengths: Token count of each text (already capped at the model's ``max_seq_length``).
        token_budget: Most (padded) tokens per batch; a single longer text still forms its own batch.
        max_batch_size: Most texts per batch.
        padding_tolerance: Largest share of padding tokens allowed in a batch (padded batches only).
        unpadded: Batches are concatenated without padding.

    Returns:
        Lists of indices into ``lengths``, one per batch.

    >>> plan_batches([3, 5, 5, 2], token_budget=10)
    [[1, 2], [0], [3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = padded_waste = real_tokens = 0
    for i in order:
        length = max(1, int(lengths[i]))
        if current:
            n = len(current) + 1
            if unpadded:
                fits = real_tokens + length <= token_budget
            else:
                waste = padded_waste + (longest - length)
                fits = n * longest <= token_budget and waste <= padding_tolerance * n * longest
            if max_batch_size is not None and n > max_batch_size:
                fits = False
            if fits:
                current.append(i)
                padded_waste += longest - length
                real_tokens += length
                continue
            batches.append(current)
        current, longest, padded_waste, real_tokens = [i], length, 0, length
    if current:
        batches.append(current)
    return batches


class FastEncoder:
    """Fast encoding through a `SentenceTransformer` (see the module docstring for what it does).

    Args:
        model: A SentenceTransformer, or a path / Hub id to load one from (remote code trusted, for Conan models).
        device: Device to run on; default: the model's.
        dtype: ``"auto"`` (bf16/fp16 on accelerators, bf16 on CPUs with native bf16, else fp32), a ``torch.dtype``
            or its name, or None to leave the model's. The model is cast **in place** (no second copy of the
            weights); pass ``dtype="float32"`` for embeddings identical to fp32 `SentenceTransformer.encode`.
        attn_implementation: ``"auto"`` switches to ``"flash_attention_2"`` (and un-padded batches) on CUDA when
            flash-attn is installed and the model supports it; any transformers attention name forces it; None
            leaves the model's.
        token_budget: Most padded tokens per batch (default 8192 on CPU, 65536 on accelerators).
        max_batch_size: Most texts per batch (default 512).
        padding_tolerance: Largest share of padding in a batch.
        truncation: ``"warn"`` (one warning per call with the count), ``"error"`` or ``"ignore"`` for inputs longer
            than ``max_seq_length`` tokens; they are always cut to their first ``max_seq_length`` tokens.

    Example::

        >>> encoder = FastEncoder(model)
        >>> embeddings = encoder.encode(["a cat", "un chat", "一只猫"], dim=64)
    """

    def __init__(
        self,
        model: str | SentenceTransformer,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        attn_implementation: str | None = "auto",
        token_budget: int | None = None,
        max_batch_size: int = 512,
        padding_tolerance: float = 0.05,
        truncation: Literal["warn", "error", "ignore"] = "warn",
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if truncation not in ("warn", "error", "ignore"):
            raise ValueError(f"truncation must be 'warn', 'error' or 'ignore', got {truncation!r}")
        if not 0 <= padding_tolerance < 1:
            raise ValueError(f"padding_tolerance must be in [0, 1), got {padding_tolerance}")
        if isinstance(model, SentenceTransformer):
            self.model = model
            if device is not None:
                self.model.to(device)
        else:
            self.model = SentenceTransformer(str(model), device=device, trust_remote_code=True)
        self.device = self.model.device
        if dtype == "auto":
            dtype = _default_dtype(self.device)
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is not None and dtype != next(self.model.parameters()).dtype:
            logger.info("FastEncoder casts the model to %s in place", dtype)
            self.model.to(dtype)
        self.unpadded = self._setup_attention(attn_implementation)
        self.token_budget = token_budget or (8192 if self.device.type == "cpu" else 65536)
        self.max_batch_size = max_batch_size
        self.padding_tolerance = padding_tolerance
        self.truncation = truncation

    @property
    def transformer(self):
        """The first (transformers) module of the SentenceTransformer."""
        return self.model[0]

    def _setup_attention(self, attn_implementation: str | None) -> bool:
        """Switch to flash attention where asked/available; return whether batches run un-padded."""
        module = self.transformer
        backbone = getattr(module, "auto_model", None)
        if backbone is None or attn_implementation is None:
            return bool(getattr(module, "can_flatten_inputs", False))
        wanted = attn_implementation
        if wanted == "auto":
            usable = self.device.type == "cuda" and _flash_attention_available() \
                and getattr(backbone, "_supports_flash_attn", False)
            if not usable:
                return bool(getattr(module, "can_flatten_inputs", False))
            wanted = "flash_attention_2"
        if backbone.config._attn_implementation != wanted:
            try:
                backbone.set_attn_implementation(wanted)
            except (ValueError, ImportError) as error:
                logger.warning("Could not switch attention to %s (%s); keeping %s", wanted, error,
                               backbone.config._attn_implementation)
                return bool(getattr(module, "can_flatten_inputs", False))
        if hasattr(module, "unpad_inputs"):
            module.unpad_inputs = None  # re-evaluates whether flash-attention varlen (un-padded) inputs apply
        return bool(getattr(module, "can_flatten_inputs", False))

    def _checks_prompts(self) -> bool:
        """Whether prompted texts are checked here: pooling leaves the prompt out, and the model is not a
        `ConanSentenceTransformer` (which checks them in its own ``preprocess``)."""
        from .sentence import ConanSentenceTransformer, excludes_prompt

        return excludes_prompt(self.model) and not isinstance(self.model, ConanSentenceTransformer)

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None, task: str | None) -> str | None:
        prompts = self.model.prompts or {}
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in prompts:
                raise ValueError(f"Prompt name {prompt_name!r} is not one of the model's prompts {sorted(prompts)}")
            return prompts[prompt_name]
        if task is not None:
            return prompts.get(task)
        default = getattr(self.model, "default_prompt_name", None)
        return prompts.get(default) if default else None

    def token_lengths(self, sentences: Sequence[str], prompt: str | None = None,
                      check_prompt: bool = False) -> np.ndarray:
        """Token count of each input as the model sees it (prompt and special tokens included), before truncation.

        With ``check_prompt``, each prompted text is also checked with `conan_hf.sentence.check_prompt_boundary` on
        the same token ids (a `ValueError` where the pooled tokens would not be exactly the text's).
        """
        from .sentence import check_prompt_boundary

        tokenizer = self.model.tokenizer
        if tokenizer is None:
            return np.array([len(s) for s in sentences])
        sentences = list(sentences)
        texts = [prompt + s for s in sentences] if prompt else sentences
        name = next((key for key, value in (self.model.prompts or {}).items() if prompt and value == prompt), None)
        lengths = []
        for start in range(0, len(texts), 4096):  # bounded memory for the id lists of very large inputs
            # verbose=False: over-long inputs are expected here; the truncation policy reports them once.
            encoded = tokenizer(texts[start:start + 4096], add_special_tokens=True, truncation=False,
                                return_attention_mask=False, return_token_type_ids=False, verbose=False)
            if check_prompt and prompt:
                check_prompt_boundary(tokenizer, prompt, sentences[start:start + 4096], name=name,
                                      max_length=self.model.max_seq_length, joint_ids=encoded["input_ids"])
            lengths.extend(len(ids) for ids in encoded["input_ids"])
        return np.asarray(lengths)

    def _apply_truncation_policy(self, lengths: np.ndarray) -> np.ndarray:
        max_len = self.model.max_seq_length
        if not max_len:
            return lengths
        too_long = int((lengths > max_len).sum())
        if too_long:
            message = (f"{too_long} of {len(lengths)} inputs are longer than max_seq_length={max_len} tokens "
                       f"(longest: {int(lengths.max())}); each is truncated to its first {max_len} tokens. "
                       "Raise `model.max_seq_length` or split long texts to embed all of them.")
            if self.truncation == "error":
                raise ValueError(message)
            if self.truncation == "warn":
                warnings.warn(message, TruncationWarning, stacklevel=4)  # past encode's decorator
        return np.minimum(lengths, max_len)

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | Sequence[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        task: Literal["query", "document"] | None = None,
        dim: int | None = None,
        normalize: bool = True,
        precision: Precision = "float32",
        calibration_embeddings: np.ndarray | None = None,
        convert_to_tensor: bool = False,
        show_progress_bar: bool | None = None,
        output_path: str | os.PathLike | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed ``sentences``; the result rows follow the input order.

        Args:
            sentences: A string or a list of strings.
            prompt_name: Name of one of the model's prompts to prepend.
            prompt: Prompt text to prepend (wins over ``prompt_name``).
            task: ``"query"`` / ``"document"``: use that prompt of the model (when it has one) and Router route.
            dim: Matryoshka dimension: keep the first ``dim`` values (default: the model's ``truncate_dim``).
            normalize: L2-normalise the (truncated) embeddings.
            precision: ``"float32"``, or a quantised output of `sentence_transformers.quantize_embeddings`.
            calibration_embeddings: Embeddings whose value ranges calibrate ``int8`` / ``uint8`` quantisation
                (default: the embeddings being quantised).
            convert_to_tensor: Return a torch tensor (on CPU) instead of a numpy array.
            show_progress_bar: Show a progress bar over the texts (default: when logging at INFO level or below).
            output_path: Write the ``float32`` embeddings into this ``.npy`` file, batch by batch, each batch
                normalised before it is written, and return them as a read-only memory-mapped array
                (``np.load(output_path, mmap_mode="r")``). Memory then stays at one batch instead of the
                ``N x dim`` result plus its normalised copy (``benchmarks/scale.py``). Rows are written with
                ``os.pwrite`` at their offsets in the file, not through a writable mapping, whose dirty pages would
                count in the process's resident memory until written back. Only with ``precision="float32"`` (int8
                calibration needs all embeddings) and without ``convert_to_tensor``.

        Returns:
            ``(len(sentences), dim)`` embeddings (a vector for a single string); bit-packed for ``(u)binary``.

        Raises:
            ValueError: a prompt (given, named or the task's) after which some text would not pool exactly its own
                tokens (see the module docstring), or that leaves no room within ``max_seq_length``.
        """
        from sentence_transformers import quantize_embeddings

        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode() expects strings; item {i} is {type(text).__name__}")
        full_dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        dim = dim if dim is not None else self.model.truncate_dim
        if dim is not None and not 0 < dim <= full_dim:
            raise ValueError(f"dim must be in 1..{full_dim}, got {dim}")
        out_dim = dim or full_dim
        if not texts:
            empty = np.zeros((0, out_dim), dtype=np.float32)
            if output_path is not None:
                np.save(output_path, empty)  # (an empty file cannot be memory-mapped)
            return torch.from_numpy(empty) if convert_to_tensor else empty

        if output_path is not None and (precision != "float32" or convert_to_tensor):
            raise ValueError("output_path writes float32 embeddings to a .npy file: it cannot be combined with "
                             f"precision={precision!r} or convert_to_tensor=True")
        prompt_text = self._resolve_prompt(prompt, prompt_name, task)
        lengths = self._apply_truncation_policy(self.token_lengths(texts, prompt_text,
                                                                   check_prompt=self._checks_prompts()))
        tokenless = [i for i, length in enumerate(lengths) if length == 0]
        with_tokens = [i for i, length in enumerate(lengths) if length > 0]
        batches = [[with_tokens[j] for j in batch]
                   for batch in plan_batches(lengths[with_tokens], self.token_budget, self.max_batch_size,
                                             self.padding_tolerance, unpadded=self.unpadded)]
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO

        from tqdm.auto import tqdm

        extra = {"task": task} if task is not None else {}
        if output_path is not None:
            writer = _NpyRowWriter(output_path, (len(texts), out_dim))
            store = writer.write
        else:
            output = torch.empty((len(texts), out_dim), dtype=torch.float32)

            def store(rows: list[int], embeddings: torch.Tensor) -> None:
                output[torch.as_tensor(rows)] = embeddings

        with tqdm(total=len(texts), desc="Encoding", unit="text", disable=not show_progress_bar) as progress, \
                (writer if output_path is not None else contextlib.nullcontext()):
            for batch in batches:
                embeddings = self.model.encode(
                    [texts[i] for i in batch], prompt=prompt_text if prompt_text is not None else "",
                    batch_size=len(batch), convert_to_tensor=True, show_progress_bar=False,
                    truncate_dim=out_dim if out_dim != full_dim else None, **extra,
                ).float().cpu()
                if output_path is not None and normalize:  # row-wise, the same as normalising the whole result
                    embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
                store(batch, embeddings)
                progress.update(len(batch))
            if tokenless:
                embeddings = self._encode_tokenless(
                    [texts[i] for i in tokenless], [texts[i] for i in with_tokens], lengths[with_tokens],
                    prompt_text, out_dim if out_dim != full_dim else None, extra)
                if output_path is not None and normalize:
                    embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
                store(tokenless, embeddings)
                progress.update(len(tokenless))

        if output_path is not None:
            result_file = np.load(output_path, mmap_mode="r")
            return result_file[0] if single else result_file
        if normalize:
            output = torch.nn.functional.normalize(output, p=2, dim=1)
        result: np.ndarray | torch.Tensor = output
        if precision != "float32":
            result = quantize_embeddings(output.numpy(), precision=precision,
                                         calibration_embeddings=calibration_embeddings)
        if convert_to_tensor:
            result = torch.as_tensor(result)
        elif isinstance(result, torch.Tensor):
            result = result.numpy()
        return result[0] if single else result

    def _encode_tokenless(self, tokenless: list[str], others: list[str], other_lengths: np.ndarray,
                          prompt_text: str | None, truncate_dim: int | None, extra: dict[str, Any]) -> torch.Tensor:
        """Embeddings of texts that have no token at all (``""`` with a tokenizer that adds no special tokens, and no
        prompt). Alone, such a batch cannot run (a tensor of 0 tokens); `SentenceTransformer.encode` embeds them as
        all-padding rows of a batch with other texts — for mean / last-token pooling a zero vector. They are encoded
        the same way here: in one batch behind a single companion text (the shortest of this call, else ``"."``)."""
        companion = others[int(np.argmin(other_lengths))] if others else "."
        if not others and not self.token_lengths([companion], prompt_text)[0]:
            raise ValueError("encode() got only texts without any token (e.g. empty strings) and the tokenizer turns "
                             "'.' into no token either; give at least one non-empty text")
        embeddings = self.model.encode(
            [companion, *tokenless], prompt=prompt_text if prompt_text is not None else "",
            batch_size=len(tokenless) + 1, convert_to_tensor=True, show_progress_bar=False,
            truncate_dim=truncate_dim, **extra,
        )
        return embeddings[1:].float().cpu()

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """:meth:`encode` with the model's ``"query"`` prompt (e.g. ``"Instruct: ...\\nQuery:\n"``)."""
        return self.encode(sentences, task="query", **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """:meth:`encode` with the model's ``"document"`` prompt, if any."""
        return self.encode(sentences, task="document", **kwargs)


class _NpyRowWriter:
    """Writes rows of a ``float32`` ``(n, dim)`` array into a ``.npy`` file at their row offsets (any order).

    The header comes from ``np.lib.format.open_memmap`` (which sizes the file); the rows go through ``os.pwrite``,
    so no page of the result stays resident in this process.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int]) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        self.offset, self.row_bytes = header.offset, shape[1] * 4
        del header  # unmapped: only the header and the file size were needed
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, rows: list[int], embeddings: torch.Tensor) -> None:
        values = np.ascontiguousarray(embeddings.numpy(), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        rows_sorted = np.asarray(rows)[order]
        values = values[order]
        # Runs of consecutive rows go in one call (length-sorted batches are often in input order).
        breaks = np.flatnonzero(np.diff(rows_sorted) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows_sorted)]):
            data = memoryview(values[start:stop].tobytes())
            position = self.offset + int(rows_sorted[start]) * self.row_bytes
            while data:  # pwrite may write less than asked (e.g. interrupted by a signal)
                written = os.pwrite(self.fd, data, position)
                data, position = data[written:], position + written

    def __enter__(self) -> _NpyRowWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


def encode(model: str | SentenceTransformer, sentences: str | Sequence[str],
           **kwargs: Any) -> np.ndarray | torch.Tensor:
    """One-shot :meth:`FastEncoder.encode`; constructor options (``dtype``, ``token_budget``, ``truncation``, ...)
    may be mixed into ``kwargs``. Prefer a :class:`FastEncoder` to embed several lists with one model."""
    constructor = {k: kwargs.pop(k) for k in ("device", "dtype", "attn_implementation", "token_budget",
                                              "max_batch_size", "padding_tolerance", "truncation") if k in kwargs}
    return FastEncoder(model, **constructor).encode(sentences, **kwargs)


__all__ = ["FastEncoder", "TruncationWarning", "cpu_has_native_bf16", "encode", "plan_batches"]
