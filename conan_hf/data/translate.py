"""Query translators for the cross-lingual retrieval (CLR) set (paper §3.3, App. A).

The paper translates only the queries of monolingual retrieval sets with Qwen2.5-7B. One small interface,
:class:`Translator`, has three backends:

- :class:`TransformersTranslator` — a local transformers causal LM prompted through its chat template, with batched,
  left-padded greedy generation (default ``Qwen/Qwen2.5-7B-Instruct``).
- :class:`OpenAITranslator` — any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, TGI, llama.cpp, ...): a
  sliding window of at most ``max_workers`` requests in flight over kept-alive connections (one per worker thread),
  per-request timeouts and retries with exponential backoff. Standard library only (``http.client``).
- :class:`ParallelCorpusTranslator` — parallel-corpus mode: human translations aligned by id (XQuAD, MKQA,
  STS-B multi-mt); nothing is translated.

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

import http.client
import json
import logging
import os
import random
import string
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from .validate import TranslationValidator

logger = logging.getLogger(__name__)

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
    "prompt_fragments",
]

#: The translator the paper used (§3.3).
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"

#: User message sent per query. ``{language}`` is the English name of the target language, ``{text}`` the query.
DEFAULT_PROMPT = (
    "Translate the following search query into {language}. "
    "Reply with the translation only, without quotes, notes or explanations.\n\n{text}"
)

#: English names of the Table 7 languages, used to fill ``{language}`` in prompts.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "zh": "Chinese (Simplified)", "es": "Spanish", "fr": "French", "ja": "Japanese",
    "de": "German", "ru": "Russian", "it": "Italian", "pt": "Portuguese", "ar": "Arabic", "ko": "Korean",
    "bn": "Bengali", "da": "Danish", "sv": "Swedish", "th": "Thai", "ms": "Malay", "tr": "Turkish",
    "vi": "Vietnamese", "nl": "Dutch", "pl": "Polish", "hi": "Hindi", "km": "Khmer", "fi": "Finnish",
    "he": "Hebrew", "hu": "Hungarian", "no": "Norwegian",
}  # fmt: skip


class TranslationError(RuntimeError):
    """A translation backend failed in a way that retrying cannot fix (or retries were exhausted)."""


def prompt_fragments(template: str | None) -> list[str]:
    """The literal (non-placeholder) parts of a prompt template, stripped; used to detect prompt echoes."""
    if not template:
        return []
    parts = [literal.strip() for literal, _, _, _ in string.Formatter().parse(template)]
    return [p for p in parts if p]


class CompletedTranslation:
    """A translation already made, with the part of ``concurrent.futures.Future``'s interface that callers of
    :meth:`Translator.submit` use (``done``, ``result``, ``cancel``)."""

    __slots__ = ("_output",)

    def __init__(self, output: str | None) -> None:
        self._output = output

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> str | None:
        return self._output

    def cancel(self) -> bool:
        return False


class Translator(ABC):
    """Translates texts into one target language per call.

    Subclasses implement :meth:`translate`. ``model_name`` and ``prompt`` (with ``system_prompt``) identify the outputs
    in the translation cache, so two translators with the same values must produce interchangeable translations.

    Attributes:
        num_translated: texts this object has sent to its backend (cache hits never reach it).
        cacheable: whether outputs may be stored in the on-disk cache (``False`` when the lookup is already free).
        failure_reason: the rejection reason counted for a ``None`` output.
    """

    model_name: str = "translator"
    prompt: str = DEFAULT_PROMPT
    system_prompt: str | None = None
    cacheable: bool = True
    failure_reason: str = "failed"

    def __init__(self) -> None:
        self.num_translated = 0

    @abstractmethod
    def translate(self, texts: Sequence[str], language: str, ids: Sequence[str] | None = None) -> list[str | None]:
        """Translate ``texts`` into ``language`` (ISO 639-1 code); one output per input, ``None`` on failure."""

    def submit(
        self, texts: Sequence[str], language: str, ids: Sequence[str] | None = None
    ) -> list[Future[str | None] | CompletedTranslation]:
        """Start translating ``texts``; one future per input, resolving to what :meth:`translate` would return.

        The default translates now and returns :class:`CompletedTranslation` objects (finished futures without a
        lock each). Backends that overlap requests override it to return at once (:class:`OpenAITranslator`).
        """
        outputs = self.translate(texts, language, ids)
        if len(outputs) != len(texts):
            raise RuntimeError(f"{type(self).__name__} returned {len(outputs)} outputs for {len(texts)} texts")
        return [CompletedTranslation(output) for output in outputs]

    def close(self) -> None:
        """Release background resources (threads, connections); the default holds none."""

    @property
    def cache_prompt(self) -> str:
        """Everything besides the model that changes the output: the part of the cache key beyond (text, language)."""
        return json.dumps([self.system_prompt, self.prompt], ensure_ascii=False)

    def default_validator(self) -> TranslationValidator:
        """A validator that flags echoes of this translator's own prompt."""
        return TranslationValidator(
            prompt_fragments=prompt_fragments(self.prompt) + prompt_fragments(self.system_prompt)
        )

    def format_prompt(self, text: str, language: str) -> str:
        return self.prompt.format(language=language_name(language), text=text)

    def messages(self, text: str, language: str) -> list[dict[str, str]]:
        """The chat messages for one query."""
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": self.format_prompt(text, language)})
        return messages


