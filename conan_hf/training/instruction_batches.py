"""Batches for instruction-conditioned pair training (stage 3): batches that share one instruction where the data
allows and mixed batches for the rest, so every pair is trained; the collator that gives each row its own prompt,
and the pooling hook that leaves each row's own prompt out of mean pooling."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

from conan_hf.sentence import QUERY_PROMPT_FORMAT


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
