"""The target-language mix of the cross-lingual retrieval set (paper §3.3, Table 7) and its exact assignment to rows.

Table 7's percentages sum to 106; every use normalises them by their sum (English 25/106, Chinese 12/106, ...).
:func:`language_counts` turns a mix into exact per-language counts by largest-remainder rounding and
:func:`assign_languages` shuffles them with a seeded RNG.

Example::

    >>> from conan_hf.data.clr_languages import language_counts
    >>> language_counts(10, ["de", "es", "zh"])
    {'de': 4, 'es': 3, 'zh': 3}
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Mapping, Sequence
from fractions import Fraction

__all__ = ["TABLE7", "LanguageMix", "assign_languages", "language_counts", "language_shares"]

#: Table 7 of the paper: language code → percentage of CLR queries, exactly as printed. The values sum to 106;
#: they are normalised by their sum wherever they are used (see :func:`language_shares`).
TABLE7: dict[str, float] = {
    "en": 25, "zh": 12, "es": 8, "fr": 6, "ja": 6, "de": 5, "ru": 5, "it": 4, "pt": 4, "ar": 3, "ko": 3,
    "bn": 2, "da": 2, "sv": 2, "th": 2, "ms": 2, "tr": 2, "vi": 2, "nl": 2, "pl": 2, "hi": 2,
    "km": 1, "fi": 1, "he": 1, "hu": 1, "no": 1,
}  # fmt: skip

LanguageMix = Mapping[str, float] | Sequence[str] | str


def _weights(languages: LanguageMix) -> dict[str, float]:
    """``{code: weight}`` from a mapping, a list of codes (equal weights), or ``"table7"``."""
    if isinstance(languages, str):
        if languages.lower() != "table7":
            raise ValueError(f"languages must be a mapping, a list of codes or 'table7', got {languages!r}")
        languages = TABLE7
    if isinstance(languages, Mapping):
        weights = dict(languages)
    else:
        codes = list(languages)
        if len(set(codes)) != len(codes):
            raise ValueError(f"duplicate language codes in {codes}")
        weights = dict.fromkeys(codes, 1.0)
    if not weights:
        raise ValueError("no languages given")
    bad = {code: w for code, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
    if bad or sum(weights.values()) <= 0:
        raise ValueError(f"language weights must be non-negative numbers with a positive sum, got {weights}")
    return weights


def language_shares(languages: LanguageMix = TABLE7) -> dict[str, float]:
    """The mix normalised to fractions summing to 1 (Table 7: each percentage divided by 106)."""
    weights = _weights(languages)
    total = sum(weights.values())
    return {code: w / total for code, w in weights.items()}


def language_counts(n: int, languages: LanguageMix = TABLE7) -> dict[str, int]:
    """Exact per-language row counts for ``n`` rows by largest-remainder (Hamilton) rounding.

    Each language gets the floor of its quota ``n * w / sum(w)``; the rows left over go to the largest fractional
    parts (ties: table order). Counts sum to ``n`` and differ from the quota by less than one row. Exact rational
    arithmetic keeps the rounding independent of floating-point error.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    weights = {code: Fraction(w) for code, w in _weights(languages).items()}
    total = sum(weights.values())
    quotas = {code: n * w / total for code, w in weights.items()}
    counts = {code: int(q) for code, q in quotas.items()}
    order = list(weights)
    leftover = n - sum(counts.values())
    by_remainder = sorted(order, key=lambda c: (-(quotas[c] - counts[c]), order.index(c)))
    for code in by_remainder[:leftover]:
        counts[code] += 1
    return counts


def _shuffled_language_indices(n: int, seed: int, weights: Mapping[str, float]) -> tuple[list[str], array]:
    """``(codes, indices)``: row ``i`` gets ``codes[indices[i]]``, the assignment of :func:`assign_languages`.

    One byte per row (two beyond 255 languages) instead of a list of ``n`` references: 10M rows take 10 MB.
    ``random.shuffle`` permutes any mutable sequence by its length alone, so shuffling these indices with
    ``random.Random(seed)`` gives exactly the order the same shuffle gives to the list of codes.
    """
    counts = language_counts(n, weights)
    codes = list(counts)
    indices = array("B" if len(codes) <= 256 else "H")
    for index, count in enumerate(counts.values()):
        indices.extend(array(indices.typecode, [index]) * count)
    random.Random(seed).shuffle(indices)
    return codes, indices


def assign_languages(n: int, seed: int = 0, languages: LanguageMix = TABLE7) -> list[str]:
    """``n`` target-language codes in the proportions of ``languages`` (default Table 7, normalised), shuffled.

    The counts are those of :func:`language_counts` (exact proportions at any scale); the order is a shuffle by
    ``random.Random(seed)``, so the same ``(n, seed, languages)`` always gives the same list.

    Args:
        n: number of rows.
        seed: seeds the shuffle.
        languages: ``{code: weight}`` (normalised by its sum), a list of codes (equal shares) or ``"table7"``.

    Returns:
        ``n`` language codes, row ``i``'s target language at position ``i``.

    Example::

        >>> from conan_hf.data.clr import assign_languages
        >>> codes = assign_languages(106_000, seed=0)
        >>> codes.count("en"), codes.count("zh"), codes.count("km")
        (25000, 12000, 1000)
    """
    codes, indices = _shuffled_language_indices(n, seed, _weights(languages))
    return [codes[i] for i in indices]
