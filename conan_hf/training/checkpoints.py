"""A stage's life on disk: crash-safe checkpoints and resume, the final directory and its stage record, and the
checks that a stage's input (an earlier stage's output) exists.

Checkpoints are the Trainer's ``output_dir/checkpoint-N`` folders. The Trainer writes them in place, so a process killed
mid-save leaves a half-written folder; :class:`CheckpointCommitCallback` therefore writes a commit marker once every
rank has finished saving, and :func:`latest_checkpoint` only ever resumes from committed checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from conan_hf.errors import DataError, DataFileNotFoundError
from conan_hf.training.config import StageConfig, config_fingerprint
from conan_hf.training.distributed import is_main_process, print_main, wait_for_everyone

logger = logging.getLogger(__name__)

#: Written into ``checkpoint-N`` after every rank finished saving it; a checkpoint without it is incomplete.
COMMIT_MARKER = "checkpoint_complete.json"
#: Written last into each stage's final directory: the stage name, its config and its training summary.
STAGE_RECORD = "conan_stage.json"
#: ``resume`` values that start over.
NO_RESUME = ("no", "never", "false", "False", "", None)



# ---- checkpoints, resume, final directory ---------------------------------------------------------------------------
def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a torn write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointCommitCallback(TrainerCallback):
    """Marks a Trainer checkpoint complete once every rank has saved its part (weights, optimizer shards, RNG and
    callback states). Add it last, so it runs after callbacks that save their own state in ``on_save``.

    The marker records the config's `fingerprint` and values, so that a later run with different options does not
    silently continue this one, and is told which options differ (see `resolve_resume`)."""

    def __init__(self, fingerprint: str | None = None, config: dict[str, Any] | None = None):
        self.fingerprint, self.config = fingerprint, config

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / COMMIT_MARKER, {"global_step": state.global_step, "time": time.time(),
                                                           "config_fingerprint": self.fingerprint,
                                                           "config": self.config})
        wait_for_everyone()
        return control


def uses_zero3(trainer) -> bool:
    """Whether ``trainer`` runs under DeepSpeed ZeRO stage 3 (parameters sharded across ranks)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


class MainProcessSaveMixin:
    """For sentence-transformers trainers: under DeepSpeed, `Trainer.save_model` calls `_save` on every rank, and
    sentence-transformers' `_save` writes unconditionally (it assumes rank 0), so all ranks would write the same
    files at once. Only the process that should save does."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 every rank gathers the sharded parameters and rank 0 writes the full model (sentence-
        transformers' `_save` would write the local shards); otherwise the Trainer's own saving."""
        if not uses_zero3(self):
            return super().save_model(output_dir, _internal_call)
        import deepspeed

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                self.model.save_pretrained(output_dir, create_model_card=False)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        super()._save(output_dir, state_dict)


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-"):
        return None
    try:
        return int(name.split("-", 1)[1])
    except ValueError:
        return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The committed checkpoint with the highest step in ``output_dir``, or None.

    Folders without the commit marker (a save interrupted by a crash) are logged and ignored.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for folder in root.iterdir():
        step = _checkpoint_step(folder)
        if step is None or not folder.is_dir():
            continue
        if not (folder / COMMIT_MARKER).is_file():
            logger.warning("Ignoring incomplete checkpoint %s (no %s; interrupted while saving?)", folder,
                           COMMIT_MARKER)
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return None if best is None else best[1]


def resolve_resume(config: StageConfig) -> str | None:
    """The checkpoint to resume from according to ``config.resume``, as a string for `Trainer.train`."""
    if config.resume in NO_RESUME:
        return None
    if config.resume == "auto":
        found = latest_checkpoint(config.output_dir)
        if found is None:
            return None
        marker = json.loads((found / COMMIT_MARKER).read_text(encoding="utf-8"))
        saved = marker.get("config_fingerprint")
        current = config.fingerprint() if hasattr(config, "fingerprint") else None
        if saved and current and saved != current:
            changed = changed_options(marker.get("config"), config)
            what = changed or f"config fingerprint {saved} != {current}"
            raise DataError(
                f"written by a run with different options ({what}); resuming it would continue that run",
                where=str(found),
                hint=f"start over with --resume no (main job too), use another output_dir, or resume "
                     f"it explicitly with resume={found}",
            )
        return str(found)
    path = Path(config.resume)
    if not (path / COMMIT_MARKER).is_file():
        raise DataError(f"resume={config.resume!r} is not a complete checkpoint folder (no {COMMIT_MARKER})",
                        hint="resume from a committed checkpoint-N folder, or use resume=auto / resume=no")
    return str(path)


def changed_options(saved: dict[str, Any] | None, config: StageConfig) -> str:
    """The options that define the run (not `StageConfig.RUN_ONLY_OPTIONS`) whose value in ``config`` differs from
    ``saved`` (a config recorded by a checkpoint or stage record), as ``"learning_rate 0.0005 -> 0.001, ..."``;
    ``""`` when ``saved`` is not a recorded config."""
    if not isinstance(saved, dict):
        return ""
    current = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    names = sorted((set(saved) | set(current)) - set(config.RUN_ONLY_OPTIONS))
    return ", ".join(f"{name} {json.dumps(saved.get(name), ensure_ascii=False)} -> "
                     f"{json.dumps(current.get(name), ensure_ascii=False)}"
                     for name in names if saved.get(name) != current.get(name))


