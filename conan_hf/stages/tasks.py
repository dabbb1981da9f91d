"""Stage-4 tasks: their configuration (:class:`TaskConfig`), their rows read through the data layer, and the
memory-mapped Arrow tables of rows and candidate negatives that stage 4 trains from and builds its
:class:`~conan_hf.dhnm.NegativePool` over."""

from __future__ import annotations

import dataclasses
import os
import random
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conan_hf.data.sources import iter_sources, row_text
from conan_hf.errors import DEFAULT_SCORE_RANGE, DataError, check_score_range, location_of, score_range_of

TASK_TYPES = ("retrieval", "clr", "classification", "sts")
#: Paper App. A: batch size 4 for retrieval (with 7 hard negatives each), 32 for STS. Classification rows carry as
#: many texts as retrieval rows, so they get the retrieval size.
DEFAULT_BATCH_SIZES = {"retrieval": 4, "clr": 4, "classification": 4, "sts": 32}
DEMO_PROMPTS = {
    "retrieval": "Given a question, retrieve passages that answer it",
    "clr": "Given an English sentence, retrieve its Chinese translation",
    "classification": "Classify the activity described in the sentence",
    "sts": "Retrieve semantically similar text",
}


@dataclasses.dataclass
class TaskConfig:
    """One task of stage 4.

    Args:
        name: the task's name (also its prompt name in the saved model).
        type: ``retrieval``, ``clr``, ``classification`` or ``sts``.
        data: sources (see :mod:`conan_hf.data.sources`). Columns: ``query, positive[, negatives]`` (retrieval, clr; a
            ``negatives`` list or ``negative``/``negative_*`` columns, hardest first); ``text, positive[, negatives]``
            or ``text, label`` (classification: the other labels become the negatives); ``sentence1, sentence2,
            score`` (sts).
        batch_size: per-device batch size of this task (default: 4, or 32 for sts).
        prompt: instruction for the query side, formatted as ``Instruct: {prompt}\\nQuery:\\n`` (a sentence-transformers
            prompt, left out of mean pooling); ``None``: no prompt.
        score_range: sts only: the scale of the gold scores, ``[low, high]`` (default ``[0, 5]``, STS-B's); a row
            whose score is outside it is an error naming its file:line (e.g. ``score_range: [1, 5]`` for SICK).
    """

    name: str
    type: str
    data: Any = dataclasses.field(default_factory=lambda: ["demo"])
    batch_size: int | None = None
    prompt: str | None = None
    score_range: list | None = None

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type must be one of {TASK_TYPES}, got {self.type!r}")
        self.score_range = score_range_of(DEFAULT_SCORE_RANGE if self.score_range is None else self.score_range,
                                          f"task {self.name!r}")
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH_SIZES[self.type]


def _demo_tasks() -> list[dict[str, Any]]:
    return [{"name": t, "type": t, "data": ["demo"], "batch_size": DEFAULT_BATCH_SIZES[t], "prompt": DEMO_PROMPTS[t]}
            for t in TASK_TYPES]


def _negatives(row: dict[str, Any], what: str = "stage 4 data") -> list[str]:
    """A row's ranked negative texts: a ``negatives`` list, else ``negative`` / ``negative_*`` columns in order.

    Empty cells (``None``, ``""``) mean "no negative there" (rows of a table can have fewer); anything else that is
    not a string is an error naming the row's file and line.
    """
    if row.get("negatives") is not None and not isinstance(row["negatives"], (list, tuple)):
        raise DataError(f"{what}: column 'negatives' must be a list of texts, got {type(row['negatives']).__name__}",
                        where=location_of(row), hint="write a JSON list, or use negative_1, negative_2, ... columns")
    if isinstance(row.get("negatives"), (list, tuple)):
        values = list(row["negatives"])
    else:
        keys = sorted((k for k in row if k == "negative" or k.startswith("negative_")),
                      key=lambda k: (k != "negative", int(k.split("_")[1]) if k.split("_")[-1].isdigit() else 0))
        values = [row[k] for k in keys]
    for value in values:
        if value is not None and not isinstance(value, str):
            raise DataError(f"{what}: a negative must be a text, got {type(value).__name__} {value!r}",
                            where=location_of(row), hint="write it as a string in the data file")
    return [v for v in values if v not in (None, "")]


