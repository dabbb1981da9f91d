"""Languages, splits and task names read from local evaluation files' names (and, for the language, their script).

mteb validates BCP-47 style ``xxx-Scrp`` language codes; :func:`to_langscript` maps the short names used in file
names, MKQA, XQuAD and Tatoeba to them, :func:`guess_language` guesses a file's language, :func:`split_from_name` its
split, and :func:`task_name_from_path` gives a local task its readable name.

Example::

    >>> to_langscript("de"), split_from_name("stsb-de-dev.csv"), task_name_from_path("LocalSTS", "stsb-de-dev.csv")
    ('deu-Latn', 'dev', 'LocalSTS-stsb-de-dev')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# Short language names (file names, MKQA, XQuAD, Tatoeba) -> the BCP-47 style codes mteb validates.
LANGUAGE_CODES: dict[str, str] = {
    "en": "eng-Latn", "eng": "eng-Latn", "zh": "zho-Hans", "zh_cn": "zho-Hans", "zh-cn": "zho-Hans",
    "cmn": "cmn-Hans", "zh_tw": "zho-Hant", "zh_hk": "zho-Hant", "de": "deu-Latn", "deu": "deu-Latn",
    "es": "spa-Latn", "spa": "spa-Latn", "fr": "fra-Latn", "fra": "fra-Latn", "it": "ita-Latn", "ita": "ita-Latn",
    "ja": "jpn-Jpan", "jpn": "jpn-Jpan", "nl": "nld-Latn", "pl": "pol-Latn", "pt": "por-Latn", "ru": "rus-Cyrl",
    "ar": "ara-Arab", "da": "dan-Latn", "fi": "fin-Latn", "he": "heb-Hebr", "hu": "hun-Latn", "km": "khm-Khmr",
    "ko": "kor-Hang", "ms": "msa-Latn", "no": "nob-Latn", "sv": "swe-Latn", "th": "tha-Thai", "tr": "tur-Latn",
    "vi": "vie-Latn", "el": "ell-Grek", "hi": "hin-Deva", "ro": "ron-Latn",
}


_CJK = re.compile(r"[\u4e00-\u9fff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def to_langscript(language: str) -> str:
    """Map ``"en"`` / ``"deu"`` / ``"zh_cn"`` / ``"eng-Latn"`` to the ``xxx-Scrp`` code mteb expects."""
    if re.fullmatch(r"[a-z]{3}-[A-Z][a-z]{3}", language):
        return language
    try:
        return LANGUAGE_CODES[language.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown language {language!r}: pass an mteb code such as 'eng-Latn' or one of {sorted(LANGUAGE_CODES)}."
        ) from None


def guess_language(path: str | Path, texts: Sequence[str] = ()) -> str:
    """Best guess of a file's language: a language token in its name (``stsb-de-dev.csv``), else its script."""
    for token in re.split(r"[-_.]", Path(path).name.lower()):
        if token in LANGUAGE_CODES and token not in {"no"}:
            return LANGUAGE_CODES[token]
    sample = "".join(texts[:200])
    if sample:
        if len(_KANA.findall(sample)) > 0.05 * len(sample):
            return "jpn-Jpan"
        if len(_HANGUL.findall(sample)) > 0.2 * len(sample):
            return "kor-Hang"
        if len(_CJK.findall(sample)) > 0.2 * len(sample):
            return "zho-Hans"
        if len(_CYRILLIC.findall(sample)) > 0.2 * len(sample):
            return "rus-Cyrl"
    return "eng-Latn"


#: Split names recognised in a file name (``stsb-en-dev.csv`` is a dev split, ``SICK_trial.txt`` a trial split).
SPLIT_NAMES = ("train", "dev", "validation", "trial", "test")


def split_from_name(path: str | Path, default: str = "test") -> str:
    """The split a data file holds, from a token of its name (``stsb-en-dev.csv`` → ``"dev"``), else ``default``.

    >>> split_from_name("stsb-en-dev.csv"), split_from_name("SICK_trial.txt"), split_from_name("pairs.jsonl")
    ('dev', 'trial', 'test')
    """
    tokens = re.split(r"[-_.]", Path(path).name.lower())
    return next((token for token in tokens if token in SPLIT_NAMES), default)


def task_name_from_path(prefix: str, path: str | Path) -> str:
    """A readable, file-derived task name such as ``LocalSTS-stsb-en-dev``."""
    path = Path(path)
    stem = path.name if path.is_dir() else path.stem
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}"


__all__ = ["LANGUAGE_CODES", "SPLIT_NAMES", "guess_language", "split_from_name", "task_name_from_path", "to_langscript"]
