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
    for option in ("--batch-size", "--prefetch-batches", "--rejected", "--generate-batch-size"):  # streaming options
        assert option in result.stdout
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
        from crashing_translator import LoggingTranslator
        from conan_hf.data.clr import write_clr_dataset
        rows = json.load(open({str(rows_path)!r}))
        write_clr_dataset(rows, {str(tmp_path / "clr.jsonl")!r}, {languages!r},
                          LoggingTranslator({str(log)!r}, kill_after=40), seed=1, cache_dir={str(cache_dir)!r},
                          batch_size=10, prefetch_batches=0, show_progress_bar=False)
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
    # No output under the final name; the batches written before the kill are complete lines of the partial file.
    assert not (tmp_path / "clr.jsonl").exists()
    partial = (tmp_path / "clr.jsonl.partial").read_text(encoding="utf-8")
    assert partial.endswith("\n") and len(partial.splitlines()) > 0
    assert all(json.loads(line)["id"].startswith("r") for line in partial.splitlines())

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


# ------------------------------------------------------------------------------------------------------ streaming


class _Uppercase(Translator):
    """Deterministic and cheap: ``"<LANG>: <TEXT UPPERCASED>"``; texts containing "7" fail (``None``), texts containing
    "3" come back unchanged (rejected as identical). Logs every call's size, and what the output file held then."""

    model_name = "upper-v2"

    def __init__(self, watch=None):
        super().__init__()
        self.calls, self.watch, self.lines_seen = [], watch, []

    def translate(self, texts, language, ids=None):
        self.calls.append((language, list(texts)))
        if self.watch is not None:
            self.lines_seen.append(len(self.watch.read_text().splitlines()) if self.watch.exists() else 0)
        self.num_translated += len(texts)
        return [None if "7" in t else (t if "3" in t else f"{language.upper()}: {t.upper()}") for t in texts]


def _reference_build(rows, languages, seed, translate):
    """What the builder must produce, computed naively over the whole list: the assignment of `assign_languages`,
    one translation per row, the validator's decision, records in source order."""
    from conan_hf.data.validate import TranslationValidator

    validator = TranslationValidator(prompt_fragments=[])
    assignment = assign_languages(len(rows), seed=seed, languages=languages)
    has_negatives = any("negatives" in row for row in rows)
    records, rejected = [], []
    for index, (row, language) in enumerate(zip(rows, assignment)):
        row_id = str(row.get("id", index))
        output = row["query"] if language == "en" else translate(row["query"], language)
        if language != "en":
            reason = validator.check(row["query"], output, language)
            if reason is not None:
                rejected.append({"id": row_id, "language": language, "source": row["query"], "output": output,
                                 "reason": reason})
                continue
        record = {"id": row_id, "query": output, "positive": row["positive"]}
        if has_negatives:
            negatives = row.get("negatives") or []
            record["negatives"] = [negatives] if isinstance(negatives, str) else list(negatives)
        record["language"] = language
        record["source_query"] = row["query"]
        record.update({k: v for k, v in row.items() if k not in ("id", "query", "positive", "negatives")})
        records.append(record)
    return records, rejected


def _source_rows(n, seed=0):
    import random

    rng = random.Random(seed)  # ~1/3 of the query texts recur in other rows (and other batches)
    return [{"id": f"r{i}", "query": f"query {rng.randint(0, 2 * n // 3)}", "positive": f"passage {i}",
             "negatives": f"neg {i}" if i % 3 else [f"neg {i}a", f"neg {i}b"], "score": i % 5}
            for i in range(n)]  # fmt: skip


