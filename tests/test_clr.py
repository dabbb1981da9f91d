"""CLR builder (§3.3): Table 7 language mix, parallel-corpus mode on XQuAD, crash-safe translation cache, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from conan_hf.data.cache import TranslationCache
from conan_hf.data.clr import TABLE7, assign_languages, build_clr_dataset, language_counts, language_shares, main
from conan_hf.data.translate import ParallelCorpusTranslator, Translator

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- language mix


def test_table7_is_the_paper_table():
    assert len(TABLE7) == 26
    assert sum(TABLE7.values()) == 106  # as printed in the paper; normalised wherever it is used
    assert TABLE7["en"] == 25 and TABLE7["zh"] == 12 and TABLE7["km"] == 1
    shares = language_shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["en"] == pytest.approx(25 / 106)


def test_assignment_matches_table7_within_half_a_point_on_100k_rows():
    n = 100_000
    codes = assign_languages(n, seed=7)
    assert len(codes) == n
    counts = Counter(codes)
    assert set(counts) == set(TABLE7)
    total = sum(TABLE7.values())
    for code, percent in TABLE7.items():
        observed = 100 * counts[code] / n
        expected = 100 * percent / total
        assert abs(observed - expected) <= 0.5, (code, observed, expected)
        # largest-remainder rounding: never more than one row away from the exact quota
        assert abs(counts[code] - n * percent / total) < 1
    assert assign_languages(n, seed=7) == codes  # reproducible
    other = assign_languages(n, seed=8)
    assert other != codes and Counter(other) == counts  # a different seed shuffles, proportions stay exact


def test_language_counts_largest_remainder_by_hand():
    # 10 rows over weights 1:1:1 -> quotas 3.33 each; the single leftover row goes to the first in table order.
    assert language_counts(10, ["de", "es", "zh"]) == {"de": 4, "es": 3, "zh": 3}
    # quotas 7 * (5, 3, 2) / 10 = 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the leftover to the largest remainder (0.5).
    assert language_counts(7, {"a": 5, "b": 3, "c": 2}) == {"a": 4, "b": 2, "c": 1}
    assert language_counts(106, TABLE7) == {k: int(v) for k, v in TABLE7.items()}
    assert sorted(assign_languages(10, 0, ["de", "es", "zh"])) == ["de"] * 4 + ["es"] * 3 + ["zh"] * 3
    with pytest.raises(ValueError, match="non-negative"):
        language_counts(5, {"de": -1, "es": 2})


# --------------------------------------------------------------------------------------- parallel mode on XQuAD


def _read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_parallel_mode_builds_cross_lingual_xquad(shared_data_dir):
    xquad = shared_data_dir / "xling" / "xquad"
    from conan_hf.data.readers import read_squad

    languages = ("de", "es", "zh")
    translator = ParallelCorpusTranslator.from_squad({lang: xquad / f"xquad.{lang}.json" for lang in languages})
    dataset, report = build_clr_dataset(
        read_squad(xquad / "xquad.en.json"), list(languages), translator, seed=11, show_progress_bar=False
    )
    assert len(dataset) == 1190 and report.num_rejected == 0
    assert report.assigned == {"de": 397, "es": 397, "zh": 396}  # exact thirds of 1190
    assert report.translated == 1190

    # Independent index of the raw files: question id -> question per language, and -> English paragraph.
    questions = {lang: {} for lang in ("en",) + languages}
    paragraph_of, answers_of = {}, {}
    for lang in questions:
        for article in _read_json(xquad / f"xquad.{lang}.json")["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    questions[lang][qa["id"]] = qa["question"]
                    if lang == "en":
                        paragraph_of[qa["id"]] = paragraph["context"]
                        answers_of[qa["id"]] = [a["text"] for a in qa["answers"]]
    assert sorted(dataset["id"]) == sorted(questions["en"])
    for row in dataset:
        qid, lang = row["id"], row["language"]
        assert lang in languages
        assert row["query"] == questions[lang][qid]  # the human translation of this very question
        assert row["source_query"] == questions["en"][qid]
        assert row["positive"] == paragraph_of[qid]  # the English paragraph
        assert any(answer in row["positive"] for answer in answers_of[qid])
    zh_rows = [r for r in dataset if r["language"] == "zh"]
    assert all(any("\u4e00" <= c <= "\u9fff" for c in r["query"]) for r in zh_rows)


def test_parallel_mode_rejects_languages_it_lacks_and_counts_missing_ids():
    translator = ParallelCorpusTranslator({"de": {"a": "Frage A", "b": "Frage B"}})
    rows = [{"id": i, "query": f"question {i}", "positive": "p"} for i in ("a", "b", "c")]
    with pytest.raises(ValueError, match=r"no \['fr'\] side"):
        build_clr_dataset(rows, ["de", "fr"], translator, show_progress_bar=False)
    dataset, report = build_clr_dataset(rows, ["de"], translator, show_progress_bar=False)
    assert dataset["query"] == ["Frage A", "Frage B"]
    assert report.rejected == {"missing": 1}
    assert report.rejected_examples == [
        {"id": "c", "language": "de", "source": "question c", "output": None, "reason": "missing"}
    ]


def test_stsb_multi_mt_parallel_translator(shared_data_dir):
    from conan_hf.data.readers import read_stsb_multi_mt

    folder = shared_data_dir / "sts" / "stsb-multi-mt"
    translator = ParallelCorpusTranslator.from_stsb_multi_mt(folder, split="dev", languages=["de", "zh"])
    english = read_stsb_multi_mt(folder, "en", "dev")[:50]
    rows = [{"id": r["id"], "query": r["sentence1"], "positive": r["sentence2"]} for r in english]
    dataset, report = build_clr_dataset(rows, ["de", "zh"], translator, seed=0, show_progress_bar=False)
    assert report.num_rejected == 0 and len(dataset) == 50
    import csv

    with open(folder / "stsb-de-dev.csv", encoding="utf-8", newline="") as handle:
        de_lines = list(csv.reader(handle))
    with open(folder / "stsb-zh-dev.csv", encoding="utf-8", newline="") as handle:
        zh_lines = list(csv.reader(handle))
    for row in dataset:
        line = int(row["id"].split("-")[1])
        expected = (de_lines if row["language"] == "de" else zh_lines)[line][0]
        assert row["query"] == expected


def test_mkqa_parallel_translator(tmp_path):
    path = tmp_path / "mkqa.jsonl"
    records = [
        {
            "example_id": 1,
            "query": "who wrote hamlet",
            "queries": {"en": "who wrote hamlet", "de": "wer schrieb hamlet"},
        },
        {
            "example_id": 2,
            "query": "capital of peru",
            "queries": {"en": "capital of peru", "de": "hauptstadt von peru"},
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    translator = ParallelCorpusTranslator.from_mkqa(path)
    assert translator.translate(["x", "y"], "de", ids=["2", "1"]) == ["hauptstadt von peru", "wer schrieb hamlet"]
    path.write_text(json.dumps(records[0]) + '\n{"example_id": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"mkqa.jsonl:2: not an MKQA record"):
        ParallelCorpusTranslator.from_mkqa(path)


def test_cli_parallel_xquad(shared_data_dir, tmp_path):
    xquad = shared_data_dir / "xling" / "xquad"
    out = tmp_path / "clr.jsonl"
    code = main([
        str(xquad / "xquad.en.json"), "-o", str(out), "--backend", "parallel", "--languages", "en:1,de:1,zh:2",
        "--parallel", f"de={xquad / 'xquad.de.json'}", f"zh={xquad / 'xquad.zh.json'}", "--limit", "100",
        "--seed", "5", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    report = json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert len(rows) == 100 and report["num_output_rows"] == 100
    assert Counter(r["language"] for r in rows) == {"en": 25, "de": 25, "zh": 50}
    assert all(r["query"] == r["source_query"] for r in rows if r["language"] == "en")
    assert all(r["query"] != r["source_query"] for r in rows if r["language"] != "en")


def test_cli_help_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "conan_hf.data.clr", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "conan-clr" in result.stdout and "--backend" in result.stdout
    assert "RuntimeWarning" not in result.stderr


# ------------------------------------------------------------------------------------------- crash-safe cache

# The translator of the crash test: uppercases; appends every text it is asked to translate to a log file, so
# repeated work is visible across processes; SIGKILLs its own process once it has translated `kill_after` texts.
_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from conan_hf.data.clr import build_clr_dataset
    from conan_hf.data.translate import Translator

    class LoggingTranslator(Translator):
        model_name = "upper-v1"

        def __init__(self, log, kill_after=None):
            super().__init__()
            self.log, self.kill_after = log, kill_after

        def translate(self, texts, language, ids=None):
            if self.kill_after is not None and self.num_translated >= self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            with open(self.log, "a", encoding="utf-8") as handle:
                for text in texts:
                    handle.write(json.dumps([language, text]) + "\\n")
            self.num_translated += len(texts)
            return [f"{language.upper()}: {text.upper()}" for text in texts]
    """
)


