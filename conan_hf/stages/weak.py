"""Stage 3 (paper §3.1-3.2): weakly-supervised embedding training with the soft mask.

    accelerate launch -m conan_hf.stages.weak --config trainers/configs/weak.yaml [--preset tiny]

The stage-2 decoder becomes an embedding model (Transformer → Pooling → Normalize). Training pairs are
(query, passage): the input is the query, the output the positive, and the row's instruction becomes the query's
sentence-transformers *prompt* (``Instruct: {instruction}\nQuery:\n``), left out of mean pooling exactly as in
stage 4 and at inference. Every pair read is trained each epoch: rows are batched by instruction where the data
allows (:func:`instruction_batches`: batches of one instruction, in proportion to the instructions' sizes, so
in-batch negatives come from the same kind of task), and the rest — the instructions' remainders and instructions
with fewer pairs than a batch — in mixed batches, each row with its own prompt and its own prompt length left out of
the pool (:class:`InstructionPromptCollator`, :func:`exclude_row_prompts`). The loss is InfoNCE (eq. 1) with in-batch
negatives. The attention moves from causal to bidirectional along the soft mask (eq. 4): α(t) = t/τ with τ the number
of training steps (App. C's linear schedule), set every step by :class:`conan_hf.training.callbacks.SoftMaskCallback`.
Optionally, pairs a teacher embedder scores below 0.4 are dropped first (the paper used gte-Qwen2-7B-instruct), see
:func:`conan_hf.data.teacher.filter_by_teacher`.

Data (issue 11: no rank holds the pairs as Python objects). The sources are read by
:func:`conan_hf.data.sources.load_sources`:

- by default memory-mapped: parsed once per node into the ``datasets`` cache, converted to pairs in a batched ``map``
  (a bad row names its file and line), grouped by instruction as index selections of that table
  (:func:`instruction_groups`: one ``int32`` per row in memory), filtered by the teacher group by group (each
  group's instruction its prompt; the teacher scores in chunks, see :func:`filter_groups_by_teacher`), batched each
  epoch by :class:`InstructionBatchSampler`;
- with ``streaming: true`` on a source: an ``IterableDataset`` of this rank's share of the files (split across
  ranks), read lazily while training, so ``max_steps`` is required. Grouping by instruction then happens as the
  pairs arrive (:func:`stream_instruction_batches`): each instruction fills its own batch, emitted when full, so
  instructions get batches in proportion to their rows, in stream order rather than shuffled; the rows left at the end
  of the stream make mixed batches. With a teacher the sources are read memory-mapped instead (the filter selects from
  the table).

The stage summary counts the pairs read and the pairs trained (that reached a batch).

Output: ``final_dir``, a SentenceTransformer folder; when α reached 1 its backbone is saved bidirectional (α ≥ 1 is
exactly bidirectional attention), ready for stage 4.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from sentence_transformers.sentence_transformer.modules import Pooling

from conan_hf.errors import DataError, location_of
from conan_hf.sentence import QUERY_PROMPT_FORMAT, excludes_prompt
from conan_hf.data.sources import (
    LOCATION,
    load_sources,
    main_process_first,
    parse_sources,
    progress_bars_on_terminals_only,
    row_text,
    unwrap_data_error,
)
from conan_hf.training.checkpoints import MainProcessSaveMixin, check_stage_input
from conan_hf.training.config import StageConfig, option, override
from conan_hf.training.distributed import print_main
from conan_hf.training.lora import add_lora, merge_lora
from conan_hf.training.models import backbone, describe_attention, load_sentence_model, set_attention_mode
from conan_hf.training.runner import StageRunner

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WeakConfig(StageConfig):
    """Options of stage 3 (the shared ones: :class:`conan_hf.training.config.StageConfig`; App. A: the optimizer
    settings and learning rate of pre-training)."""

    output_dir: str = override(StageConfig, "output_dir", "runs/weak")
    model: str = option("runs/sft/final", help="the stage-2 output folder, or your own decoder (a local folder or Hub "
                        "id of Llama, Qwen2, Qwen3, Mistral, ... - any decoder `conan_hf.apply_soft_mask` supports; "
                        "the stage applies the soft mask), or a SentenceTransformer folder built on one.")
    data: Any = option(help="sources with ``instruction``/``input``/``output`` columns, or ``query``/``positive`` "
                            "columns (an optional ``instruction`` column too).", factory=lambda: ["demo"])
    prompt_format: str = option(QUERY_PROMPT_FORMAT, help="how a row's instruction becomes the query prompt "
                                "(``{instruction}``); rows without an instruction get no prompt. It must end on a "
                                "token boundary (checked at start).")
    pooling: str = option("mean", help="``mean`` or ``lasttoken``.")
    max_seq_length: int = option(512, help="texts are truncated to this many tokens.")
    temperature: float = option(0.05, help="τ of InfoNCE (eq. 1).")
    soft_mask_schedule: str = option("linear", help="``linear`` (α = t/τ, the paper), ``accelerating`` or "
                                                    "``decelerating`` (App. C).")
    soft_mask_steps: int | None = option(None, help="τ of the schedule; ``None`` = the number of training steps, so "
                                                    "the last step trains at α = 1.")
    soft_mask_length: int | str = option("sequence", help="l of eq.4: ``sequence`` (each text's real length, the "
                                         "default: a text's mask does not depend on its batch), ``max_seq_length`` "
                                         "(this stage's ``max_seq_length``, the paper's \"training sequence "
                                         "length\") or a fixed int; see :mod:`conan_hf.soft_mask`.")
    teacher: str | None = option(None, help="a SentenceTransformer name/folder (the paper: gte-Qwen2-7B-instruct); "
                                            "if set, pairs it scores below ``teacher_threshold`` are dropped.")
    teacher_threshold: float = option(0.4, help="0.4 in the paper.")
    per_device_train_batch_size: int = override(StageConfig, "per_device_train_batch_size", 64)
    lora: dict | None = option(None, help="``None`` (full fine-tuning) or LoRA settings, e.g. ``{r: 16, lora_alpha: "
                                          "32}``: adapters train under the soft mask and are merged before saving "
                                          "(Table 6).")


class WeakTrainer(MainProcessSaveMixin, SentenceTransformerTrainer):
    """sentence-transformers' trainer, saving from the main process only (see `MainProcessSaveMixin`), batching a
    memory-mapped training set with :class:`InstructionBatchSampler` when given each row's ``instruction_codes``.

    A streamed training set (:func:`stream_instruction_batches`) is already this rank's share of the sources
    (:func:`conan_hf.data.sources.load_sources` splits a stream with ``split_dataset_by_node``), so accelerate must
    not split it again: the stage sets ``dispatch_batches=False`` (no rank reads for the others) and the per-process
    filter accelerate wraps around an iterable dataset is made a passthrough, as transformers does for its rank-aware
    ``BatchRebalanceSampler``.
    """

    def __init__(self, *args, instruction_codes: np.ndarray | None = None, **kwargs):
        self.instruction_codes = instruction_codes
        self.train_dataloader_sampler: InstructionBatchSampler | None = None
        super().__init__(*args, **kwargs)

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        if self.instruction_codes is None or dataset is not self.train_dataset:
            return super().get_batch_sampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        if self.train_dataloader_sampler is None:  # one sampler for the run: its `trained` marks span the epochs
            self.train_dataloader_sampler = InstructionBatchSampler(dataset, batch_size, self.instruction_codes,
                                                                    seed=seed)
        return self.train_dataloader_sampler

    def get_train_dataloader(self):
        from accelerate.data_loader import IterableDatasetShard
        from datasets import IterableDataset

        dataloader = super().get_train_dataloader()
        if isinstance(self.train_dataset, IterableDataset) and self.args.world_size > 1:
            shard = getattr(dataloader, "dataset", None)
            if not isinstance(shard, IterableDatasetShard):
                raise RuntimeError(f"stage 3: expected accelerate to wrap the stream in an IterableDatasetShard, got "
                                   f"{type(shard).__name__}; this rank's stream would be split again")
            shard.num_processes, shard.process_index = 1, 0
        return dataloader


#: What stage 3's messages call its data.
WHAT = "stage 3 (weakly-supervised) data"
#: The columns stage 3 reads from a source (after its column mapping): query/positive, or instruction/input/output.
SOURCE_COLUMNS = ("instruction", "input", "output", "query", "positive")
#: The columns of a pair: the instruction becomes the anchor's prompt.
PAIR_COLUMNS = ("instruction", "anchor", "positive")


def _pair(row: Mapping[str, Any], where: str) -> tuple[str, str, str]:
    """(instruction, anchor, positive) of one row (a missing or ``None`` value is an absent column).

    ``query``/``positive`` when the row has both, else ``input`` → anchor (``""`` if absent: the instruction alone is
    the query) and ``output`` → positive; ``instruction`` is ``""`` for rows without one.
    """
    instruction = row_text(row, "instruction", WHAT, where, optional=True)
    present = {column for column, value in row.items() if value is not None and column != LOCATION}
    if {"query", "positive"} <= present:
        return instruction, row_text(row, "query", WHAT, where), row_text(row, "positive", WHAT, where)
    if not present & {"input", "instruction"} or "output" not in present:
        raise DataError(f"{WHAT}: needs instruction/input/output or query/positive columns, got {sorted(present)}",
                        where=where, hint="map the source's columns with `columns: {query: ..., positive: ...}`")
    return instruction, row_text(row, "input", WHAT, where, optional=True), row_text(row, "output", WHAT, where)


def to_pairs(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """(instruction, anchor, positive) dicts of a list of rows (small data: tests, the demo; the stage itself converts
    its memory-mapped or streamed rows in a batched ``map``, :func:`load_pairs`, with the same rules).

    Texts must be strings; errors name the row's file and line (``row.location``, see :func:`conan_hf.data.sources.
    read_sources`), or its 1-based position for rows that do not carry one.
    """
    pairs = []
    for index, row in enumerate(rows, 1):
        instruction, anchor, positive = _pair(row, location_of(row, f"stage 3 data row {index}"))
        pairs.append({"instruction": instruction, "anchor": anchor, "positive": positive})
    return pairs


def _pair_columns(batch: dict[str, list]) -> dict[str, list[str]]:
    """Batched ``map`` function: source columns (with their ``_location``) → pair columns."""
    out: dict[str, list[str]] = {column: [] for column in PAIR_COLUMNS}
    names = [c for c in batch if c != LOCATION]
    for index, where in enumerate(batch[LOCATION]):
        pair = _pair({c: batch[c][index] for c in names}, where)
        for column, value in zip(PAIR_COLUMNS, pair):
            out[column].append(value)
    return out


def load_pairs(sources: Any, *, streaming: bool | None = None, cache_dir: str | None = None,
               rank: int | None = None, world_size: int | None = None):
    """Stage 3's (instruction, anchor, positive) pairs from its ``data:`` sources.

    Read through :func:`conan_hf.data.sources.load_sources`: a memory-mapped ``Dataset`` (parsed once per node; the
    pair conversion is a batched ``map`` written to the ``datasets`` cache, local rank 0 first) or, when a source says
    ``streaming: true`` (or ``streaming=True``), an ``IterableDataset`` of this rank's share, converted lazily. Every
    row is checked as it is read; errors name its file and 1-based line.
    """
    from conan_hf.demo import demo_instructions

    with progress_bars_on_terminals_only():
        data = load_sources(sources, demo_instructions, required=(), what=WHAT, text=SOURCE_COLUMNS,
                            keep=SOURCE_COLUMNS, streaming=streaming, cache_dir=cache_dir, rank=rank,
                            world_size=world_size)
        return _to_pairs_dataset(data)


def _to_pairs_dataset(data):
    """The rows of ``load_sources`` as pairs (:func:`_pair_columns` in a batched ``map``)."""
    from datasets import Dataset, Features, Value

    features = Features({column: Value("string") for column in PAIR_COLUMNS})
    if isinstance(data, Dataset):
        with main_process_first():
            try:
                return data.map(_pair_columns, batched=True, remove_columns=data.column_names, features=features,
                                desc="stage 3 pairs")
            except Exception as error:  # noqa: BLE001 - datasets may wrap the DataError raised in the map
                raise unwrap_data_error(error) from None
    return data.map(_pair_columns, batched=True, remove_columns=[*SOURCE_COLUMNS, LOCATION], features=features)


def instruction_groups(pairs) -> list[tuple[str, np.ndarray]]:
    """``(instruction, row indices)`` of each distinct instruction of ``pairs`` (a ``Dataset``), in order of first
    appearance, the indices ascending. Reads the instruction column in Arrow batches: memory is one ``int32`` per
    row plus the distinct instructions, never the rows."""
    codes = np.empty(len(pairs), dtype=np.int32)
    seen: dict[str, int] = {}
    start = 0
    for batch in pairs.select_columns(["instruction"]).iter(batch_size=65536):
        column = batch["instruction"]
        codes[start:start + len(column)] = [seen.setdefault(instruction, len(seen)) for instruction in column]
        start += len(column)
    # rows of group 0, then group 1, ...; each group's rows in file order (int32 row ids: half the memory of int64)
    order = np.argsort(codes, kind="stable").astype(np.int32 if len(codes) < 2**31 else np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(seen)))])
    return [(instruction, order[bounds[k]:bounds[k + 1]]) for instruction, k in seen.items()]


def _group_datasets(pairs, groups: list[tuple[str, np.ndarray]],
                    prompt_format: str) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """One (anchor, positive) dataset per group, a selection of the memory-mapped ``pairs`` named ``instruction_<k>``,
    and the sentence-transformers training prompts ``{name: {"anchor": prompt}}`` of the instructed groups."""
    pairs = pairs.select_columns(["anchor", "positive"])
    datasets, prompts = {}, {}
    for k, (instruction, indices) in enumerate(groups):
        name = f"instruction_{k}"
        datasets[name] = pairs.select(indices)
        if instruction:
            prompts[name] = {"anchor": prompt_format.format(instruction=instruction)}
    return datasets, prompts


def group_by_instruction(pairs, prompt_format: str) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """One dataset per instruction (named ``instruction_<k>`` in order of first appearance) of (anchor, positive)
    pairs, and the sentence-transformers training prompts: ``{name: {"anchor": prompt}}`` for instructed groups.

    The datasets are selections (index mappings) of ``pairs``: a memory-mapped ``pairs`` stays on disk."""
    from datasets import Dataset

    if not isinstance(pairs, Dataset):
        raise TypeError("group_by_instruction expects a datasets.Dataset")
    return _group_datasets(pairs, instruction_groups(pairs), prompt_format)


def filter_groups_by_teacher(pairs, groups: list[tuple[str, np.ndarray]], teacher, threshold: float,
                             prompt_format: str, show_progress_bar: bool = True):
    """The optional teacher filter of stage 3 on instruction groups: pairs scored below ``threshold`` are dropped.

    Each group is filtered by :func:`conan_hf.data.teacher.filter_by_teacher` with its instruction as the teacher's
    query prompt (``prompt_format``; the teacher's own query prompt for rows without an instruction): one instruction
    per query, and one prompt per encode call, as sentence-transformers encodes. The filter scores in chunks
    and drops the embeddings (and splits the encoding across ranks under ``torch.distributed``).

    Returns:
        ``(groups, report)``: the groups with their kept rows (empty groups left out, the others in order of their
        first kept row: the groups of the kept pairs), and one report over all pairs, its ``scores`` in row order.
    """
    from conan_hf.data.teacher import TeacherFilterReport, filter_by_teacher

    if isinstance(teacher, str):
        from sentence_transformers import SentenceTransformer

        teacher = SentenceTransformer(teacher)
    scores = np.full(len(pairs), np.nan, dtype=np.float32)
    kept_groups = []
    for instruction, indices in groups:
        part = pairs.select(indices).select_columns(["anchor", "positive"])
        kept, report = filter_by_teacher(part, teacher, threshold=threshold, query_column="anchor",
                                         positive_column="positive", score_column=None,
                                         query_prompt=prompt_format.format(instruction=instruction) if instruction
                                         else None, show_progress_bar=show_progress_bar, verbose=False)
        group_scores = np.asarray(report.scores, dtype=np.float32)
        keep = np.flatnonzero(np.asarray(report.scores) >= threshold)  # filter_by_teacher's rule
        if len(keep) != len(kept):
            raise RuntimeError(f"teacher filter: kept {len(kept)} rows but {len(keep)} scores reach {threshold}")
        scores[indices] = group_scores
        if len(keep):
            kept_groups.append((instruction, indices[keep]))
    kept_groups.sort(key=lambda group: group[1][0])
    total = len(pairs)
    n_kept = sum(len(indices) for _, indices in kept_groups)
    return kept_groups, TeacherFilterReport(threshold=threshold, total=total, kept=n_kept, dropped=total - n_kept,
                                            scores=scores)


def filter_pairs_by_teacher(dataset, teacher, threshold: float, prompt_format: str):
    """The teacher filter of stage 3 on a pairs ``Dataset`` (see :func:`filter_groups_by_teacher`): the kept rows
    in their order, and the report."""
    groups, report = filter_groups_by_teacher(dataset, instruction_groups(dataset), teacher, threshold, prompt_format)
    kept = np.sort(np.concatenate([indices for _, indices in groups])) if groups else np.zeros(0, dtype=np.int64)
    return dataset.select(kept), report


# ---- batches ---------------------------------------------------------------------------------------------------------
def instruction_batches(items: Iterable[tuple[Hashable, tuple[str, ...], Any]], batch_size: int, *,
                        join_lone_row: bool = False) -> Iterator[list[Any]]:
    """Batches of ``batch_size`` items that share one instruction where the data allows, mixed batches for the rest:
    every item lands in exactly one batch.

    ``items`` are ``(instruction key, texts, payload)``. Each instruction has open batches; an item joins the first
    of its instruction's open batches that holds none of its texts (as sentence-transformers' ``NO_DUPLICATES``
    sampler: a repeated text would be a false in-batch negative), a new one if none, and a batch is yielded as soon as
    it is full. At the end the items left in unfilled batches (the remainders of the instructions, and instructions
    with fewer items than a batch) are packed, by the same no-repeat rule, into mixed batches of ``batch_size``, the
    last ones smaller; with ``join_lone_row`` a last batch of one item (no in-batch negative) joins another batch that
    holds none of its texts. Memory: the open batches, about one per instruction.

    Example:
        >>> items = [(i % 3, (f"q{i}", f"p{i}"), i) for i in range(7)]
        >>> list(instruction_batches(items, 2))
        [[0, 3], [1, 4], [2, 5], [6]]

    Yields:
        lists of payloads.
    """
    # A batch: its rows as (payload, texts), and the texts it holds.
    Batch = tuple[list[tuple[Any, tuple[str, ...]]], set[str]]
    open_batches: dict[Hashable, list[Batch]] = {}
    held: list[Batch] = []  # with join_lone_row: the last full batch, kept back for a lone last row

    def place(batches: list[Batch], texts: tuple[str, ...], payload: Any) -> Iterator[list[Any]]:
        slot = next((i for i, (_, seen) in enumerate(batches) if seen.isdisjoint(texts)), len(batches))
        if slot == len(batches):
            batches.append(([], set()))
        rows, seen = batches[slot]
        rows.append((payload, texts))
        seen.update(texts)
        if len(rows) == batch_size:
            full = batches.pop(slot)
            if join_lone_row:
                yield from ([p for p, _ in rows] for rows, _ in held)
                held[:] = [full]
            else:
                yield [p for p, _ in rows]

    for key, texts, payload in items:
        yield from place(open_batches.setdefault(key, []), texts, payload)
    mixed: list[Batch] = []
    for batches in open_batches.values():
        for rows, _ in batches:
            for payload, texts in rows:
                yield from place(mixed, texts, payload)
    rest = held + mixed
    if join_lone_row and len(rest) > 1 and len(rest[-1][0]) == 1:
        (row,), texts = rest[-1]
        host = next((rows for rows, seen in rest[:-1] if seen.isdisjoint(texts)), None)
        if host is not None:
            host.append(row)
            rest.pop()
    for rows, _ in rest:
        yield [p for p, _ in rows]


class InstructionBatchSampler(DefaultBatchSampler):
    """The batches of a memory-mapped stage 3 over its kept pairs: each epoch the pairs in a fresh random order
    (``seed`` and the epoch), regrouped by :func:`instruction_batches` — one instruction per batch where the data
    allows, the remainders in mixed batches, so every pair is in exactly one batch per epoch and instructions get
    batches in proportion to their pairs.

    Args:
        dataset: the pairs (``anchor``/``positive`` columns), read in chunks for the no-repeat rule.
        codes: each row's instruction number.
        batch_size: rows per batch (the last batches of an epoch may be smaller; a last single row joins another).

    ``trained`` marks the rows yielded so far (on every rank: the batches of all ranks).
    """

    def __init__(self, dataset, batch_size: int, codes: np.ndarray, seed: int = 0, **kwargs):
        super().__init__(dataset, batch_size=batch_size, drop_last=False, seed=seed, **kwargs)
        self.dataset, self.codes = dataset, codes
        self.rows_per_batch = batch_size
        self.batch_size = None  # variable: accelerate shards such a sampler batch by batch, dropping none
        self.trained = np.zeros(len(dataset), dtype=bool)
        self._epoch_batches: tuple[int, list[np.ndarray]] | None = None

    def batches(self) -> list[np.ndarray]:
        """This epoch's batches (row indices), computed once per epoch."""
        if self._epoch_batches is None or self._epoch_batches[0] != self.epoch:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.dataset))
            texts = self.dataset.select_columns(["anchor", "positive"])

            def items():
                for start in range(0, len(order), 4096):
                    chunk = order[start:start + 4096].tolist()
                    rows = texts[chunk]
                    for index, anchor, positive in zip(chunk, rows["anchor"], rows["positive"]):
                        yield int(self.codes[index]), (anchor, positive), index

            # int64 arrays, not lists of Python ints: about 8 bytes per row in memory
            self._epoch_batches = (self.epoch, [np.asarray(batch, dtype=np.int64) for batch in
                                                instruction_batches(items(), self.rows_per_batch, join_lone_row=True)])
        return self._epoch_batches[1]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches():
            self.trained[batch] = True
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.batches())


def _instruction_batches(pairs: Iterable[Mapping[str, str]], batch_size: int,
                         counts: dict[str, int] | None = None) -> Iterator[dict[str, str]]:
    """Rows of ``pairs`` regrouped by :func:`instruction_batches` into runs of ``batch_size`` rows (the runs of one
    instruction as they fill, then the remainders in mixed runs at the end of the stream, the last one smaller), so
    the DataLoader's batches of ``batch_size`` rows line up with them. ``counts["read"]`` counts the rows read."""

    def items():
        for pair in pairs:
            if counts is not None:
                counts["read"] = counts.get("read", 0) + 1
            row = {"anchor": pair["anchor"], "positive": pair["positive"], "instruction": pair["instruction"]}
            yield row["instruction"], (row["anchor"], row["positive"]), row

    for batch in instruction_batches(items(), batch_size):
        yield from batch


def stream_instruction_batches(pairs, batch_size: int, counts: dict[str, int] | None = None):
    """A streamed pairs ``IterableDataset`` (:func:`load_pairs`) as runs of ``batch_size`` rows
    (:func:`_instruction_batches`): what grouping by instruction means for a stream.

    A stream cannot be split into one dataset per instruction without reading it once per instruction, so the groups
    are formed as the rows arrive: a run holds one instruction (in-batch negatives of the same task) and each
    instruction gets runs in proportion to its rows in the stream, in stream order instead of a random one; the rows
    left at the end of the stream (remainders, rare instructions) make mixed runs, so every row read is trained. The
    rows keep their ``instruction`` for :class:`InstructionPromptCollator`, which makes it the row's prompt.
    ``counts["read"]`` counts the rows read (this process).
    """
    from datasets import Features, IterableDataset, Value

    features = Features({"anchor": Value("string"), "positive": Value("string"), "instruction": Value("string")})
    return IterableDataset.from_generator(_instruction_batches, features=features,
                                          gen_kwargs={"pairs": pairs, "batch_size": batch_size, "counts": counts})


@dataclasses.dataclass
class InstructionPromptCollator(SentenceTransformerDataCollator):
    """sentence-transformers' collator for stage 3: each row's anchor gets its own instruction (the rows'
    ``instruction`` column, taken out before tokenising) as prompt, in ``prompt_format``; rows without one get none.

    A batch of one prompt is collated exactly as sentence-transformers collates a ``prompts`` mapping (one
    ``anchor_prompt_length``). A batch of several prompts is tokenised with each row's prompt prepended (what
    sentence-transformers' ``preprocess`` does with a prompt) and gets a per-row ``anchor_prompt_length`` (the count
    sentence-transformers measures for that prompt, 0 without one), which :func:`exclude_row_prompts` leaves out of
    the pool row by row. ``check_prompt(prompt, texts)`` is called once per distinct prompt with ``texts=None`` (the
    token-boundary probes) and for the texts of each prompt of a mixed batch. ``rows`` counts the rows collated.
    """

    prompt_format: str = QUERY_PROMPT_FORMAT
    check_prompt: Callable[..., None] | None = None
    rows: int = dataclasses.field(default=0, init=False)
    _checked: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _prompt: str = dataclasses.field(default="", init=False, repr=False)  # of the batch being collated, if one

    def _check(self, prompt: str, texts: list[str] | None = None) -> None:
        if self.check_prompt is not None and (texts is not None or prompt not in self._checked):
            self.check_prompt(prompt, texts)
            self._checked.add(prompt)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from conan_hf.sentence import measured_prompt_length

        self.rows += len(features)
        prompts = [self.prompt_format.format(instruction=row["instruction"]) if row["instruction"] else ""
                   for row in features]
        rows = [{k: v for k, v in row.items() if k != "instruction"} for row in features]
        distinct = set(prompts)
        if len(distinct) == 1:
            self._prompt = prompts[0]
            return super().__call__(rows)
        self._prompt = ""
        tokenizer = self.preprocess_fn.__self__.tokenizer
        lengths = {}
        for prompt in distinct - {""}:
            self._check(prompt)
            self._check(prompt, [row["anchor"] for row, p in zip(rows, prompts) if p == prompt])
            lengths[prompt] = measured_prompt_length(tokenizer, prompt)
        batch = super().__call__([{**row, "anchor": prompt + row["anchor"]} for row, prompt in zip(rows, prompts)])
        batch["anchor_prompt_length"] = torch.tensor([lengths.get(prompt, 0) for prompt in prompts])
        return batch

    def _resolve_prompts(self, batch: dict[str, Any]) -> dict[str, str]:
        if not self._prompt:
            return {}
        self._check(self._prompt)
        return {"anchor": self._prompt}


def exclude_row_prompts(module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A forward pre-hook for sentence-transformers' ``Pooling`` (stage 3 registers it while training) that leaves a
    per-row prompt length (``prompt_length`` of shape ``(batch,)`` with different values, from
    :class:`InstructionPromptCollator`) out of the pool row by row: the first ``prompt_length[i]`` real tokens of row
    ``i`` are masked for pooling only, as ``Pooling`` masks one length for all rows (left padding included). The
    features the model's other modules saw are not changed (the hook passes a copy on). A batch with one prompt
    length passes through unchanged."""
    features = args[0] if args else kwargs["features"]
    lengths = features.get("prompt_length")
    if (module.include_prompt or not isinstance(lengths, torch.Tensor) or lengths.ndim != 1
            or bool((lengths == lengths[0]).all())):
        return None
    if "cu_seq_lens_q" in features:
        raise ValueError("stage 3: per-row prompt lengths need padded batches, not flattened (FA2 unpadded) ones")
    features = {key: value for key, value in features.items() if key != "prompt_length"}
    mask = features["attention_mask"]
    start = mask.to(torch.int32).argmax(dim=1)  # left padding, if any
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    features["attention_mask"] = mask.masked_fill(positions < (start + lengths.to(mask.device)).unsqueeze(1), 0)
    return ((features, *args[1:]), kwargs) if args else (args, {**kwargs, "features": features})


def _init_process_group() -> None:
    """Start the process group before reading, so the data layer knows this process's rank (a stream is split across
    ranks, the memory-mapped cache is built by local rank 0 first). The Trainer would only start it later, when its
    arguments are made; it then reuses this accelerate state. (On CPU, accelerate starts a process group only with
    ``ACCELERATE_USE_CPU=1`` or a DeepSpeed config, as for the Trainer itself.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()


class WeakRunner(StageRunner):
    """Stage 3: the pairs grouped by instruction (optionally filtered by a teacher), the stage-2 decoder (or yours)
    as a SentenceTransformer with the soft mask, InfoNCE and :class:`~conan_hf.training.callbacks.SoftMaskCallback`.
    The data is read before the model is checked, so a bad data file is reported first."""

    stage, number, config_class, what = "weak", 3, WeakConfig, WHAT
    check_input_first = False

    @functools.cached_property
    def streamed(self) -> bool:
        config = self.config
        streamed = any(source.streaming for source in parse_sources(config.data, WHAT))
        if streamed and config.teacher:
            # The filter needs the pairs as a table to select the kept ones from: the sources are parsed into the
            # memory-mapped cache (on disk, once per node) and the teacher streams over it in chunks.
            print_main("[stage 3] teacher filter: streamed sources are read memory-mapped; the kept pairs are a "
                       "selection")
            streamed = False
        return streamed

    def build_trainer(self):
        kwargs = self.training_arguments_kwargs()
        _init_process_group()
        pairs = self.load_datasets()
        model = self.load_model()
        return self.create_trainer(model, pairs, kwargs)

    def training_arguments_kwargs(self) -> dict[str, Any]:
        config = self.config
        if self.streamed and (config.max_steps is None or config.max_steps <= 0):
            raise DataError(f"{WHAT}: a streamed source (`streaming: true`) has no length, so stage 3 needs "
                            "max_steps", hint="set max_steps (e.g. --max_steps 10000), or drop `streaming: true` to "
                                              "read the sources memory-mapped")
        kwargs = config.training_arguments_kwargs()
        if self.streamed:
            # This rank's share of the stream: no rank reads for the others (see WeakTrainer).
            kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "dispatch_batches": False}
        return kwargs

    def load_datasets(self):
        """The pairs (:func:`load_pairs`); memory-mapped ones also as instruction groups (``self.groups``), filtered
        by the teacher when there is one (``self.teacher_report``). The input model is checked after the data."""
        config = self.config
        pairs = load_pairs(config.data, streaming=self.streamed)
        check_stage_input(config, "weak")  # after the data checks, before the (slow) teacher filter
        self.teacher_report, self.groups = None, None
        if not self.streamed:
            self.groups = instruction_groups(pairs)
            if config.teacher:
                self.groups, self.teacher_report = filter_groups_by_teacher(
                    pairs, self.groups, config.teacher, config.teacher_threshold, config.prompt_format)
                print_main(self.teacher_report.summary())
                if not self.groups:
                    raise ValueError(f"the teacher filter (threshold {config.teacher_threshold}) dropped every pair")
        return pairs

    def load_model(self):
        """The embedding model with the soft mask: a Conan backbone switches to ``attention_mode="soft"``, a stock
        decoder gets :func:`conan_hf.apply_soft_mask`; an encoder is refused (it has no causal start)."""
        from conan_hf.soft_mask import set_soft_mask_length

        config = self.config
        model = load_sentence_model(config.model, attention_mode="soft", pooling=config.pooling,
                                    max_seq_length=config.max_seq_length)
        # "max_seq_length" becomes this stage's fixed max_seq_length, so l does not depend on how the collator pads.
        set_soft_mask_length(model, config.max_seq_length if config.soft_mask_length == "max_seq_length"
                             else config.soft_mask_length)
        if config.lora:
            add_lora(model, dict(config.lora))
        return model

    def training_datasets(self, model, pairs) -> tuple[Any, Any, str]:
        """(train dataset, collator, a description): the kept pairs with their ``instruction`` column, batched by
        :class:`InstructionBatchSampler` (see :meth:`WeakTrainer.get_batch_sampler`), or the stream batched by
        instruction as it arrives; either way :class:`InstructionPromptCollator` gives each row its prompt."""
        from conan_hf.sentence import BOUNDARY_PROBES, check_prompt_boundary

        config, batch = self.config, self.config.per_device_train_batch_size
        check = None if not excludes_prompt(model) else (
            lambda prompt, texts=None: check_prompt_boundary(model.tokenizer, prompt, texts or BOUNDARY_PROBES,
                                                             max_length=model.max_seq_length))
        self.collator = InstructionPromptCollator(preprocess_fn=model.preprocess, prompt_format=config.prompt_format,
                                                  check_prompt=check)
        if self.streamed:
            self.stream_counts: dict[str, int] = {}
            return (stream_instruction_batches(pairs, batch, self.stream_counts), self.collator,
                    "a stream of pairs, batched by instruction as they arrive")
        self.pairs_read = len(pairs)
        kept = np.sort(np.concatenate([indices for _, indices in self.groups]))
        codes = np.empty(len(pairs), dtype=np.int32)
        for k, (instruction, indices) in enumerate(self.groups):
            codes[indices] = k
            if instruction:
                self.collator._check(config.prompt_format.format(instruction=instruction))
        self.group_sizes = {instruction: len(indices) for instruction, indices in self.groups}
        self.groups = None  # the selection holds its row ids in the datasets cache, not these arrays
        self.codes = codes[kept]
        train = pairs if len(kept) == len(pairs) else pairs.select(kept)
        return (train.select_columns(["anchor", "positive", "instruction"]), self.collator,
                f"{len(kept)} pairs of {len(self.group_sizes)} instruction(s)")

    def create_trainer(self, model, pairs, kwargs):
        from sentence_transformers import SentenceTransformerTrainingArguments
        from sentence_transformers.base.sampler import BatchSamplers

        from conan_hf.losses import InfoNCELoss
        from conan_hf.training.callbacks import SoftMaskCallback

        config = self.config
        train_dataset, collator, described = self.training_datasets(model, pairs)
        loss = InfoNCELoss(model, temperature=config.temperature)
        # Every pair is trained: the last batch of a stream (or of an epoch's mixed batches) may be smaller.
        args = SentenceTransformerTrainingArguments(**kwargs, batch_sampler=BatchSamplers.BATCH_SAMPLER,
                                                    dataloader_drop_last=False)
        self.callback = SoftMaskCallback(schedule=config.soft_mask_schedule, total_steps=config.soft_mask_steps)
        trainer = WeakTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                              callbacks=[self.callback], data_collator=collator,
                              instruction_codes=None if self.streamed else self.codes)
        self.hooks = [module.register_forward_pre_hook(exclude_row_prompts, with_kwargs=True)
                      for module in model.modules() if isinstance(module, Pooling)]
        print_main(f"[stage 3] weakly-supervised training of {config.model} on {described}, soft mask "
                   f"({config.soft_mask_schedule} α(t), τ = {config.soft_mask_steps or 'all steps'})")
        print_main(f"[stage 3] {describe_attention(model)['line']}")
        self.model = model
        return trainer

    def after_training(self, trainer) -> None:
        """α ≥ 1 is exactly bidirectional attention: the model is saved so; a stock decoder that ended at α < 1 is
        saved causal (its config cannot store a partial soft mask; a Conan config stores ``soft`` and α)."""
        from conan_hf.backbones import backbone_kind
        from conan_hf.soft_mask import get_soft_mask_alpha

        for hook in self.hooks:
            hook.remove()
        if self.config.lora:
            merge_lora(self.model)
        self.alpha = get_soft_mask_alpha(self.model)
        if self.alpha >= 1.0:
            set_attention_mode(self.model, "bidirectional")
        elif backbone_kind(backbone(self.model)) != "conan":
            logger.warning("stage 3 ended at α = %.3f < 1: a stock decoder cannot store a partial soft mask, so it is "
                           "saved causal (stage 4 sets its own attention_mode)", self.alpha)
            set_attention_mode(self.model, "causal")

    def summary(self, trainer):
        from conan_hf.backbones import get_attention_mode

        teacher_summary = self.teacher_report.to_dict() if self.teacher_report else None
        if teacher_summary:
            teacher_summary.pop("scores", None)
        if self.streamed:
            groups_summary: Any = "streamed: grouped by instruction as the pairs arrive"
            num_pairs = read = self.stream_counts.get("read", 0)
            trained = self.collator.rows  # rows batched (this process), over all passes of the stream
            line = f"{read} pairs read, {trained} trained (this process); "
        else:
            groups_summary = {f"instruction_{k}": {"pairs": size, "prompt": self.config.prompt_format.format(
                instruction=instruction) if instruction else None}
                for k, (instruction, size) in enumerate(self.group_sizes.items())}
            num_pairs, read = len(self.codes), self.pairs_read
            trained = int(trainer.train_dataloader_sampler.trained.sum())
            filtered = f" ({read - num_pairs} dropped by the teacher filter)" if read != num_pairs else ""
            line = f"{read} pairs read, {trained} trained{filtered}; "
        return f"{line}α = {self.alpha:.3f} at the end; ", {
            "num_pairs": num_pairs, "pairs_read": read, "pairs_trained": trained, "final_alpha": self.alpha,
            "streamed": self.streamed,
            "instruction_groups": groups_summary, "soft_mask_total_steps": self.callback.total_steps,
            "soft_mask_alphas": [(e["step"], e["soft_mask_alpha"]) for e in trainer.state.log_history
                                 if "loss" in e and "soft_mask_alpha" in e],
            "attention_mode": get_attention_mode(backbone(self.model)), "teacher_filter": teacher_summary,
        }


def run(config: WeakConfig) -> dict[str, Any]:
    """Train stage 3; returns a summary with the final directory, the logged losses and the final α."""
    return WeakRunner(config).run()


def main(argv: list[str] | None = None) -> None:
    """``conan-train weak [options]`` (see ``--help``)."""
    WeakRunner.main(argv, description=__doc__)


if __name__ == "__main__":
    main()
