"""An OpenAI-compatible chat-completions server as a CLR query translator (:class:`OpenAITranslator`)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, Literal

from tqdm.auto import tqdm

from .translator import DEFAULT_MODEL, DEFAULT_PROMPT, TranslationError, Translator

# Records go to the logger of the public module, conan_hf.data.translate.
logger = logging.getLogger("conan_hf.data.translate")

__all__ = ["OpenAITranslator"]


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
