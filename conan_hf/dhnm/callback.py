"""The Trainer callbacks of DHNM: :class:`DHNMCallback` applies eq. 6 to the scores the loss recorded and keeps the
pool state in every checkpoint; :class:`FalseNegativeCountCallback` logs the in-batch false negatives InfoNCE masked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .contract import (
    FalseNegativeCountSource,
    HardNegativeScoreSource,
    MultiTaskScores,
    false_negative_sources,
    find_score_source,
)
from .pool import COUNT_KEYS, NegativePool
from .requeue import REQUEUE_COUNT_KEYS, RequeueSchedule
from .score_scale import rescale_scores
from .state import (
    _OPTIONAL_STATE_ARRAYS,
    _STATE_ARRAYS,
    DHNM_STATE_NAME,
    FALSE_NEGATIVES_STATE_NAME,
    LEGACY_DHNM_STATE_NAME,
)

logger = logging.getLogger(__name__)

__all__ = ["DHNMCallback", "FalseNegativeCountCallback"]

_TOTAL_KEYS = (*COUNT_KEYS, *REQUEUE_COUNT_KEYS)


def _all_gather_arrays(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Concatenate ``arrays`` from every rank in rank order (identical result on all ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return arrays
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return arrays
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered]) for i in range(len(arrays)))


class DHNMCallback(TrainerCallback):
    """Apply DHNM (eq. 6) after every optimizer step and keep the pool state in the checkpoints.

    ``on_step_end``: reads the scores :class:`conan_hf.losses.InfoNCELoss` recorded for the step's micro-batches,
    gathers them from all ranks (``torch.distributed.all_gather_object``, rank order), and calls
    :meth:`~conan_hf.dhnm.pool.NegativePool.apply_scores` — every rank sees the same scores in the same order, so
    every rank makes the same decisions and the pools stay identical. The counts (``checked``, ``replaced``, ``used``,
    ``pool_exhausted``, ``nan_scores``, ``stale``, and ``replaced`` / ``used`` by the clause of eq. 6 that made the
    replacement: ``replaced_low_s0``, ``replaced_easy``, ``used_low_s0``, ``used_easy``) are summed since the previous
    log and added as ``dhnm_<name>`` to the Trainer's training log (``logs`` and ``state.log_history``);
    ``logging_steps=1`` gives per-step counts. Running totals are in :attr:`totals` (with the re-queue counts
    ``requeued`` and ``requeue_late``), the pool's counts of the last step in :attr:`last_step_counts`.

    Re-queueing (``requeue=True``, the default): the rows that just received a replacement are assigned to upcoming
    batches of the same epoch (:class:`~conan_hf.dhnm.requeue.RequeueSchedule`, :attr:`requeue`), so a replacement
    trains soon after it is made rather than at the example's next epoch. A trainer that draws its training batches
    through :class:`~conan_hf.dhnm.requeue.RequeueBatchSampler` serves the schedule
    (:class:`conan_hf.training.multitask.MultiTaskTrainer` does); with another trainer nothing is re-queued (a warning
    says so) and replacements train at the example's next visit.

    ``on_save``: writes ``dhnm_state.npz`` (pool state arrays, thresholds, totals, step) into the checkpoint folder the
    Trainer just wrote, ``<output_dir>/checkpoint-<global_step>``.

    ``on_train_begin``: restores that file when resuming. The Trainer gives callbacks no resume path, so it is
    taken from ``resume_from_checkpoint`` given here, else from ``args.resume_from_checkpoint``, else — when the
    Trainer has restored a state (``state.global_step > 0``, i.e. ``trainer.train(resume_from_checkpoint=...)``) —
    from ``<output_dir>/checkpoint-<global_step>``. Resuming without a matching state file raises (the pools would
    silently restart otherwise).

    Args:
        pool: the :class:`~conan_hf.dhnm.pool.NegativePool` the collator reads.
        loss: where the scores come from (:mod:`conan_hf.dhnm.contract`): the training loss (an
            :class:`~conan_hf.losses.InfoNCELoss`, possibly wrapped in MatryoshkaLoss); for multi-task training the
            ``{task: loss}`` mapping given to the Trainer (or a list of losses), read through
            :class:`~conan_hf.dhnm.contract.MultiTaskScores`; or any
            :class:`~conan_hf.dhnm.contract.HardNegativeScoreSource`.
        s0_min / drop_ratio / s_max: eq. 6 thresholds (0.4, 1.2, 0.7 in the paper).
        score_baseline: opt-in: eq. 6 judges ``(S - b) / (1 - b)`` (b the cosine of unrelated texts) for models whose
            cosines bunch near 1; 0 (default) is the paper's rule (:func:`~conan_hf.dhnm.pool.dhnm_should_replace`).
        resume_from_checkpoint: checkpoint folder to restore the pools from (optional, see above).
        requeue: re-queue examples holding fresh replacements into later batches of the epoch (``True``), or not
            (``False``), or the :class:`~conan_hf.dhnm.requeue.RequeueSchedule` to use.
        requeue_rows: with ``requeue=True``, re-queued rows per batch at most (``None``: the task's batch size).

    Example:
        ::

            callback = DHNMCallback(pool, loss, s0_min=0.4, drop_ratio=1.2, s_max=0.7)
            trainer = SentenceTransformerTrainer(..., callbacks=[callback])
            trainer.train(resume_from_checkpoint="out/checkpoint-500")

            # multi-task: a DatasetDict with a loss per task
            callback = DHNMCallback(pool, {"retrieval": info_nce, "sts": cosent})
    """

    def __init__(
        self,
        pool: NegativePool,
        loss: torch.nn.Module | Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module] | HardNegativeScoreSource,
        s0_min: float = 0.4,
        drop_ratio: float = 1.2,
        s_max: float = 0.7,
        score_baseline: float = 0.0,
        resume_from_checkpoint: str | os.PathLike | None = None,
        requeue: bool | RequeueSchedule = True,
        requeue_rows: int | None = None,
    ) -> None:
        rescale_scores(0.0, score_baseline)  # checks its range now, not at the first step
        self.pool = pool
        self.requeue: RequeueSchedule | None = (
            RequeueSchedule(requeue_rows) if requeue is True else requeue if isinstance(requeue, RequeueSchedule)
            else None)
        if isinstance(loss, (Mapping, list, tuple)):
            self.score_source: HardNegativeScoreSource = MultiTaskScores(loss)
        else:
            self.score_source = find_score_source(loss)
        self.thresholds = {"s0_min": float(s0_min), "drop_ratio": float(drop_ratio), "s_max": float(s_max)}
        if score_baseline:  # only when set: checkpoints of runs without it keep equal thresholds
            self.thresholds["score_baseline"] = float(score_baseline)
        self.resume_from_checkpoint = None if resume_from_checkpoint is None else os.fspath(resume_from_checkpoint)
        self.totals: dict[str, int] = dict.fromkeys(_TOTAL_KEYS, 0)
        self.last_step_counts: dict[str, int] = dict.fromkeys(COUNT_KEYS, 0)
        self._since_log: dict[str, int] = dict.fromkeys(_TOTAL_KEYS, 0)

    # ---- training events -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_num_workers > 0:
            raise ValueError(
                f"DHNM needs dataloader_num_workers=0 (got {args.dataloader_num_workers}): worker processes would "
                "batch from copies of the NegativePool and never see the replacements"
            )
        path = self._resume_path(args, state)
        if path is not None:
            self.load(path, expected_step=state.global_step if state.global_step > 0 else None)
        if self.requeue is not None and not self.requeue.attached:
            logger.warning("DHNM re-queueing is off: the trainer does not draw its batches through "
                           "conan_hf.dhnm.requeue.RequeueBatchSampler (use conan_hf.training.multitask.MultiTaskTrainer"
                           ", or DHNMCallback(requeue=False)); replacements train at the example's next visit")

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.requeue is not None:
            # Mid-epoch resume: state.epoch is the resumed epoch plus a fraction, and the loaded entries stay.
            self._add({"requeue_late": self.requeue.begin_epoch(int(state.epoch or 0), state.global_step)})

    def on_step_end(self, args, state, control, **kwargs):
        records = self.score_source.pop_hard_negative_scores()
        if records:
            rows = np.concatenate([r.example_ids.cpu().numpy().astype(np.int64) for r in records])
            width = max(r.negative_ids.shape[1] for r in records)
            # Micro-batches may differ in negative columns; pad to one width with empty (-1 / NaN) slots.
            negs = np.concatenate([_pad(r.negative_ids.cpu().numpy().astype(np.int64), width, -1) for r in records])
            scores = np.concatenate([_pad(r.scores.cpu().numpy().astype(np.float64), width, np.nan) for r in records])
        else:
            rows, negs, scores = np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float64)
        # Every rank takes part in the gather, also with nothing to add, so the collective always matches up.
        rows, negs, scores = _all_gather_arrays((rows, _pad(negs, self.pool.k, -1), _pad(scores, self.pool.k, np.nan)))
        counts = self.pool.apply_scores(rows, negs, scores, **self.thresholds)
        self.last_step_counts = counts
        if self.requeue is not None and self.requeue.attached:
            # Rows entered now may join batches from the first one of step n + 2 of the epoch on (n: steps done in
            # it), which no rank has drawn yet whatever the prefetching (see conan_hf.dhnm.requeue).
            per_step = args.world_size * args.gradient_accumulation_steps
            boundary = (state.global_step - self.requeue.epoch_start_step + 1) * per_step
            counts = {**counts, **self.requeue.schedule(self.pool.replaced_rows, boundary=boundary)}
        self._add(counts)

    def _add(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.totals[key] += value
            self._since_log[key] += value

    def on_train_end(self, args, state, control, **kwargs):
        if self.requeue is not None:
            self.totals["requeue_late"] += self.requeue.unresolved()  # entries the run ended before
        # Per run, not per step: in multi-task training, steps on tasks without hard negatives (STS) have no scores.
        if self.totals["checked"] == 0 and state.global_step > 0:
            logger.warning(
                "DHNMCallback got no hard-negative scores in %d steps: batch with DHNMDataCollator and train with "
                "InfoNCELoss(record_scores=True) on hard negatives.",
                state.global_step,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        entry = {f"dhnm_{key}": value for key, value in self._since_log.items()}
        logs.update(entry)
        # Trainer.log appended a copy of `logs` to the history just before calling us: put the counts there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entry)
        self._since_log = dict.fromkeys(_TOTAL_KEYS, 0)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(
                f"DHNMCallback: expected the Trainer checkpoint at {checkpoint} (hyper-parameter search run folders "
                "are not supported); the DHNM state could not be saved"
            )
        self.save(checkpoint, global_step=state.global_step)

    def replacement_summary(self) -> dict[str, Any]:
        """Totals plus how many replacements were made, how many a later batch carried, and that fraction.

        ``pending`` replacements were made at an example's last visit of the run: no batch carried them.
        """
        made, used = self.totals["replaced"], self.totals["used"]
        return {**self.totals, "pending": made - used, "used_fraction": (used / made) if made else None}

    def summary_note(self) -> str:
        """One line for a stage summary: replacements made and used, by the clause of eq. 6 that made them."""
        t = self.replacement_summary()
        fraction = f" ({t['used_fraction']:.0%})" if t["used_fraction"] is not None else ""
        requeue = (f", {t['requeued']} re-queued within their epoch ({t['requeue_late']} of them too late in it)"
                   if self.requeue is not None and self.requeue.attached else ", re-queueing off")
        return (f"DHNM: {t['replaced']} replacements made (dhnm_replaced_low_s0 {t['replaced_low_s0']}, "
                f"dhnm_replaced_easy {t['replaced_easy']}), {t['used']} used by a later batch{fraction} "
                f"(dhnm_used_low_s0 {t['used_low_s0']}, dhnm_used_easy {t['used_easy']}){requeue}, "
                f"{t['pool_exhausted']} due with the pool used up; ")

    # ---- persistence ---------------------------------------------------------------------------------------------
    def state_dict(self, global_step: int | None = None) -> dict[str, Any]:
        return {
            "global_step": global_step,
            "thresholds": self.thresholds,
            "totals": self.totals,
            "pool": self.pool.state_dict(),
        }

    def save(self, checkpoint_dir: str | os.PathLike, global_step: int | None = None) -> str:
        """Write ``dhnm_state.npz`` into ``checkpoint_dir``; returns its path.

        An uncompressed ``.npz`` holding the state arrays in their own dtypes and a ``meta`` array with the JSON of
        everything else (step, thresholds, totals, the pool's version, size, ``k`` and fingerprint). It is written
        to a temporary name and renamed, so a crash mid-write never leaves a truncated state behind. At 10M
        examples this is ~0.75 GB written at disk speed (``benchmarks/scale.py``); the JSON of earlier versions took
        minutes.
        """
        state = self.state_dict(global_step)
        pool_state = state.pop("pool")
        arrays = {name: pool_state.pop(name) for name in (*_STATE_ARRAYS, *_OPTIONAL_STATE_ARRAYS)}
        meta = {**state, "pool": pool_state}
        if self.requeue is not None:
            requeue = self.requeue.state_dict()
            meta["requeue"] = {"epoch": requeue.pop("epoch"), "epoch_start_step": requeue.pop("epoch_start_step")}
            arrays.update({f"requeue_{name}": value for name, value in requeue.items()})
        path = os.path.join(checkpoint_dir, DHNM_STATE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        return path

    def load(self, checkpoint_dir: str | os.PathLike, expected_step: int | None = None) -> None:
        """Restore the pools and totals from ``checkpoint_dir/dhnm_state.npz`` (or, for checkpoints of earlier
        versions, ``dhnm_state.json``)."""
        path = os.path.join(checkpoint_dir, DHNM_STATE_NAME)
        legacy = os.path.join(checkpoint_dir, LEGACY_DHNM_STATE_NAME)
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as saved:
                missing = [name for name in ("meta", *_STATE_ARRAYS) if name not in saved.files]
                if missing:
                    raise ValueError(f"{path} is not a DHNM state: it lacks {missing} (has {saved.files})")
                state = json.loads(str(saved["meta"]))
                state["pool"].update({name: saved[name] for name in (*_STATE_ARRAYS, *_OPTIONAL_STATE_ARRAYS)
                                      if name in saved.files})
                if "requeue" in state:
                    state["requeue"].update({name: saved[f"requeue_{name}"] for name in ("boundary", "task", "row")})
            copy = False  # the arrays were just read: adopt them rather than copy
        elif os.path.isfile(legacy):
            path = legacy
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            copy = True
        else:
            raise FileNotFoundError(
                f"no DHNM state at {path}: resuming needs the {DHNM_STATE_NAME} that DHNMCallback writes into each "
                "checkpoint (pass resume_from_checkpoint=<checkpoint folder> to DHNMCallback if it lives elsewhere)"
            )
        if expected_step is not None and state.get("global_step") not in (None, expected_step):
            raise ValueError(
                f"{path} holds the DHNM state of step {state['global_step']}, but training resumes at step "
                f"{expected_step}"
            )
        self.pool.load_state_dict(state["pool"], copy=copy)
        self.totals = {key: int(state.get("totals", {}).get(key, 0)) for key in _TOTAL_KEYS}
        if self.requeue is not None:
            self.requeue.load_state_dict(state.get("requeue") or {"epoch": -1, "boundary": [], "task": [], "row": []})
        if state.get("thresholds") and state["thresholds"] != self.thresholds:
            logger.warning("DHNM thresholds changed on resume: %s -> %s", state["thresholds"], self.thresholds)

    def _resume_path(self, args, state) -> str | None:
        if self.resume_from_checkpoint is not None:
            return self.resume_from_checkpoint
        if state.global_step == 0:
            return None
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for candidate in candidates:
            if any(os.path.isfile(os.path.join(candidate, name)) for name in (DHNM_STATE_NAME, LEGACY_DHNM_STATE_NAME)):
                return candidate
        raise FileNotFoundError(
            f"training resumes at step {state.global_step} but no {DHNM_STATE_NAME} (or {LEGACY_DHNM_STATE_NAME}) was "
            f"found in {candidates}; pass "
            "resume_from_checkpoint=<checkpoint folder> to DHNMCallback"
        )


class FalseNegativeCountCallback(TrainerCallback):
    """Log how many in-batch false negatives :class:`conan_hf.losses.InfoNCELoss` masked.

    ``on_step_end`` pops each InfoNCE loss's count (:meth:`~conan_hf.losses.InfoNCELoss.pop_masked_false_negatives`)
    and sums it over ranks (``all_gather_object``, so every rank holds the same numbers); ``on_log`` adds the count
    since the previous log as ``infonce_false_negatives_masked`` to the training log. :attr:`total` is the running
    total; it is saved as ``false_negatives_state.json`` in each checkpoint and restored on resume (a checkpoint
    without the file, e.g. from an older run, restarts the total at 0 with a warning: it is a statistic only).

    Args:
        losses: the training losses (InfoNCE losses, possibly wrapped in MatryoshkaLoss; others are ignored: see
            :class:`~conan_hf.dhnm.contract.FalseNegativeCountSource`).
    """

    LOG_KEY = "infonce_false_negatives_masked"

    def __init__(self, losses: Sequence[torch.nn.Module] | torch.nn.Module) -> None:
        losses = [losses] if isinstance(losses, torch.nn.Module) else list(losses)
        self.sources: list[FalseNegativeCountSource] = false_negative_sources(losses)
        self.total = 0
        self._since_log = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        folder = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else os.path.join(
            args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, FALSE_NEGATIVES_STATE_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.total = int(json.load(f)["total"])
        else:
            logger.warning("no %s in %s: the count of masked false negatives restarts at 0", FALSE_NEGATIVES_STATE_NAME,
                           folder)

    def on_step_end(self, args, state, control, **kwargs):
        local = sum(source.pop_masked_false_negatives() for source in self.sources)
        (counts,) = _all_gather_arrays((np.array([local], dtype=np.int64),))
        self.total += int(counts.sum())
        self._since_log += int(counts.sum())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        logs[self.LOG_KEY] = self._since_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.LOG_KEY] = self._since_log
        self._since_log = 0

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            path = os.path.join(checkpoint, FALSE_NEGATIVES_STATE_NAME)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"global_step": state.global_step, "total": self.total}, f)
            os.replace(path + ".tmp", path)


def _pad(array: np.ndarray, width: int, value: float) -> np.ndarray:
    """Right-pad a 2-D array to ``width`` columns with ``value``."""
    if array.ndim == 1:
        array = array.reshape(-1, 0) if array.size == 0 else array[:, None]
    if array.shape[1] >= width:
        return array
    pad = np.full((array.shape[0], width - array.shape[1]), value, dtype=array.dtype)
    return np.concatenate([array, pad], axis=1)