def _jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.mark.parametrize(("batch_size", "prefetch"), [(1, 0), (7, 2), (64, 4), (10_000, 1)])
def test_streamed_output_equals_the_whole_list_reference(tmp_path, batch_size, prefetch):
    from conan_hf.data.clr import write_clr_dataset

    rows = _source_rows(300)
    mix = {"en": 2, "de": 1, "fr": 1, "it": 3}
    expected, expected_rejects = _reference_build(rows, mix, 9, lambda t, lang: _Uppercase().translate([t], lang)[0])
    assert expected and expected_rejects  # both paths are exercised

    out = tmp_path / "clr.jsonl"
    translator = _Uppercase()
    report = write_clr_dataset(rows, out, mix, translator, seed=9, batch_size=batch_size, prefetch_batches=prefetch,
                               show_progress_bar=False)  # fmt: skip
    assert out.read_text(encoding="utf-8") == _jsonl(expected)  # byte-identical file
    assert (tmp_path / "clr.rejected.jsonl").read_text(encoding="utf-8") == _jsonl(expected_rejects)
    assert not list(tmp_path.glob("*.partial"))
    assert report.num_source_rows == 300 == report.num_output_rows + report.num_rejected
    assert report.rejected == dict(Counter(r["reason"] for r in expected_rejects))
    assert report.kept == {lang: sum(r["language"] == lang for r in expected) for lang in mix}
    # Each distinct (text, language) pair is translated once per run, even across batches and without a cache.
    pairs = {(r["language"], r["source_query"]) for r in expected if r["language"] != "en"}
    pairs |= {(r["language"], r["source"]) for r in expected_rejects}
    sent = [(language, text) for language, texts in translator.calls for text in texts]
    assert len(sent) == len(set(sent)) == len(pairs) == report.translated

    # The in-memory builder and a one-shot generator source (spooled) give the same rows.
    dataset, memory_report = build_clr_dataset((row for row in rows), mix, _Uppercase(), seed=9,
                                               batch_size=batch_size, show_progress_bar=False)  # fmt: skip
    assert dataset.to_list() == expected and memory_report.rejected_examples == expected_rejects


def test_assignment_is_the_list_shuffle_in_one_byte_per_row():
    import random

    from conan_hf.data.clr import _shuffled_language_indices

    for n, seed, mix in ((0, 1, TABLE7), (1, 2, TABLE7), (10_007, 3, TABLE7), (5_000, 4, {"de": 1, "zh": 2})):
        counts = language_counts(n, mix)
        naive = [code for code, count in counts.items() for _ in range(count)]
        random.Random(seed).shuffle(naive)  # the list-based shuffle, as before streaming
        codes, indices = _shuffled_language_indices(n, seed, mix)
        assert indices.itemsize == 1
        assert [codes[i] for i in indices] == naive == assign_languages(n, seed, mix)


def test_output_is_appended_batch_by_batch_and_renamed_when_complete(tmp_path):
    from conan_hf.data.clr import write_clr_dataset

    out = tmp_path / "clr.jsonl"
    rows = [{"id": str(i), "query": f"question {i}", "positive": f"p {i}"} for i in range(60)]
    translator = _Uppercase(watch=tmp_path / "clr.jsonl.partial")
    write_clr_dataset(rows, out, ["de"], translator, seed=0, batch_size=10, prefetch_batches=0,
                      show_progress_bar=False)  # fmt: skip
    # One call per batch; when batch k is translated, the k earlier batches (10 rows each) are already in the file.
    assert [len(texts) for _, texts in translator.calls] == [10] * 6
    kept_before = [sum(1 for i in range(10 * k) if "7" not in str(i) and "3" not in str(i)) for k in range(6)]
    assert translator.lines_seen == kept_before
    assert len(out.read_text().splitlines()) == sum(1 for i in range(60) if "7" not in str(i) and "3" not in str(i))


