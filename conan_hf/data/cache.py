"""On-disk translation cache, so an interrupted CLR build resumes without translating anything twice.

Entries are keyed by ``(text, language, model, prompt)``: changing the translator model or the prompt template makes
every lookup miss instead of returning translations made under other settings. The store is one SQLite file in WAL
mode; each :meth:`TranslationCache.put_many` is a single committed transaction, so a process killed at any point
(even ``SIGKILL``) leaves every batch written before it intact and no half-written batch.

The cache stores the translator's raw output; validation (:mod:`conan_hf.data.validate`) runs after the lookup,
so a rerun reproduces the same accept/reject decisions without asking the translator again. Failed requests (``None``)
are not stored and are retried on the next run.

Example::

    >>> from conan_hf.data.cache import TranslationCache
    >>> cache = TranslationCache("/tmp/clr-cache/translations.sqlite")
    >>> cache.put_many([("Hello", "de", "Hallo")], model="my-llm", prompt="Translate into {language}: {text}")
    >>> cache.get_many(["Hello", "Bye"], "de", model="my-llm", prompt="Translate into {language}: {text}")
    {'Hello': 'Hallo'}
    >>> cache.hits, cache.misses
    (1, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["RunMemo", "TranslationCache", "cache_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS translations (
    key TEXT PRIMARY KEY,
    language TEXT NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    translation TEXT NOT NULL
)
"""


def cache_key(text: str, language: str, model: str, prompt: str) -> str:
    """SHA-256 of the JSON-encoded ``(text, language, model, prompt)`` tuple (JSON keeps the fields unambiguous)."""
    payload = json.dumps([text, language, model, prompt], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TranslationCache:
    """SQLite-backed ``(text, language, model, prompt) → translation`` store with hit/miss counters.

    Args:
        path: the database file, or a directory (the file ``translations.sqlite`` inside it). Parents are created.

    Attributes:
        hits / misses: lookups answered / not answered by the cache since this object was created.
        writes: entries stored since this object was created.
    """

    FILENAME = "translations.sqlite"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.suffix == "" or path.is_dir():
            path = path / self.FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(_SCHEMA)
        self.hits = 0
        self.misses = 0
        self.writes = 0

    def get_many(self, texts: Sequence[str], language: str, model: str, prompt: str) -> dict[str, str]:
        """Cached translations of ``texts`` (only those present), counting hits and misses per distinct text."""
        unique = list(dict.fromkeys(texts))
        keys = {cache_key(t, language, model, prompt): t for t in unique}
        found: dict[str, str] = {}
        with self._lock:
            key_list = list(keys)
            # SQLite limits the number of bound parameters per statement; 500 is safely below every default.
            for start in range(0, len(key_list), 500):
                chunk = key_list[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, translation in self._conn.execute(
                    f"SELECT key, translation FROM translations WHERE key IN ({marks})", chunk
                ):
                    found[keys[key]] = translation
        self.hits += len(found)
        self.misses += len(unique) - len(found)
        return found

    def get(self, text: str, language: str, model: str, prompt: str) -> str | None:
        """One lookup (counted)."""
        return self.get_many([text], language, model, prompt).get(text)

    def put_many(self, items: Iterable[tuple[str, str, str]], model: str, prompt: str) -> None:
        """Store ``(text, language, translation)`` triples in one transaction; ``None`` translations are skipped."""
        rows = [
            (cache_key(text, language, model, prompt), language, model, text, translation)
            for text, language, translation in items
            if translation is not None
        ]
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        self.writes += len(rows)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def stats(self) -> dict[str, int]:
        """Counters of this session plus the number of stored entries."""
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "entries": len(self)}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TranslationCache(path={str(self.path)!r}, hits={self.hits}, misses={self.misses})"


class RunMemo:
    """Every ``(text, language)`` pair resolved during one CLR build, with its raw output (``None`` for a failed
    request), in a temporary SQLite file deleted by :meth:`close`.

    The streaming builder looks pairs up here before the translation cache, so a query text that recurs anywhere in
    the source is translated (and looked up in the cache) once per run, as when the whole source was held in memory,
    while RAM stays bounded. Unlike :class:`TranslationCache` it keeps failures, so a failed pair is not requested
    again within the run (a later run retries it), and it needs no durability (journal and syncing are off).

    Args:
        folder: where to put the file; default: the system's temporary folder.
    """

    #: Texts per ``IN (...)`` lookup: SQLite limits bound parameters per statement; 500 is below every default.
    CHUNK = 500

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        handle, name = tempfile.mkstemp(prefix="clr-run-memo-", suffix=".sqlite", dir=folder)
        os.close(handle)
        self.path = Path(name)
        self._conn = sqlite3.connect(name, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=OFF")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute(
            "CREATE TABLE memo (language TEXT NOT NULL, text TEXT NOT NULL, output TEXT, PRIMARY KEY (language, text))"
            " WITHOUT ROWID"
        )

    def get_many(self, texts: Sequence[str], language: str) -> dict[str, str | None]:
        """The outputs of those ``texts`` resolved so far in this run (``None``: the request failed)."""
        found: dict[str, str | None] = {}
        for start in range(0, len(texts), self.CHUNK):
            chunk = list(texts[start : start + self.CHUNK])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT text, output FROM memo WHERE language = ? AND text IN ({marks})"
            found.update(self._conn.execute(query, [language, *chunk]))
        return found

    def put_many(self, items: Iterable[tuple[str, str, str | None]]) -> None:
        """Record ``(text, language, output)`` triples (``None`` outputs included)."""
        rows = [(language, text, output) for text, language, output in items]
        if rows:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?)", rows)
            self._conn.execute("COMMIT")

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM memo").fetchone()[0]

    def close(self) -> None:
        self._conn.close()
        self.path.unlink(missing_ok=True)
