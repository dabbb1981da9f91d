"""A local transformers causal LM as a CLR query translator (:class:`TransformersTranslator`, paper §3.3)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from .translator import DEFAULT_MODEL, DEFAULT_PROMPT, Translator

__all__ = ["TransformersTranslator"]


class TransformersTranslator(Translator):
    """Translate with a local transformers causal LM through its chat template.

    Queries are sorted by length and generated in left-padded batches (decoder-only models continue from the right
    edge, so padding must be on the left) with greedy decoding; only the newly generated tokens are decoded.

    Args:
        model_name_or_path: Hub name or local directory of an instruction-tuned causal LM with a chat template.
        model / tokenizer: already loaded objects (then ``model_name_or_path`` only names them in the cache key).
        prompt / system_prompt: the user message template (``{language}``, ``{text}``) and an optional system message.
        batch_size: queries per ``generate`` call.
        max_new_tokens: generation budget per query.
        device: where to run; default: accelerate's current device (CUDA, NPU, MPS or CPU).
        dtype: passed to ``from_pretrained`` (``"auto"`` keeps the checkpoint's dtype).
        generation_kwargs: extra ``generate`` arguments (e.g. ``{"repetition_penalty": 1.05}``).

    Example::

        >>> translator = TransformersTranslator("Qwen/Qwen2.5-7B-Instruct", batch_size=32)  # doctest: +SKIP
        >>> translator.translate(["what is the capital of peru"], "es")  # doctest: +SKIP
        ['¿Cuál es la capital de Perú?']
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = DEFAULT_MODEL,
        *,
        model: Any = None,
        tokenizer: Any = None,
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 256,
        device: Any = None,
        dtype: Any = "auto",
        generation_kwargs: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        show_progress_bar: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = str(model_name_or_path)
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.dtype = dtype
        self.generation_kwargs = dict(generation_kwargs or {})
        self.trust_remote_code = trust_remote_code
        self.show_progress_bar = show_progress_bar
        self._model = model
        self._tokenizer = tokenizer

    def _load(self) -> None:
        if self._model is not None and self._tokenizer is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name, trust_remote_code=self.trust_remote_code)
        if self._model is None:
            self._model = AutoModelForCausalLM.from_pretrained(
                self.model_name, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        if self.device is None:
            from accelerate import PartialState

            self.device = PartialState().device
        self._model.to(self.device)
        self._model.eval()

    @property
    def model(self) -> Any:
        self._load()
        return self._model

    @property
    def tokenizer(self) -> Any:
        self._load()
        tok = self._tokenizer
        if tok.chat_template is None:
            raise ValueError(
                f"The tokenizer of {self.model_name!r} has no chat template; use an instruction-tuned model "
                "or set tokenizer.chat_template"
            )
        tok.padding_side = "left"
        if tok.pad_token is None:
            # Decoder-only tokenizers often ship without a pad token; masked positions never influence the output.
            tok.pad_token = tok.eos_token
        return tok

    def translate(self, texts: Sequence[str], language: str, ids: Sequence[str] | None = None) -> list[str | None]:
        import torch

        tokenizer, model = self.tokenizer, self.model
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        outputs: list[str | None] = [None] * len(texts)
        gen_kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **self.generation_kwargs}
        gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc=f"Translating to {language}", disable=not self.show_progress_bar):
            index = order[start : start + self.batch_size]
            conversations = [self.messages(texts[i], language) for i in index]
            encoded = tokenizer.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            with torch.inference_mode():
                generated = model.generate(**encoded, **gen_kwargs)
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(index, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text.strip()
            self.num_translated += len(index)
        return outputs