def _task_rows(task: TaskConfig, demo_fn: Any, required: list[str], what: str, text: list[str],
               numeric: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """A task's checked rows (each knows its file:line in ``_location``), read lazily one at a time through the data
    layer (:func:`conan_hf.data.sources.iter_sources`): no list of the task's rows is built, and rows may differ in
    their optional columns (``negatives`` on some rows only). The one place stage 4 reads its sources."""
    yield from iter_sources(task.data, demo_fn, required, numeric=numeric, what=what, text=text)


def iter_task_examples(task: TaskConfig, seed: int = 0) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """A task's examples in its loss's column order, each with its ranked candidate negatives (``[]`` for sts).

    Examples are yielded one at a time, so that :func:`write_task_table` holds only a batch of them in Python.
    """
    from conan_hf import demo

    what = f"stage 4 task {task.name!r} ({task.type})"
    if task.type == "sts":
        rows = _task_rows(task, demo.demo_sts, ["sentence1", "sentence2", "score"], what,
                          ["sentence1", "sentence2"], numeric=("score",))
        for r in rows:
            check_score_range(r["score"], task.score_range, location_of(r, what),
                              f"score_range: [LOW, HIGH] in task {task.name!r}")
            yield {"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": r["score"]}, []
        return
    if task.type == "classification":
        # Two passes over the rows (the distinct labels first): a list for now, see _task_rows.
        rows = list(_task_rows(task, demo.demo_classification, ["text"], what, ["text", "positive"]))
        labelled = bool(rows) and "positive" not in rows[0]
        # Every row, not only the first, needs its label text. With labels, the label text is embedded as the
        # positive: a label id (a number) would be trained as the text "3".
        labels = sorted({row_text(r, "label", what) for r in rows}) if labelled else []
        rng = random.Random(seed)
        for r in rows:
            if labelled:  # the other labels, shuffled per row in row order (as a fixed function of the seed)
                others = [label for label in labels if label != r["label"]]
                rng.shuffle(others)
                yield {"anchor": r["text"], "positive": r["label"]}, others
            else:
                yield {"anchor": r["text"], "positive": row_text(r, "positive", what)}, _negatives(r, what)
        return
    demo_fn = demo.demo_retrieval if task.type == "retrieval" else demo.demo_clr
    for r in _task_rows(task, demo_fn, ["query", "positive"], what, ["query", "positive"]):
        yield {"anchor": r["query"], "positive": r["positive"]}, _negatives(r, what)


def task_rows(task: TaskConfig, seed: int = 0) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Training rows of a task in its loss's column order, and (for InfoNCE tasks) each row's candidate negatives,
    as Python lists (small data and tests; :func:`write_task_table` is what the stage uses)."""
    rows, candidates = [], []
    for i, (example, negatives) in enumerate(iter_task_examples(task, seed)):
        rows.append(example if task.type == "sts" else {"id": f"{task.name}/{i}", **example})
        candidates.append(negatives)
    return rows, candidates if task.type != "sts" else []


@dataclass
class TaskTable:
    """A task's training rows as a memory-mapped Arrow table, and for pool tasks its candidate negatives.

    ``dataset`` has the loss's columns (``id, anchor, positive`` for pool tasks: ``id`` is the example's row in the
    stage's :class:`~conan_hf.dhnm.NegativePool`; ``sentence1, sentence2, score`` for sts). The candidates are either
    ``texts`` written in row order (row ``i``'s ``pool_sizes[i]`` candidates follow row ``i - 1``'s) or, for mined
    pools, ``candidate_ids`` into ``texts``.
    """

    dataset: Any
    texts: Any = None
    pool_sizes: np.ndarray | None = None
    candidate_ids: np.ndarray | None = None

    @property
    def width(self) -> int:
        if self.candidate_ids is not None:
            return int(self.candidate_ids.shape[1])
        return int(self.pool_sizes.max(initial=0)) if self.pool_sizes is not None else 0

    def candidate_block(self, start: int, stop: int, text_starts: np.ndarray | None) -> np.ndarray:
        """``candidate_ids`` of rows ``start:stop`` (rows of ``texts``, ``-1`` padded to :attr:`width`)."""
        if self.candidate_ids is not None:
            return np.asarray(self.candidate_ids[start:stop], dtype=np.int64)
        sizes = self.pool_sizes[start:stop].astype(np.int64)
        ranks = np.arange(self.width, dtype=np.int64)[None, :]
        return np.where(ranks < sizes[:, None], text_starts[start:stop, None] + ranks, -1)


_TABLE_BATCH_ROWS = 8192  # rows buffered in Python before they are written to the Arrow file


def write_task_table(task: TaskConfig, examples: Iterable[tuple[dict[str, Any], list[str]]], folder: Path,
                     first_id: int = 0) -> TaskTable:
    """Write a task's examples into memory-mapped Arrow files in ``folder`` (batch by batch, bounded memory).

    Pool tasks get ``id`` = ``first_id`` + row index (the row in the stage's pool) and a text table of their
    candidates in row order (``candidates.arrow``, column ``text``; no per-row Python objects are kept, only the
    ``int32`` candidate count of each row).
    """
    import pyarrow as pa
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    if task.type == "sts":
        schema = pa.schema([("sentence1", pa.large_string()), ("sentence2", pa.large_string()),
                            ("score", pa.float64())])
    else:
        schema = pa.schema([("id", pa.int64()), ("anchor", pa.large_string()), ("positive", pa.large_string())])
    text_schema = pa.schema([("text", pa.large_string())])
    rows_path, texts_path = folder / "rows.arrow", folder / "candidates.arrow"
    partial = [path.with_name(f".{path.name}.partial-{os.getpid()}") for path in (rows_path, texts_path)]
    sizes = array("i")
    try:
        _write_table_files(task, examples, partial, schema, text_schema, first_id, sizes)
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        raise
    for path, final in zip(partial, (rows_path, texts_path)):
        os.replace(path, final)
    dataset = Dataset.from_file(str(rows_path))
    if task.type == "sts":
        return TaskTable(dataset)
    return TaskTable(dataset, texts=Dataset.from_file(str(texts_path)), pool_sizes=np.frombuffer(sizes, np.int32))


def _write_table_files(task: TaskConfig, examples: Iterable[tuple[dict[str, Any], list[str]]], paths: list[Path],
                       schema: Any, text_schema: Any, first_id: int, sizes: array) -> None:
    """:func:`write_task_table`'s writing: the rows and candidate texts into the Arrow stream files ``paths``, the
    candidate count of each pool row appended to ``sizes``."""
    import pyarrow as pa

    with pa.OSFile(str(paths[0]), "wb") as rows_sink, pa.ipc.new_stream(rows_sink, schema) as rows_writer, \
            pa.OSFile(str(paths[1]), "wb") as texts_sink, pa.ipc.new_stream(texts_sink, text_schema) as texts_writer:
        columns: dict[str, list] = {name: [] for name in schema.names}
        texts: list[str] = []

        def flush() -> None:
            if columns[schema.names[0]]:
                rows_writer.write_batch(pa.record_batch([pa.array(columns[n], type=schema.field(n).type)
                                                         for n in schema.names], schema=schema))
                for values in columns.values():
                    values.clear()
            if texts:
                texts_writer.write_batch(pa.record_batch([pa.array(texts, type=pa.large_string())],
                                                         schema=text_schema))
                texts.clear()

        for i, (example, negatives) in enumerate(examples):
            if task.type != "sts":
                columns["id"].append(first_id + i)
                texts.extend(negatives)
                sizes.append(len(negatives))
            for name, value in example.items():
                columns[name].append(value)
            if len(columns[schema.names[0]]) >= _TABLE_BATCH_ROWS:
                flush()
        flush()


def build_negative_pool(tables: list[TaskTable], k: int, folder: Path) -> Any:
    """One :class:`~conan_hf.dhnm.NegativePool` over the pool tasks' tables, keyed by row index (the ``id``
    column), its candidate ids in a memory-mapped ``candidate_ids.npy`` and its texts the tasks' memory-mapped
    candidate tables (zero-copy chunks of one Arrow array)."""
    import pyarrow as pa

    from conan_hf.dhnm import NegativePool

    width = max(table.width for table in tables)
    total = sum(len(table.dataset) for table in tables)
    if width:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "candidate_ids.npy"
        candidate_ids = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.int64, shape=(total, width))
    else:
        candidate_ids = np.zeros((total, 0), dtype=np.int64)
    chunks, row0, text0 = [], 0, 0
    for table in tables:
        if isinstance(table.texts, pa.Array):  # a mined pool's in-memory table
            text_column = pa.chunked_array([table.texts])
        elif isinstance(table.texts, pa.ChunkedArray):
            text_column = table.texts
        else:  # a memory-mapped Dataset written by write_task_table
            text_column = table.texts.data.column("text")
        chunks += [chunk.cast(pa.large_string()) for chunk in text_column.chunks]
        text_starts = None
        if table.candidate_ids is None:
            text_starts = np.zeros(len(table.dataset), dtype=np.int64)
            np.cumsum(table.pool_sizes[:-1], out=text_starts[1:])
        n = len(table.dataset)
        for start in range(0, n, 1 << 18):
            stop = min(n, start + (1 << 18))
            block = table.candidate_block(start, stop, text_starts)
            candidate_ids[row0 + start:row0 + stop, :block.shape[1]] = np.where(block >= 0, block + text0, -1)
            candidate_ids[row0 + start:row0 + stop, block.shape[1]:] = -1
        row0 += n
        text0 += len(text_column)
    if width:
        candidate_ids.flush()
        del candidate_ids
        candidate_ids = np.load(str(folder / "candidate_ids.npy"), mmap_mode="r")
    return NegativePool.from_ids(None, candidate_ids, pa.chunked_array(chunks, type=pa.large_string()), k=k)
