"""Query translators for the cross-lingual retrieval (CLR) set (paper §3.3, App. A).

The paper translates only the queries of monolingual retrieval sets with Qwen2.5-7B. One small interface,
:class:`Translator` (:mod:`conan_hf.data.translator`), has three backends:

- :class:`TransformersTranslator` (:mod:`~conan_hf.data.translate_local`) — a local transformers causal LM
  prompted through its chat template, with batched, left-padded greedy generation (default
  ``Qwen/Qwen2.5-7B-Instruct``).
- :class:`OpenAITranslator` (:mod:`~conan_hf.data.translate_openai`) — any OpenAI-compatible
  ``/v1/chat/completions`` server (vLLM, TGI, llama.cpp, ...): a sliding window of at most ``max_workers`` requests
  in flight over kept-alive connections (one per worker thread), per-request timeouts and retries with exponential
  backoff. Standard library only (``http.client``).
- :class:`ParallelCorpusTranslator` (:mod:`~conan_hf.data.translate_parallel`) — parallel-corpus mode: human
  translations aligned by id (XQuAD, MKQA, STS-B multi-mt); nothing is translated.

``translate(texts, language, ids=None)`` returns one output per input, ``None`` where the backend failed (the CLR
builder counts those as rejected). ``submit(texts, language, ids=None)`` returns one future per input instead: the
default runs :meth:`Translator.translate` at once; :class:`OpenAITranslator` returns immediately and keeps translating
in the background, which lets the streaming CLR builder keep the next batches' requests in flight while it waits for
the oldest batch. Outputs are raw: :mod:`conan_hf.data.validate` decides which are kept.

Example::

    >>> from conan_hf.data.translate import OpenAITranslator
    >>> translator = OpenAITranslator(base_url="http://localhost:8000/v1", max_workers=16)  # e.g. `vllm serve Qwen/...`
    >>> translator.translate(["how tall is mount everest"], "de")  # doctest: +SKIP
    ['Wie hoch ist der Mount Everest?']
"""

from __future__ import annotations

from .translate_local import TransformersTranslator
from .translate_openai import OpenAITranslator
from .translate_parallel import ParallelCorpusTranslator
from .translator import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    LANGUAGE_NAMES,
    CompletedTranslation,
    TranslationError,
    Translator,
    language_name,
    prompt_fragments,
)

__all__ = [
    "CompletedTranslation",
    "DEFAULT_MODEL",
    "DEFAULT_PROMPT",
    "LANGUAGE_NAMES",
    "OpenAITranslator",
    "ParallelCorpusTranslator",
    "TransformersTranslator",
    "TranslationError",
    "Translator",
    "language_name",
    "prompt_fragments",
]