def language_name(code: str) -> str:
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        raise KeyError(
            f"Unknown language code {code!r}: add its English name to conan_hf.data.translate.LANGUAGE_NAMES "
            f"(known: {', '.join(sorted(LANGUAGE_NAMES))})"
        ) from None


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


class _HTTPStatusError(Exception):
    """A non-2xx reply: ``code``, ``reason`` and the start of the body."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        super().__init__(f"HTTP {code} {reason}: {detail}")
        self.code = code


class OpenAITranslator(Translator):
    """Translate through an OpenAI-compatible chat-completions endpoint (e.g. a vLLM server).

    Each query is one request. At most ``max_workers`` requests are in flight at any time: worker threads take the
    next query as soon as theirs is answered (a sliding window), so one slow request holds up one worker, not a
    batch. Each worker keeps one HTTP/1.1 keep-alive connection to the server and reuses it for its requests (a
    connection the server closed, or one left in an unknown state by an error, is reopened). :meth:`submit` returns
    futures at once, so the CLR builder keeps requests of later batches in the window while it waits for the oldest.

    A request that times out, loses its connection, or gets HTTP 408/409/429/5xx is retried up to ``max_retries``
    times, sleeping ``backoff * 2**attempt`` seconds (capped at ``max_backoff``, with jitter); other HTTP errors (401,
    404, ...) are configuration mistakes and fail at once. Proxies from the environment are not used (the server is
    expected on the local network, as a vLLM server usually is).

    Args:
        base_url: the server's API root, e.g. ``http://localhost:8000/v1``.
        model: the served model name (also the cache's model key).
        api_key: sent as a Bearer token; default: the ``OPENAI_API_KEY`` environment variable, if set.
        max_workers: the window: requests (and kept-alive connections) at most in flight.
        timeout: seconds per request (connecting, and waiting for each part of the reply).
        on_failure: ``"reject"`` returns ``None`` for a query whose retries are exhausted (counted as rejected by the
            CLR builder); ``"raise"`` raises :class:`TranslationError`.
        temperature / max_tokens / extra_body: request fields (``extra_body`` is merged into the JSON body).

    Attributes:
        num_requests, num_retries, num_timeouts, num_failures, num_connections: counters over the object's lifetime
        (``num_connections``: TCP connections opened).
    """

    RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = None,
        max_workers: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int = 256,
        extra_body: Mapping[str, Any] | None = None,
        on_failure: Literal["reject", "raise"] = "reject",
        show_progress_bar: bool = True,
    ) -> None:
        super().__init__()
        if on_failure not in ("reject", "raise"):
            raise ValueError(f"on_failure must be 'reject' or 'raise', got {on_failure!r}")
        if max_workers < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need max_workers >= 1, max_retries >= 0 and timeout > 0")
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        url = urllib.parse.urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        self._scheme, self._host, self._port = url.scheme, url.hostname, url.port
        self._path = url.path + (f"?{url.query}" if url.query else "")
        self.model_name = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.max_workers = max_workers
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.on_failure = on_failure
        self.show_progress_bar = show_progress_bar
        self.num_requests = 0
        self.num_retries = 0
        self.num_timeouts = 0
        self.num_failures = 0
        self.num_connections = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each worker thread's kept-alive connection
        self._open: set[http.client.HTTPConnection] = set()

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="openai-translator")
            return self._executor

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = cls(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
            with self._lock:
                self._open.add(connection)
        return connection

    def _exchange(self, connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str]):
        if connection.sock is None:  # http.client (re)connects on the next request
            self._count(num_connections=1)
        connection.request("POST", self._path, body=body, headers=headers)
        response = connection.getresponse()
        return response, response.read()  # reading the whole reply frees the connection for the next request

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connection = self._connection()
        reused = connection.sock is not None
        try:
            try:
                response, data = self._exchange(connection, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # The server closed the idle kept-alive connection (its keep-alive timeout): send again on a new one.
                connection.close()
                response, data = self._exchange(connection, body, headers)
        except BaseException:
            connection.close()  # a half-read reply would corrupt the next exchange on this connection
            raise
        if not 200 <= response.status < 300:
            raise _HTTPStatusError(response.status, response.reason, data[:200].decode("utf-8", "replace"))
        payload = json.loads(data.decode("utf-8"))
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"response is not a chat completion: {str(payload)[:200]}") from None
        return "" if content is None else str(content).strip()

    def translate_one(self, text: str, language: str) -> str | None:
        """One query with retries; ``None`` (or :class:`TranslationError`) once retries are exhausted."""
        body = json.dumps(
            {
                "model": self.model_name,
                "messages": self.messages(text, language),
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                **self.extra_body,
            }
        ).encode("utf-8")
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(num_retries=1)
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random() / 2))
            self._count(num_requests=1)
            try:
                return self._post(body)
            except _HTTPStatusError as err:
                last_error = str(err)
                if err.code not in self.RETRY_STATUS:
                    self._count(num_failures=1)
                    raise TranslationError(f"{self.endpoint} refused the request ({last_error})") from err
            except TimeoutError as err:
                self._count(num_timeouts=1)
                last_error = f"timed out after {self.timeout}s ({err})"
            except (http.client.HTTPException, ValueError) as err:
                last_error = f"{type(err).__name__}: {err}"
            except OSError as err:  # refused, reset, unreachable, DNS
                last_error = f"connection error: {err}"
            logger.debug("translation request failed (attempt %d): %s", attempt + 1, last_error)
        self._count(num_failures=1)
        message = f"{self.endpoint}: gave up after {self.max_retries + 1} attempts; last error: {last_error}"
        if self.on_failure == "raise":
            raise TranslationError(message)
        logger.warning(message)
        return None

    def submit(
        self, texts: Sequence[str], language: str, ids: Sequence[str] | None = None
    ) -> list[Future[str | None]]:
        """Queue one request per text in the window and return at once; one future per text, in order."""
        pool = self._pool()
        futures = [pool.submit(self.translate_one, text, language) for text in texts]
        self.num_translated += len(texts)
        return futures

    def translate(self, texts: Sequence[str], language: str, ids: Sequence[str] | None = None) -> list[str | None]:
        futures = self.submit(texts, language, ids)
        index = {future: i for i, future in enumerate(futures)}
        outputs: list[str | None] = [None] * len(texts)
        try:
            for future in tqdm(
                as_completed(futures),
                total=len(futures),
                desc=f"Translating to {language}",
                disable=not self.show_progress_bar,
            ):
                outputs[index[future]] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return outputs

    def close(self) -> None:
        """Stop the worker threads (after the requests already queued) and close their connections."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()

    def __enter__(self) -> OpenAITranslator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.num_requests,
            "retries": self.num_retries,
            "timeouts": self.num_timeouts,
            "failures": self.num_failures,
            "connections": self.num_connections,
        }


