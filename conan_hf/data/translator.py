"""The translator interface of the cross-lingual retrieval builder: :class:`Translator`, its prompt and language names.

``translate(texts, language, ids=None)`` returns one output per input, ``None`` where the backend failed (the CLR
builder counts those as rejected). ``submit(texts, language, ids=None)`` returns one future per input instead: the
default runs :meth:`Translator.translate` at once and wraps each output in a :class:`CompletedTranslation`. Outputs
are raw: :mod:`conan_hf.data.validate` decides which are kept. The backends are in :mod:`conan_hf.data.translate`.

Example::

    >>> from conan_hf.data.translator import Translator
    >>> class Upper(Translator):
    ...     def translate(self, texts, language, ids=None):
    ...         return [text.upper() for text in texts]
    >>> Upper().translate(["how tall is mount everest"], "de")
    ['HOW TALL IS MOUNT EVEREST']
"""

from __future__ import annotations

import json
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future

from .validate import TranslationValidator

__all__ = [
    "CompletedTranslation",
    "DEFAULT_MODEL",
    "DEFAULT_PROMPT",
    "LANGUAGE_NAMES",
    "TranslationError",
    "Translator",
    "language_name",
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
    """The English name of a language code in :data:`LANGUAGE_NAMES` (``"de"`` → ``"German"``); ``KeyError`` naming
    the known codes otherwise."""
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        raise KeyError(
            f"Unknown language code {code!r}: add its English name to conan_hf.data.translate.LANGUAGE_NAMES "
            f"(known: {', '.join(sorted(LANGUAGE_NAMES))})"
        ) from None

