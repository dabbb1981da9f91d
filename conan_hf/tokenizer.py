"""Stage 0 (paper §3.1): a byte-level BPE tokenizer trained from scratch with HF `tokenizers`.

Byte-level BPE never produces unknown tokens, so one vocabulary covers every language (and any script) of the
multilingual corpus; the released model uses 150,000 entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from transformers import PreTrainedTokenizerFast

#: Special tokens the later stages rely on: document boundaries for packing (stage 1), padding, and the
#: instruction/input/response separators of SFT (stage 2) and of the embedding prompts.
SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
}
INSTRUCTION_TOKENS = ["<|instruction|>", "<|input|>", "<|response|>"]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 150_000,
    min_frequency: int = 2,
    model_max_length: int = 32_768,
    show_progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    Args:
        texts: the training corpus (any iterable of strings; streamed, not materialised).
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.
        min_frequency: minimum pair frequency for a merge.
        model_max_length: stored as the tokenizer's maximum length.

    Example:

    ```python
    >>> from conan_hf.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["hello world", "你好，世界"] * 50, vocab_size=400)
    >>> tok.save_pretrained("my-tokenizer")
    ```
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values()) + INSTRUCTION_TOKENS
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size must be at least {256 + len(specials)} (bytes + special tokens), got {vocab_size}."
        )

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )

    def _checked(stream: Iterable[str]) -> Iterator[str]:
        for i, text in enumerate(stream):
            if not isinstance(text, str):
                raise TypeError(f"train_tokenizer expects strings; item {i} is {type(text).__name__}.")
            yield text

    tokenizer.train_from_iterator(_checked(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        additional_special_tokens=INSTRUCTION_TOKENS,
        **SPECIAL_TOKENS,
    )
    return fast


def demo_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A small tokenizer trained on the package's embedded demo corpus (English/Chinese), for tests and the demo."""
    from .demo import demo_texts

    return train_tokenizer(demo_texts(), vocab_size=vocab_size, min_frequency=2, show_progress=False)


__all__ = ["train_tokenizer", "demo_tokenizer", "SPECIAL_TOKENS", "INSTRUCTION_TOKENS"]