def _rows(n):
    # 10 query texts appear twice: the cache and the builder translate each (text, language) once.
    return [{"id": f"r{i}", "query": f"search query number {i % (n - 10)}", "positive": f"doc {i}"} for i in range(n)]


def test_cache_resume_after_sigkill_repeats_no_translation(tmp_path):
    module = tmp_path / "crashing_translator.py"
    module.write_text(_SCRIPT, encoding="utf-8")
    rows_path = tmp_path / "rows.json"
    rows = _rows(130)
    rows_path.write_text(json.dumps(rows), encoding="utf-8")
    languages = {"en": 1, "de": 1, "fr": 1, "es": 1}
    log, cache_dir = tmp_path / "calls.jsonl", tmp_path / "cache"
    runner = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from crashing_translator import LoggingTranslator, build_clr_dataset
        rows = json.load(open({str(rows_path)!r}))
        build_clr_dataset(rows, {languages!r}, LoggingTranslator({str(log)!r}, kill_after=40),
                          seed=1, cache_dir={str(cache_dir)!r}, batch_size=10, show_progress_bar=False)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-c", runner], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first_run = [tuple(json.loads(line)) for line in log.read_text(encoding="utf-8").splitlines()]
    # Killed at the first translator call after 40 texts (batches are per language, so possibly a few more).
    assert 40 <= len(first_run) < 50
    with TranslationCache(cache_dir) as cache:
        assert len(cache) == len(first_run)  # every finished batch survived the SIGKILL

    sys.path.insert(0, str(tmp_path))
    try:
        from crashing_translator import LoggingTranslator
    finally:
        sys.path.remove(str(tmp_path))
    translator = LoggingTranslator(str(log))
    dataset, report = build_clr_dataset(
        rows, languages, translator, seed=1, cache_dir=cache_dir, batch_size=10, show_progress_bar=False
    )
    calls = [tuple(json.loads(line)) for line in log.read_text(encoding="utf-8").splitlines()]
    second_run = calls[len(first_run) :]

    assigned = assign_languages(len(rows), seed=1, languages=languages)
    needed = {(lang, row["query"]) for lang, row in zip(assigned, rows) if lang != "en"}
    assert len(calls) == len(set(calls)) == len(needed)  # nothing translated twice across the crash
    assert set(calls) == needed
    assert report.cache_hits == len(first_run)
    assert report.translated == len(second_run) == len(needed) - len(first_run) > 0
    assert report.cache_misses == len(second_run)

    # The resumed build equals a clean build without any cache.
    clean, _ = build_clr_dataset(rows, languages, LoggingTranslator(str(tmp_path / "other.log")), seed=1,
                                 show_progress_bar=False)  # fmt: skip
    assert dataset.to_list() == clean.to_list()
    for row in dataset:
        expected = (
            row["source_query"]
            if row["language"] == "en"
            else f"{row['language'].upper()}: " + row["source_query"].upper()
        )
        assert row["query"] == expected


