"""Parallel-corpus mode of the CLR builder: human translations looked up by id (:class:`ParallelCorpusTranslator`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from .translator import Translator
from .validate import TranslationValidator

__all__ = ["ParallelCorpusTranslator"]


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
