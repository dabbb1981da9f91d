"""Validation of machine-translated queries for the CLR set (paper §3.3, App. A).

An LLM translator fails in a few recognisable ways: it returns nothing, returns the source unchanged, echoes the
instruction ("Translate the following text into German: ..."), or answers in the wrong language. Each output is checked
for these cheaply before it enters the training set; a rejected output is counted under its reason and the row is
dropped — never silently kept.

The language check is a Unicode-script test: among the letters of the output, the share written in the script(s)
expected for the target language must reach ``min_script_ratio`` (default 0.5, so Latin brand names inside a Chinese
query are fine, but an English answer to a Chinese request is not). It cannot tell French from English — both are
Latin — which is why the identical-to-source check exists.

Example::

    >>> from conan_hf.data.validate import TranslationValidator
    >>> validator = TranslationValidator()
    >>> validator.check("How tall is Everest?", "珠穆朗玛峰有多高？", "zh") is None
    True
    >>> validator.check("How tall is Everest?", "How tall is Everest?", "de")
    'identical'
    >>> validator.check("How tall is Everest?", "Wie hoch ist der Everest?", "ru")
    'script'
    >>> dict(validator.rejected)
    {'identical': 1, 'script': 1}
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

__all__ = ["LANGUAGE_SCRIPTS", "REJECTION_REASONS", "TranslationValidator", "script_of", "script_ratio"]

# Unicode blocks per script. Ranges are inclusive code points; only letters (str.isalpha) are classified, so
# punctuation, digits and spaces never count for or against a language.
_SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "Latin": ((0x0041, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF5A)),
    "Greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "Cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "Hebrew": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "Arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "Devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "Bengali": ((0x0980, 0x09FF),),
    "Thai": ((0x0E00, 0x0E7F),),
    "Khmer": ((0x1780, 0x17FF), (0x19E0, 0x19FF)),
    "Hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xD7B0, 0xD7FF)),
    "Hiragana": ((0x3040, 0x309F),),
    "Katakana": ((0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "Han": (
        (0x2E80, 0x2FDF),
        (0x3005, 0x3007),
        (0x3021, 0x3029),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xF900, 0xFAFF),
        (0x20000, 0x2FA1F),
    ),
}

#: Scripts accepted for each language code (ISO 639-1, as in Table 7). Codes not listed are not script-checked.
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "zh": frozenset({"Han"}),
    "ja": frozenset({"Hiragana", "Katakana", "Han"}),
    "ko": frozenset({"Hangul"}),
    "ru": frozenset({"Cyrillic"}),
    "ar": frozenset({"Arabic"}),
    "he": frozenset({"Hebrew"}),
    "hi": frozenset({"Devanagari"}),
    "bn": frozenset({"Bengali"}),
    "th": frozenset({"Thai"}),
    "km": frozenset({"Khmer"}),
    **{
        code: frozenset({"Latin"})
        for code in ("en", "es", "fr", "de", "it", "pt", "da", "sv", "ms", "tr", "vi", "nl", "pl", "fi", "hu", "no")
    },
}

#: Every reason :meth:`TranslationValidator.check` can return, in the order they are tested.
REJECTION_REASONS = ("failed", "missing", "empty", "identical", "prompt_echo", "script")

_WS = re.compile(r"\s+")


def script_of(char: str) -> str | None:
    """The script of one letter (``None`` for non-letters and for scripts not in the table)."""
    if not char.isalpha():
        return None
    cp = ord(char)
    for script, ranges in _SCRIPT_RANGES.items():
        for lo, hi in ranges:
            if lo <= cp <= hi:
                return script
    return "Other"


def script_ratio(text: str, scripts: Iterable[str]) -> float:
    """Share of the letters of ``text`` written in one of ``scripts``; 0.0 when ``text`` has no letters."""
    wanted = set(scripts)
    letters = [script_of(c) for c in unicodedata.normalize("NFC", text) if c.isalpha()]
    if not letters:
        return 0.0
    return sum(s in wanted for s in letters) / len(letters)


def _normalise(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


class TranslationValidator:
    """Checks translations and counts rejections per reason.

    Args:
        min_script_ratio: minimum share of letters in the target language's script(s).
        prompt_fragments: fixed parts of the instruction prompt; an output containing any of them (case-insensitive)
            is a prompt echo. :func:`conan_hf.data.translate.prompt_fragments` derives them from a prompt template.
        min_echo_length: fragments shorter than this are ignored (a two-word fragment could legitimately appear).
        check_identical / check_script: switch those checks off, e.g. for human translations, where an output equal
            to the source or in another script can be correct.

    ``check`` returns ``None`` for an accepted output, else the rejection reason (one of :data:`REJECTION_REASONS`);
    ``accepted`` and ``rejected`` count the outcomes.
    """

    def __init__(
        self,
        min_script_ratio: float = 0.5,
        prompt_fragments: Iterable[str] = (),
        min_echo_length: int = 12,
        check_identical: bool = True,
        check_script: bool = True,
    ) -> None:
        if not 0.0 <= min_script_ratio <= 1.0:
            raise ValueError(f"min_script_ratio must be in [0, 1], got {min_script_ratio}")
        self.min_script_ratio = min_script_ratio
        self.min_echo_length = min_echo_length
        self.check_identical = check_identical
        self.check_script = check_script
        self.prompt_fragments = [_normalise(f) for f in prompt_fragments if len(_normalise(f)) >= min_echo_length]
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def reason(self, source: str, output: str | None, language: str, failure_reason: str = "failed") -> str | None:
        """The rejection reason for ``output`` (a translation of ``source`` into ``language``), without counting.

        ``None`` outputs (the backend failed) get ``failure_reason``.
        """
        if output is None:
            return failure_reason
        out = _normalise(output)
        if not out:
            return "empty"
        if self.check_identical and out == _normalise(source):
            return "identical"
        if any(fragment in out for fragment in self.prompt_fragments):
            return "prompt_echo"
        scripts = LANGUAGE_SCRIPTS.get(language) if self.check_script else None
        if scripts is not None and script_ratio(output, scripts) < self.min_script_ratio:
            return "script"
        return None

    def check(self, source: str, output: str | None, language: str, failure_reason: str = "failed") -> str | None:
        """Like :meth:`reason`, and counts the outcome."""
        why = self.reason(source, output, language, failure_reason)
        if why is None:
            self.accepted += 1
        else:
            self.rejected[why] += 1
        return why

    def summary(self) -> dict[str, int]:
        """``{"accepted": n, "rejected": n, "<reason>": n, ...}``."""
        return {"accepted": self.accepted, "rejected": sum(self.rejected.values()), **dict(self.rejected)}