def test_cache_key_separates_model_prompt_and_language(tmp_path):
    cache = TranslationCache(tmp_path / "c")
    cache.put_many([("hello", "de", "hallo"), ("hello", "fr", "bonjour")], model="m1", prompt="p1")
    assert cache.get("hello", "de", "m1", "p1") == "hallo"
    assert cache.get("hello", "fr", "m1", "p1") == "bonjour"
    assert cache.get("hello", "de", "m2", "p1") is None
    assert cache.get("hello", "de", "m1", "p2") is None
    assert cache.stats() == {"hits": 2, "misses": 2, "writes": 2, "entries": 2}
    cache.close()
    reopened = TranslationCache(tmp_path / "c" / "translations.sqlite")
    assert reopened.get("hello", "de", "m1", "p1") == "hallo"


def test_builder_rejects_and_reports_bad_translations():
    class Scripted(Translator):
        """Returns canned outputs keyed by query; one per rejection reason."""

        model_name = "scripted"
        outputs = {
            "q ok": "Frage gut",
            "q same": "q same",
            "q empty": "",
            "q echo": "Translate the following search query into German: Frage",
            "q script": "Вопрос",
        }

        def translate(self, texts, language, ids=None):
            self.num_translated += len(texts)
            return [self.outputs[t] for t in texts]

    rows = [{"id": str(i), "query": q, "positive": "doc", "negatives": "neg"} for i, q in enumerate(Scripted.outputs)]
    dataset, report = build_clr_dataset(rows, ["de"], Scripted(), show_progress_bar=False)
    assert dataset.to_list() == [
        {"id": "0", "query": "Frage gut", "positive": "doc", "negatives": ["neg"], "language": "de",
         "source_query": "q ok"}
    ]  # fmt: skip
    assert report.rejected == {"identical": 1, "empty": 1, "prompt_echo": 1, "script": 1}
    assert report.rejected_by_language == {"de": 4}
    assert report.kept == {"de": 1} and report.num_output_rows == 1
    assert "4 rejected" in report.summary()


def test_builder_rejects_bad_source_rows():
    translator = ParallelCorpusTranslator({"de": {}})
    with pytest.raises(ValueError, match="source row 1 has no text in column 'positive'"):
        build_clr_dataset([{"query": "a", "positive": "b"}, {"query": "c", "positive": " "}], ["de"], translator)
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        build_clr_dataset([{"id": "x", "query": "a", "positive": "b"}] * 2, ["de"], translator)
