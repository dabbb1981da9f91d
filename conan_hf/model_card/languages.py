"""The languages of a model's training data, for the model card's ``language`` metadata and details table.

:func:`training_languages` is ``run_info["languages"]`` when recorded, else :func:`data_languages`: a sample of every
local data source of the recorded stages, read back and told apart by script (:func:`detect_languages`). A source
that is not on this machine, or text whose language cannot be told, makes the answer None ("not recorded") rather
than a guess.

Example::

    >>> detect_languages(["The cat is on the mat.", "大熊猫吃竹子。"])
    ['en', 'zh']
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError

from .run_info import _data_sources, _is_demo_source, _stage_config

#: Rows read from each data source to tell its languages (:func:`data_languages`).
LANGUAGE_SAMPLE_ROWS = 200
#: Scripts that name one language (a text is counted in the script most of its letters are written in; Han text
#: with any kana is Japanese). Latin text is English when English function words are frequent (see below); other
#: scripts (Cyrillic, Arabic, Devanagari, ...) and other Latin-script languages are not told apart: "not recorded".
_SCRIPT_LANGUAGES = {"HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko", "CJK": "zh", "GREEK": "el", "HEBREW": "he",
                     "THAI": "th"}
#: English function words; in English running text they are a quarter or more of the words, in German, French,
#: Spanish and other Latin-script languages a few percent.
_ENGLISH_WORDS = frozenset(["the", "of", "and", "to", "is", "that", "for", "with", "are", "this", "from", "which",
                            "have", "it", "by", "on", "as", "be", "not", "or"])
_ENGLISH_SHARE = 0.10
#: A language is listed when at least this share of a source's sampled texts is in it.
_LANGUAGE_SHARE = 0.05


def _script(text: str) -> str | None:
    """The script most letters of ``text`` are written in (``"LATIN"``, ``"CJK"``, ``"CYRILLIC"``, ...), with
    ``"KATAKANA"`` for Han text that has any kana; None when it has no letters."""
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            counts[name.split(" ", 1)[0] if name else "OTHER"] += 1
    if not counts:
        return None
    script = counts.most_common(1)[0][0]
    if script == "CJK" and (counts["HIRAGANA"] or counts["KATAKANA"]):
        return "KATAKANA"
    return script


def detect_languages(texts: Iterable[str]) -> list[str] | None:
    """ISO 639-1 codes of the languages ``texts`` are written in, or None when some of them cannot be told (see
    :data:`_SCRIPT_LANGUAGES`): every script with at least :data:`_LANGUAGE_SHARE` of the texts must name one
    language, and Latin-script texts must be English (English function words at least :data:`_ENGLISH_SHARE` of
    their words).

    Example::

        >>> detect_languages(["The cat is on the mat.", "大熊猫吃竹子。"])
        ['en', 'zh']
    """
    scripts: Counter[str] = Counter()
    latin_words: list[str] = []
    for text in texts:
        script = _script(text)
        if script is None:
            continue
        scripts[script] += 1
        if script == "LATIN":
            words = re.findall(r"[a-z]+", text.lower())
            if len(words) < 2:  # an id or a label ("doc12", "positive"), not running text
                scripts[script] -= 1
                continue
            latin_words += words
    total = sum(scripts.values())
    languages = set()
    for script, count in scripts.items():
        if count < _LANGUAGE_SHARE * total:
            continue
        if script == "LATIN":
            if not latin_words or sum(w in _ENGLISH_WORDS for w in latin_words) < _ENGLISH_SHARE * len(latin_words):
                return None
            languages.add("en")
        elif script in _SCRIPT_LANGUAGES:
            languages.add(_SCRIPT_LANGUAGES[script])
        else:
            return None
    return sorted(languages) or None


def _source_path(source: Any) -> str | None:
    path = source.get("path") if isinstance(source, Mapping) else source
    return str(path) if isinstance(path, (str, Path)) else None


def _source_languages(source: Any) -> list[str] | None:
    """The languages of one local data source, from its first :data:`LANGUAGE_SAMPLE_ROWS` rows (their texts, and a
    ``language`` column as CLR data has); None for a source that is not on this machine (a Hub name is never
    fetched) or cannot be read or told."""
    import glob

    from conan_hf.data.sources import LOCATION, iter_sources

    path = _source_path(source)
    if path is None or not (Path(path).exists() or glob.glob(path)):
        return None
    texts, named = [], set()
    try:
        for row in itertools.islice(iter_sources([source], None, (), what="model card"), LANGUAGE_SAMPLE_ROWS):
            # conan_hf.data.clr rows: the query is in the row's `language`, the passages in the source language
            language = row.get("language")
            if isinstance(language, str):
                named.add(language)
            for key, value in row.items():
                if key not in (LOCATION, "language") and not (key == "query" and isinstance(language, str)):
                    values = value if isinstance(value, list) else [value]
                    texts += [v for v in values if isinstance(v, str)]
    except (DataError, OSError, ValueError):
        return None
    detected = detect_languages(texts)
    return None if detected is None else sorted(named | set(detected))


def data_languages(info: Mapping[str, Any]) -> list[str] | None:
    """Languages of every data source of the recorded stages (:func:`detect_languages` on a sample of each; the demo
    corpus: :data:`conan_hf.demo.LANGUAGES`), or None when there are no sources or one cannot be told."""
    sources = [src for stage in info.get("stages") or [] for src in _data_sources(_stage_config(stage))]
    if not sources:
        return None
    languages: set[str] = set()
    for source in sources:
        if _is_demo_source(source):
            from conan_hf.demo import LANGUAGES

            found: list[str] | None = list(LANGUAGES)
        else:
            found = _source_languages(source)
        if found is None:
            return None
        languages.update(found)
    return sorted(languages)


def training_languages(info: Mapping[str, Any]) -> list[str] | None:
    """Languages of the training data: ``run_info["languages"]`` when given, else :func:`data_languages` (the
    recorded stages' data, read back); None when they cannot be told (the card then says "not recorded" rather than
    guess)."""
    if info.get("languages"):
        return list(info["languages"])
    return data_languages(info)


__all__ = ["LANGUAGE_SAMPLE_ROWS", "data_languages", "detect_languages", "training_languages"]