class ParallelCorpusTranslator(Translator):
    """Parallel-corpus mode: look human translations up by row id; nothing is translated.

    Args:
        translations: ``{language: {id: text}}``.
        name: identifies the corpus in reports.

    A missing ``(language, id)`` yields ``None``, counted as rejected with reason ``"missing"``. Human translations are
    only checked for emptiness: a correct translation may legitimately equal the source (names, numbers) or contain
    mostly Latin letters ("Super Bowl 50在哪里举行？").

    Example::

        >>> translator = ParallelCorpusTranslator.from_squad({"de": "xquad/xquad.de.json"})  # doctest: +SKIP
        >>> translator.translate(["How many points did the Panthers defense surrender?"], "de",
        ...                      ids=["56beb4343aeaaa14008c925b"])  # doctest: +SKIP
        ['Wie viele Punkte hat die Verteidigung der Panthers zugelassen?']
    """

    cacheable = False
    failure_reason = "missing"
    prompt = ""

    def __init__(self, translations: Mapping[str, Mapping[str, str]], name: str = "parallel-corpus") -> None:
        super().__init__()
        self.translations = {lang: dict(table) for lang, table in translations.items()}
        self.model_name = name

    @property
    def languages(self) -> list[str]:
        return sorted(self.translations)

    def default_validator(self) -> TranslationValidator:
        return TranslationValidator(check_identical=False, check_script=False)

    def translate(self, texts: Sequence[str], language: str, ids: Sequence[str] | None = None) -> list[str | None]:
        if ids is None or len(ids) != len(texts):
            raise ValueError("ParallelCorpusTranslator looks translations up by id: pass one id per text")
        if language not in self.translations:
            raise KeyError(f"{self.model_name} has no {language!r} side (it has: {', '.join(self.languages)})")
        table = self.translations[language]
        self.num_translated += len(texts)
        return [table.get(str(i)) for i in ids]

    @classmethod
    def from_squad(cls, files: Mapping[str, str | os.PathLike]) -> ParallelCorpusTranslator:
        """Questions of SQuAD-format files whose question ids are aligned across languages (XQuAD, MLQA).

        ``files`` maps a language code to its file, e.g. ``{"de": ".../xquad.de.json", "zh": ".../xquad.zh.json"}``.
        """
        from .readers import read_squad

        return cls(
            {lang: {row["id"]: row["query"] for row in read_squad(path)} for lang, path in files.items()},
            name="parallel:squad",
        )

    @classmethod
    def from_mkqa(cls, path: str | os.PathLike, languages: Sequence[str] | None = None) -> ParallelCorpusTranslator:
        """MKQA (``mkqa.jsonl``): each line has ``example_id`` and ``queries`` (``{language: question}``)."""
        table: dict[str, dict[str, str]] = {}
        path = Path(path)
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    example_id, queries = str(record["example_id"]), record["queries"]
                    if not isinstance(queries, dict):
                        raise TypeError("'queries' is not an object")
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    from .readers import DataFormatError

                    raise DataFormatError(path, line_no, f"not an MKQA record ({err})") from None
                for lang, question in queries.items():
                    if (languages is None or lang in languages) and question:
                        table.setdefault(lang, {})[example_id] = question
        return cls(table, name="parallel:mkqa")

    @classmethod
    def from_stsb_multi_mt(
        cls,
        folder: str | os.PathLike,
        split: str = "dev",
        languages: Sequence[str] | None = None,
        column: Literal["sentence1", "sentence2"] = "sentence1",
    ) -> ParallelCorpusTranslator:
        """STS-B multi-mt (``stsb-{lang}-{split}.csv``, rows aligned across languages).

        Ids are those of :func:`conan_hf.data.readers.read_stsb_multi_mt` (``"{split}-{row}"``), so an English
        source read with that function finds its translations here.
        """
        from .readers import read_stsb_multi_mt

        folder = Path(folder)
        if languages is None:
            languages = sorted(p.name.split("-")[1] for p in folder.glob(f"stsb-*-{split}.csv"))
        if not languages:
            raise FileNotFoundError(f"no stsb-*-{split}.csv files in {folder}")
        return cls(
            {lang: {row["id"]: row[column] for row in read_stsb_multi_mt(folder, lang, split)} for lang in languages},
            name=f"parallel:stsb-multi-mt:{column}",
        )
