"""The data layer (conan_hf/data/sources.py): memory-mapped and streamed reading give the same rows, ranks split a
stream exactly, ``limit`` stops reading early, formats (glob, .gz, Parquet, JSON lines in .json) and file:line
errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conan_hf.data import sources
from conan_hf.data.sources import LOCATION, load_sources, read_sources
from conan_hf.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [{"q": f"query {i} é", "p": f"passage {i}", "extra": i} for i in range(start, start + n)]


def _naive_rows(path: Path) -> list[tuple[str, str, str]]:
    """(query, positive, file:line) computed directly from the file, the reference for every mode."""
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            out.append((record["q"], record["p"], f"{path}:{line_no}"))
    return out


def _triples(rows) -> list[tuple[str, str, str]]:
    return [(r["query"], r["positive"], r[LOCATION]) for r in rows]


SPEC = {"columns": {"query": "q", "positive": "p"}}


def test_memory_mapped_rows_equal_the_file(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(50))
    data = load_sources([{"path": str(path), **SPEC}], required=["query", "positive"], text=["query", "positive"],
                        cache_dir=str(tmp_path / "cache"))
    assert _triples(data) == _naive_rows(path)
    # memory-mapped: the table lives in an Arrow cache file, not in Python objects
    assert data.cache_files and Path(data.cache_files[0]["filename"]).is_file()
    listed = read_sources([{"path": str(path), **SPEC}], None, ["query", "positive"])
    assert [(r["query"], r["positive"], r.location) for r in listed] == _naive_rows(path)


def test_streamed_byte_ranges_equal_memory_mapped(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    # blank lines and multi-byte characters exercise the byte-range boundaries and the line numbering
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" + ("\n" if i % 7 == 0 else "")
                   for i, r in enumerate(_pairs(300)))
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "SPLIT_BYTES", 100)  # force splitting a small file
    stream = load_sources([{"path": str(path), **SPEC}], required=["query", "positive"], streaming=True)
    assert stream.n_shards == 4  # one process: 4 line-aligned byte ranges
    assert _triples(stream) == _naive_rows(path)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_every_row_exactly_once(tmp_path, monkeypatch, world_size):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(1000))
    monkeypatch.setattr(sources, "SPLIT_BYTES", 1000)
    seen = []
    for rank in range(world_size):
        part = _triples(load_sources([{"path": str(path), **SPEC}], required=["query"], streaming=True,
                                     rank=rank, world_size=world_size))
        # each rank reads about 1/world_size of the rows (its byte ranges), none reads all
        assert abs(len(part) - 1000 / world_size) <= 1000 * 0.1, len(part)
        seen.extend(part)
    assert sorted(seen) == sorted(_naive_rows(path))


def test_limit_stops_reading_early(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in _pairs(4)] + ["{not json"] + [json.dumps(r) for r in _pairs(3, 4)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = [{"path": str(path), "limit": 3, **SPEC}]
    assert len(load_sources(source, required=["query"], cache_dir=str(tmp_path / "c"))) == 3
    assert len(list(load_sources(source, required=["query"], streaming=True))) == 3
    # without the limit the malformed line 5 is reached and named
    with pytest.raises(DataError, match=rf"{path}:5: invalid JSON"):
        load_sources([{"path": str(path), **SPEC}], required=["query"], cache_dir=str(tmp_path / "c"))


def test_bad_row_in_a_later_byte_range_names_its_true_line(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    rows = _pairs(200)
    rows[150]["q"] = 12  # a number where a text must be
    _write_jsonl(path, rows)
    monkeypatch.setattr(sources, "SPLIT_BYTES", 100)
    for streaming in (False, True):
        with pytest.raises(DataError, match=rf"{path}:151: stage 3 data: column 'query' must be a text"):
            list(load_sources([{"path": str(path), **SPEC}], required=["query"], text=["query"], what="stage 3 data",
                              streaming=streaming, cache_dir=str(tmp_path / "c")))


def test_glob_gzip_parquet_and_json_lines_in_dot_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _pairs(30)
    (tmp_path / "shards").mkdir()
    with gzip.open(tmp_path / "shards" / "a.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:10])
    _write_jsonl(tmp_path / "shards" / "b.json", rows[10:20])  # JSON lines named .json
    pq.write_table(pa.Table.from_pylist(rows[20:]), tmp_path / "shards" / "c.parquet")
    source = [{"path": str(tmp_path / "shards" / "*"), **SPEC}]
    expected = [(r["q"], r["p"]) for r in rows]
    for streaming in (False, True):
        data = load_sources(source, required=["query", "positive"], streaming=streaming,
                            cache_dir=str(tmp_path / "c"))
        got = list(data)
        assert [(r["query"], r["positive"]) for r in got] == expected
        assert got[0][LOCATION] == f"{tmp_path / 'shards' / 'a.jsonl.gz'}:1"
        assert got[10][LOCATION] == f"{tmp_path / 'shards' / 'b.json'}:1"
        assert got[20][LOCATION] == f"{tmp_path / 'shards' / 'c.parquet'} row 1"
    with pytest.raises(DataError, match="matches no file"):
        load_sources([str(tmp_path / "none" / "*.jsonl")], required=["query"])


def test_edited_file_is_read_again_and_sources_concatenate(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", _pairs(5))
    other = _write_jsonl(tmp_path / "b.jsonl", [{"q": "x", "p": "y"}])  # no "extra" column
    cache = str(tmp_path / "cache")
    first = load_sources([{"path": str(path), **SPEC}], required=["query"], cache_dir=cache)
    assert first[0]["query"] == "query 0 é"
    _write_jsonl(path, _pairs(6, start=100))
    second = load_sources([{"path": str(path), **SPEC}], required=["query"], cache_dir=cache)
    assert [r["query"] for r in second] == [f"query {i} é" for i in range(100, 106)]
    both = load_sources([{"path": str(path), **SPEC}, {"path": str(other), **SPEC}, "demo"],
                        demo=lambda: [{"query": "dq", "positive": "dp", "score": 1.0}],
                        required=["query", "positive"], keep=["query", "positive", "score"], cache_dir=cache)
    assert [r["query"] for r in both][-2:] == ["x", "dq"]
    assert both[-1][LOCATION] == "demo row 1" and both[0]["score"] is None and both[-1]["score"] == 1.0


def test_empty_and_all_skipped_sources_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{no\n[1]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: data: no rows \(the source is empty\)"):
        load_sources([str(empty)], required=["query"], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"bad\.jsonl: data: no rows \(all 2 rows were bad and skipped\)"):
        load_sources([{"path": str(bad), "on_error": "skip"}], required=["query"], cache_dir=str(tmp_path / "c"))


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from conan_hf.data import sources
    from conan_hf.data.sources import LOCATION, load_sources
    dist.init_process_group("gloo")
    sources.SPLIT_BYTES = 1000
    rows = [r[LOCATION] for r in load_sources([{"path": sys.argv[1], "columns": {"query": "q"}}], required=["query"],
                                              streaming=True)]
    mapped = load_sources([{"path": sys.argv[1], "columns": {"query": "q"}}], required=["query"],
                          cache_dir=sys.argv[3])
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump({"stream": rows, "mapped": len(mapped)}, handle)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_split_a_stream(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(2000))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    str(script), str(path), str(tmp_path), str(tmp_path / "cache")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text())["stream"] for r in (0, 1)]
    assert all(700 <= len(p) <= 1300 for p in parts), [len(p) for p in parts]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(loc for *_, loc in _naive_rows(path))
    # the memory-mapped form: built once per node, every rank sees all rows
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["mapped"] for r in (0, 1)] == [2000, 2000]


def test_rows_with_fewer_columns_get_none_and_a_late_new_column_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{"q": "a", "p": "b", "negatives": ["n"]}, {"q": "c", "p": "d"}])
    data = load_sources([str(path)], required=["q", "p"], cache_dir=str(tmp_path / "c"))
    assert [r["negatives"] for r in data] == [["n"], None]
    late = _write_jsonl(tmp_path / "late.jsonl", [{"q": "c", "p": "d"}, {"q": "a", "p": "b", "negatives": ["n"]}])
    for streaming in (False, True):
        with pytest.raises(DataError, match=rf"{late}:2: data: column\(s\) \['negatives'\] first appear here"):
            list(load_sources([str(late)], required=["q"], streaming=streaming, cache_dir=str(tmp_path / "c")))
