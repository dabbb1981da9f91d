"""Stage 3 (paper §3.1-3.2): weakly-supervised embedding training with the soft mask.

    accelerate launch -m conan_hf.stages weak --config conan_hf/stages/configs/weak.yaml [--preset tiny]

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

Data (no rank holds the pairs as Python objects). The sources are read by
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
from collections.abc import Mapping
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.modules import Pooling

from conan_hf.data.sources import (
    LOCATION,
    load_sources,
    main_process_first,
    parse_sources,
    progress_bars_on_terminals_only,
    row_text,
    unwrap_data_error,
)
from conan_hf.errors import DataError, location_of
from conan_hf.sentence import QUERY_PROMPT_FORMAT, excludes_prompt
from conan_hf.training.checkpoints import MainProcessSaveMixin, check_stage_input
from conan_hf.training.config import StageConfig, option, override
from conan_hf.training.distributed import print_main
from conan_hf.training.instruction_batches import (  # noqa: F401  (importable from this module too)
    InstructionBatchSampler,
    InstructionPromptCollator,
    _instruction_batches,
    exclude_row_prompts,
    instruction_batches,
    stream_instruction_batches,
)
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


run, main = WeakRunner.entry_points(__doc__)


if __name__ == "__main__":
    main()