def clean_output_dir(config: StageConfig) -> None:
    """With ``resume="no"``, remove old checkpoints so `latest_checkpoint` never mixes two runs."""
    if config.resume in ("no", "never") and is_main_process():
        for folder in Path(config.output_dir).glob("checkpoint-*"):
            shutil.rmtree(folder, ignore_errors=True)
    wait_for_everyone()


def save_final(trainer, config: StageConfig, stage: str, summary: dict[str, Any] | None = None,
               write_model: Callable[[Path], Any] | None = None) -> Path:
    """Save the trained model (and tokenizer) into ``config.final_path`` atomically: a staging folder renamed
    into place, with the stage record written last. All ranks must call this (DeepSpeed gathers weights).

    ``write_model(folder)``, if given, writes the model instead of ``trainer.save_model`` (stage 4's export without
    custom code); it runs on the main process only, from the in-memory model, which holds every weight under
    DDP and DeepSpeed ZeRO-1/2 (ZeRO-3 shards the parameters themselves and is refused)."""
    final = config.final_path
    staging = final.with_name(f".{final.name}.staging")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    wait_for_everyone()
    if write_model is None:
        trainer.save_model(str(staging))
    else:
        if uses_zero3(trainer):
            import deepspeed

            # Training is over: drop ZeRO-3's module hooks (their collectives would wait for the other ranks while
            # rank 0 runs the export's probe), then gather every parameter in full for the export.
            trainer.model_wrapped.optimizer.destroy()
            with deepspeed.zero.GatheredParameters(list(trainer.model.parameters()), modifier_rank=None):
                if trainer.is_world_process_zero():
                    write_model(staging)
        elif trainer.is_world_process_zero():
            write_model(staging)
    wait_for_everyone()
    if trainer.is_world_process_zero():
        record = {"stage": stage, "config": dataclasses.asdict(config), "config_fingerprint": config.fingerprint(),
                  "summary": summary or {}}
        write_json_atomic(staging / STAGE_RECORD, record)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
    wait_for_everyone()
    return final


def train_with_resume(trainer, config: StageConfig):
    """`trainer.train`, resuming per ``config.resume``; the commit callback is added here so it runs last."""
    clean_output_dir(config)
    trainer.add_callback(CheckpointCommitCallback(config.fingerprint(), json.loads(json.dumps(
        dataclasses.asdict(config), default=str))))
    checkpoint = resolve_resume(config)
    if checkpoint is not None:
        logger.warning("Resuming from %s", checkpoint)
    return trainer.train(resume_from_checkpoint=checkpoint)


#: What each stage reads from an earlier one: (its option, the module that writes it, that module's default output).
STAGE_INPUTS = {
    "pretrain": ("tokenizer", "tokenizer", "runs/tokenizer"),
    "sft": ("model", "pretrain", "runs/pretrain/final"),
    "weak": ("model", "sft", "runs/sft/final"),
    "supervised": ("model", "weak", "runs/weak/final"),
}
#: Where the main job (examples/finetune.py, default --work_dir) writes the same folders.
MAIN_JOB_OUTPUTS = {"tokenizer": "runs/finetune/tokenizer", "pretrain": "runs/finetune/pretrain/final",
                    "sft": "runs/finetune/sft/final", "weak": "runs/finetune/weak/final"}


class StageInputError(DataFileNotFoundError):
    """A stage's input folder (an earlier stage's output) does not exist; the message says how to make it. A
    `DataError`, so the stage command lines report it as one line with exit status 2 (`conan_hf.errors.cli_errors`).

    Attributes:
        stage: the stage whose input is missing; option: its option naming the input; value: the missing path;
        producer: the stage that makes it.
    """

    def __init__(self, message: str, *, stage: str = "", option: str = "", value: str = "", producer: str = ""):
        super().__init__(message)
        self.stage, self.option, self.value, self.producer = stage, option, value, producer


def looks_local(value: str) -> bool:
    """Whether ``value`` is meant as a local path rather than a Hub id (``name`` or ``org/name``): it starts with
    ``.``, ``/`` or ``~``, has a backslash or more than one ``/``, or its first component is an existing folder."""
    text = str(value)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def check_stage_input(config: Any, stage: str) -> None:
    """Raise `StageInputError` when the stage's input (an earlier stage's output) is a missing local folder, saying
    which command makes it, instead of letting transformers try the Hub with a local path."""
    if stage not in STAGE_INPUTS:
        return
    option, producer, default_output = STAGE_INPUTS[stage]
    value = getattr(config, option, None)
    if not isinstance(value, (str, os.PathLike)) or Path(value).exists():
        return
    value = str(value)
    if not (looks_local(value) or value == default_output):
        return  # a Hub id: transformers / sentence-transformers resolve it
    command = f"conan-train {producer} --preset tiny"
    if Path(value) == Path(default_output):
        make = f"run `{command}` first (it writes {default_output})"
    else:
        make = f"make it with `{command} --output_dir ...`"
    hint = ""
    alternative = MAIN_JOB_OUTPUTS.get(producer)
    if alternative and Path(alternative).exists():
        hint = f"; the main job wrote one to {alternative}: --{option} {alternative}"
    raise StageInputError(f"{value} not found: {make}, or pass --{option} PATH{hint}", stage=stage, option=option,
                          value=value, producer=producer)


