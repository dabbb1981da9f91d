"""Training on a streamed source (``streaming: true``): examples produced lazily from a
``datasets.IterableDataset``, and the stream position saved in every checkpoint so that a resumed run neither repeats
nor skips data.

How the position is kept (and why not transformers' default): on resume the Trainer fast-forwards an iterable
dataloader with accelerate's ``skip_first_batches``, which reads, tokenises and packs again every batch already
trained on — exact, but at the paper's scale (3T pre-training tokens) a resume would take as long as the training
before it. ``torchdata``'s ``StatefulDataLoader`` (accelerate's ``use_stateful_dataloader``) is not installed and
transformers' checkpoints do not save a dataloader state anyway. So :class:`ResumableStream` wraps the
``datasets.IterableDataset`` and remembers, for each example it yields, ``datasets``' own
``IterableDataset.state_dict()`` just after it (exact for generator sources and batched ``map``/``filter``; no shuffle
buffer is used), plus what the stage needs within a source row (the tokens of a document already packed into earlier
blocks). :class:`StreamPositionCallback` writes the position of the last example *the Trainer consumed* —
``global_step × gradient_accumulation_steps × per_device_train_batch_size`` examples, not what the dataloader has
prefetched — into ``checkpoint-N/stream_position-rank{R}.json``; on resume the stream restarts there
(``load_state_dict``) and the Trainer's own skipping is switched off (``ignore_data_skip``).

The stream is endless: when the source ends, it is read again from the start (one more pass), so every batch is full
and ``max_steps`` (required for a stream: it has no length) decides how much is trained on. Each rank reads its own
shards (:func:`conan_hf.data.sources.load_sources` splits the stream by node); :class:`StreamTrainer` keeps accelerate
from splitting it a second time.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from conan_hf.errors import DataError

logger = logging.getLogger(__name__)

#: Per-rank file in ``checkpoint-N`` holding the stream position after the examples trained on up to step N.
STREAM_POSITION = "stream_position-rank{rank}.json"


class ResumableStream(torch.utils.data.IterableDataset):
    """The examples of ``source`` (a ``datasets.IterableDataset``), pass after pass, each with its stream position.

    A position is ``{"examples": n, "pass": p, "source": <datasets state or None>, "skip": k}``: ``n`` examples were
    yielded since the start of training; the next one comes from pass ``p`` of the source restarted at ``source``
    (``None``: its beginning), after skipping ``k`` units of the first row (see :meth:`_pass`). Subclasses turn source
    rows into examples by overriding :meth:`_pass`.

    Args:
        source: the rows; iterated in one process (``dataloader_num_workers: 0``), in order.
        what: names the data in errors.
        history: positions kept for the last examples yielded; must exceed what the dataloader reads ahead of training
            (a batch per process plus the batches of one optimizer step).
    """

    def __init__(self, source, what: str = "data", history: int = 65_536):
        super().__init__()
        self.source = source
        self.what = what
        self.history = history
        self._start: dict[str, Any] = {"examples": 0, "pass": 0, "source": None, "skip": 0}
        self._positions: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def resume(self, position: dict[str, Any]) -> None:
        """Continue from ``position`` (one returned by :meth:`position_after`) at the next iteration."""
        self._start = dict(position)
        self._positions.clear()
        self._positions[position["examples"]] = dict(position)

    def position_after(self, examples: int) -> dict[str, Any]:
        """The position after the first ``examples`` examples of training (counted from the run's start)."""
        if examples == self._start["examples"]:
            return dict(self._start)
        if examples not in self._positions:
            raise RuntimeError(f"{self.what}: no stream position recorded after {examples} examples (kept: "
                               f"{next(iter(self._positions), None)}..{next(reversed(self._positions), None)}); "
                               f"raise `history`")
        return dict(self._positions[examples])

    def _record(self, count: int, position: dict[str, Any]) -> None:
        self._positions[count] = position
        while len(self._positions) > self.history:
            self._positions.popitem(last=False)

    def _pass(self, stream, state: Any, skip: int) -> Iterator[tuple[dict[str, Any], Any, int]]:
        """``(example, source state, skip)`` for every example of one pass, which starts at source state ``state``
        (``None``: the beginning) skipping ``skip`` units of its first row; the example after each one starts at the
        returned ``source state`` skipping ``skip`` units. Default: one example per row, ``skip`` 0."""
        del state, skip
        for row in stream:
            yield row, stream.state_dict(), 0

    def _end_of_pass(self) -> Iterator[dict[str, Any]]:
        """Examples left when the source ends (e.g. the last, padded block)."""
        return iter(())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = dict(self._start)
        count, epoch = start["examples"], start["pass"]
        state, skip = start["source"], start["skip"]
        while True:
            stream = copy.deepcopy(self.source)  # a fresh iterator state for every pass
            if state is not None:
                stream.load_state_dict(state)
            yielded = False
            for example, after, after_skip in self._pass(stream, state, skip):
                count += 1
                self._record(count, {"examples": count, "pass": epoch, "source": after, "skip": after_skip})
                yielded = True
                yield example
            for example in self._end_of_pass():
                count += 1
                self._record(count, {"examples": count, "pass": epoch + 1, "source": None, "skip": 0})
                yielded = True
                yield example
            if not yielded and state is None:
                raise DataError(f"{self.what}: the stream has no examples", hint="check the `data:` sources")
            epoch, state, skip = epoch + 1, None, 0
            logger.info("%s: starting pass %d over the stream", self.what, epoch + 1)


class StreamPositionCallback(TrainerCallback):
    """Saves the stream position with every checkpoint and restores it when training resumes (see the module
    docstring). ``resume_path`` is the checkpoint the run resumes from (``None``: the latest in ``output_dir``)."""

    def __init__(self, stream: ResumableStream, resume_path: str | None = None):
        self.stream = stream
        self.resume_path = resume_path

    @staticmethod
    def _examples(args, state) -> int:
        return state.global_step * args.gradient_accumulation_steps * args.per_device_train_batch_size

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return control
        folder = Path(self.resume_path or Path(args.output_dir) / f"checkpoint-{state.global_step}")
        path = folder / STREAM_POSITION.format(rank=args.process_index)
        if not path.is_file():
            raise DataError(f"resuming a streamed run needs the stream position, but {path.name} is missing",
                            where=str(folder), hint="resume from a checkpoint of a streamed run with the same number "
                                                    "of processes, or start over with resume=no")
        position = json.loads(path.read_text(encoding="utf-8"))
        expected = self._examples(args, state)
        if position["examples"] != expected:
            raise DataError(f"the stream position is after {position['examples']} examples, the checkpoint's step "
                            f"{state.global_step} after {expected}", where=str(path),
                            hint="resume with the batch size and gradient accumulation of the run that saved it")
        self.stream.resume(position)
        logger.info("%s: resuming the stream after %d examples (pass %d)", self.stream.what, expected,
                    position["pass"] + 1)
        return control

    def on_save(self, args, state, control, **kwargs):
        from conan_hf.training.checkpoints import write_json_atomic

        # every rank writes its own file; the folder may not be there yet on this rank (rank 0 makes it)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        position = self.stream.position_after(self._examples(args, state))
        write_json_atomic(folder / STREAM_POSITION.format(rank=args.process_index), position)
        return control


class StreamTrainer(Trainer):
    """A Trainer for a rank-sharded :class:`ResumableStream`: every process iterates its own stream (accelerate's
    ``dispatch_batches`` must be off), and the ``IterableDatasetShard`` accelerate wraps it in does not keep only
    1/world of it (the stream is already this rank's part; the same neutralisation transformers applies to its own
    rank-aware ``BatchRebalanceSampler``)."""

    def get_train_dataloader(self):
        from accelerate.data_loader import IterableDatasetShard

        dataloader = super().get_train_dataloader()
        shard = getattr(dataloader, "dataset", None)
        if isinstance(shard, IterableDatasetShard):
            shard.num_processes, shard.process_index = 1, 0
        return dataloader


def is_streamed(sources: Any, what: str = "data") -> bool:
    """Whether :func:`conan_hf.data.sources.load_sources` streams these ``data:`` entries (any says
    ``streaming: true``), known before reading them, so the process group can be set up first."""
    from conan_hf.data.sources import parse_sources

    return any(source.streaming for source in parse_sources(sources, what))


def stream_training_kwargs(config, what: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (``TrainingArguments`` keyword arguments) for a streamed run, refusing options a stream cannot
    honour: accelerate's ``dispatch_batches`` off (merged into an ``accelerator_config`` already there) and the
    Trainer's own data skipping off (the stream position is restored instead)."""
    if config.max_steps is None or config.max_steps <= 0:
        raise DataError(f"{what} is streamed (`streaming: true`): a stream has no length, so the number of training "
                        f"steps must be given", hint="set max_steps (e.g. --max_steps 1000)")
    if config.dataloader_num_workers:
        raise DataError(f"{what} is streamed: dataloader_num_workers must be 0 (the stream position saved in "
                        f"checkpoints is kept in the main process)", hint="set dataloader_num_workers: 0")
    accelerator_config = dict(kwargs.get("accelerator_config") or {})
    accelerator_config["dispatch_batches"] = False
    return {**kwargs, "ignore_data_skip": True, "accelerator_config": accelerator_config}