class _LazyRows:
    """`n` rows made on the fly each time it is iterated (nothing held), like a streamed dataset."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield {"id": f"row-{i}", "query": f"query text number {i}", "positive": f"passage number {i} " * 8,
                   "negatives": [f"negative {i} a " * 8, f"negative {i} b " * 8]}  # fmt: skip


class _Prefix(Translator):
    model_name = "prefix"
    cacheable = False

    def translate(self, texts, language, ids=None):
        self.num_translated += len(texts)
        return [f"{language}> {t}" for t in texts]


def test_builder_memory_does_not_grow_with_the_rows(tmp_path):
    """Peak Python memory of a 2k-row and a 20k-row build: what grows is ~1 byte/row (the language assignment) plus
    8 bytes/row for a moment (id hashes), not the rows (~500 B each here) nor the outputs."""
    import tracemalloc

    from conan_hf.data.clr import write_clr_dataset
    from conan_hf.data.validate import TranslationValidator

    peaks = {}
    for n in (2_000, 20_000):
        tracemalloc.start()
        # The script check (the bulk of the time under tracemalloc) is not what this test is about.
        report = write_clr_dataset(_LazyRows(n), tmp_path / f"out{n}.jsonl", ["de", "fr"], _Prefix(), seed=0,
                                   validator=TranslationValidator(check_script=False), batch_size=256,
                                   show_progress_bar=False)  # fmt: skip
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report.num_output_rows == n
        assert len((tmp_path / f"out{n}.jsonl").read_text().splitlines()) == n
    per_row = (peaks[20_000] - peaks[2_000]) / 18_000
    assert per_row < 40, (peaks, per_row)  # holding the rows would be > 500 B per row


def test_cli_streams_with_batch_size_and_names_bad_lines(tmp_path, capsys):
    good = [{"id": f"q{i}", "query": f"question {i}", "positive": f"passage {i}"} for i in range(40)]
    source = tmp_path / "rows.jsonl"
    source.write_text(_jsonl(good), encoding="utf-8")
    # A parallel side in MKQA format: question i's German text.
    mkqa = tmp_path / "mkqa.jsonl"
    mkqa.write_text(_jsonl([{"example_id": f"q{i}", "queries": {"de": f"Frage {i}"}} for i in range(40)]))
    out = tmp_path / "out" / "clr.jsonl"
    args = [str(source), "-o", str(out), "--backend", "parallel", "--parallel-format", "mkqa", "--parallel",
            str(mkqa), "--languages", "en:1,de:1", "--seed", "3", "--no-progress"]  # fmt: skip
    assert main([*args, "--batch-size", "6", "--prefetch-batches", "1"]) == 0
    streamed = out.read_text(encoding="utf-8")
    dataset, _ = build_clr_dataset(good, {"en": 1, "de": 1}, ParallelCorpusTranslator.from_mkqa(mkqa), seed=3,
                                   show_progress_bar=False)  # fmt: skip
    assert streamed == _jsonl(dataset.to_list())  # the batch size changes nothing in the output
    assert main([*args, "--batch_size", "1000"]) == 0 and out.read_text(encoding="utf-8") == streamed
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["num_output_rows"] == 40 and report["rejected_file"] == str(out.with_suffix(".rejected.jsonl"))
    capsys.readouterr()

    # Bad rows stop the build in the first pass, named by file and 1-based line, before any output file exists.
    cases = {
        '{"query": "a", "positive": "b"}\n{"query": "c", "positive": "d"\n': ":2: invalid JSON",
        '{"query": "a", "positive": "b"}\n\n{"query": "  ", "positive": "d"}\n':
            ":3: empty value in column(s) ['query']",
        '{"query": "a", "positive": "b"}\n{"query": 12, "positive": "d"}\n': ":2: has no text in column 'query'",
        '{"id": "x", "query": "a", "positive": "b"}\n{"id": "y", "query": "c", "positive": "d"}\n'
        '{"id": "x", "query": "e", "positive": "f"}\n': ":3: duplicate id 'x'",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text, encoding="utf-8")
        target = tmp_path / "bad-out" / "clr.jsonl"
        with pytest.raises(SystemExit) as exited:
            main([str(bad), "-o", str(target), "--backend", "parallel", "--parallel-format", "mkqa", "--parallel",
                  str(mkqa), "--languages", "de", "--no-progress"])  # fmt: skip
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"conan-clr: error: {bad}{message}" in err, err
        assert not target.parent.exists() or not list(target.parent.iterdir())



def test_builder_takes_the_data_layers_stream(tmp_path):
    """A streamed ``IterableDataset`` of :func:`conan_hf.data.sources.load_sources` (rows carry their place in a
    ``_location`` column) builds the same rows as the file read directly; the location column is not copied."""
    from conan_hf.data.clr import RowStream, write_clr_dataset
    from conan_hf.data.sources import load_sources

    rows = _source_rows(120)
    source = tmp_path / "rows.jsonl"
    source.write_text(_jsonl(rows), encoding="utf-8")
    mix = {"en": 1, "de": 2}
    stream = load_sources(str(source), required=["query", "positive"], streaming=True, rank=0, world_size=1)
    write_clr_dataset(stream, tmp_path / "a.jsonl", mix, _Uppercase(), seed=4, batch_size=16,
                      show_progress_bar=False)  # fmt: skip
    write_clr_dataset(RowStream(source), tmp_path / "b.jsonl", mix, _Uppercase(), seed=4, batch_size=16,
                      show_progress_bar=False)  # fmt: skip
    expected, _ = _reference_build(rows, mix, 4, lambda t, lang: _Uppercase().translate([t], lang)[0])
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text() == _jsonl(expected)

    # The stream's location column names a bad row: the first pass stops at it.
    source.write_text(_jsonl([*rows[:3], {"id": "x", "query": 5, "positive": "p"}]), encoding="utf-8")
    stream = load_sources(str(source), required=["query", "positive"], streaming=True, rank=0, world_size=1)
    with pytest.raises(ValueError, match=rf"{source}:4: "):
        write_clr_dataset(stream, tmp_path / "c.jsonl", mix, _Uppercase(), show_progress_bar=False)
    assert not (tmp_path / "c.jsonl").exists()