def read_stage_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The stage record (`STAGE_RECORD`) in ``folder``, or None if there is none or it is not valid JSON."""
    path = Path(folder) / STAGE_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def completed_stage(config: StageConfig, number: int, stage: str | None = None) -> dict[str, Any] | None:
    """The recorded summary if ``final_dir`` already holds this stage's result for the same options (the config
    fingerprint of its stage record) and its input (``stage``'s entry of `STAGE_INPUTS`) has not been written again
    since, else None. ``resume: no`` or an explicit checkpoint always trains."""
    if config.resume != "auto":
        return None
    final = config.final_path
    record = read_stage_record(final)
    if record is None:
        return None
    saved = record.get("config_fingerprint") or config_fingerprint(record.get("config") or {}, config.RUN_ONLY_OPTIONS,
                                                                   config.FINGERPRINT_IF_SET)
    if saved != config.fingerprint():
        changed = changed_options(record.get("config"), config)
        logger.warning("%s holds a result trained with other options%s; training again (it will be replaced)", final,
                       f" ({changed})" if changed else "")
        return None
    option = STAGE_INPUTS.get(stage or "", (None,))[0]
    source = Path(str(getattr(config, option, ""))) / STAGE_RECORD if option else None
    if source is not None and source.is_file() and source.stat().st_mtime > (final / STAGE_RECORD).stat().st_mtime:
        logger.warning("%s was trained from an older %s; training again (it will be replaced)", final, source.parent)
        return None
    print_main(f"[stage {number}] already done: {final} (delete it or pass --resume no to retrain)")
    return {**(record.get("summary") or {}), "final_dir": str(final)}


def start_stage(config: Any, stage: str, number: int, check_input: bool = True) -> dict[str, Any] | None:
    """What every stage's ``run`` does first: return the recorded summary when the stage is already done (see
    `completed_stage`), else check that its input exists (see `check_stage_input`) and that the checkpoint ``resume``
    asks for can be resumed (see `resolve_resume`), and return None. ``check_input=False`` skips both checks here for
    a stage that reads its data first, so that a bad data file is reported before a missing model or a refused
    resume."""
    if isinstance(config, StageConfig):
        done = completed_stage(config, number, stage)
        if done is not None:
            return done
    if check_input:
        check_stage_input(config, stage)
        if isinstance(config, StageConfig):
            resolve_resume(config)  # a checkpoint that cannot be resumed is refused before anything is loaded
    return None


@contextlib.contextmanager
def stage_exits(config: Any) -> Iterator[None]:
    """Around a stage's ``run`` on the command line: Ctrl-C ends with one line saying where the same command resumes
    (the latest committed checkpoint) and exit code 130, not a traceback. It composes with
    `conan_hf.errors.cli_errors` (one line and exit code 2 for a `DataError`, e.g. a missing input)."""
    try:
        yield
    except KeyboardInterrupt:
        output_dir = getattr(config, "output_dir", None)
        found = latest_checkpoint(output_dir) if isinstance(config, StageConfig) and output_dir else None
        if found is None:
            message = "interrupted; run the same command again to train from the start (no complete checkpoint yet)"
        elif getattr(config, "resume", "auto") in NO_RESUME:
            message = f"interrupted; run the same command with --resume auto to resume from {found}"
        else:
            message = f"interrupted; run the same command again to resume from {found}"
        print_main(message, file=sys.stderr)
        raise SystemExit(130) from None


def finish_stage(trainer, config: StageConfig, stage: str, number: int, result, note: str = "",
                 write_model: Callable[[Path], dict[str, Any] | None] | None = None, **summary: Any) -> dict[str, Any]:
    """Write the stage's final directory (with its record) and print its loss line; returns the summary.

    ``write_model``: see `save_final`; a dict it returns is recorded in the summary as ``"export"``."""
    losses = loss_history(trainer)
    summary = {"train_loss": result.training_loss, "losses": losses, "global_step": trainer.state.global_step,
               **summary}

    def write_and_record(folder: Path) -> None:
        report = write_model(folder)
        if report is not None:
            summary["export"] = report  # written into the record, which save_final writes after the model

    final = save_final(trainer, config, stage, summary, write_and_record if write_model else None)
    span = f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f}" if losses else "n/a"
    print_main(f"[stage {number}] loss {span} over {trainer.state.global_step} steps; {note}saved {final}")
    return {**summary, "final_dir": str(final)}


def loss_history(trainer) -> list[tuple[int, float]]:
    """``(step, loss)`` of every logged training step."""
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


