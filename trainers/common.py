"""What every training stage shares: YAML configs with paper defaults, output folders, crash-safe checkpoints and
resume, seeding, and the Accelerate / DeepSpeed set-up.

A stage is ``config → datasets → Trainer → output_dir/final``. Each stage module defines a dataclass of its options
(subclassing :class:`StageConfig`, whose field defaults are the paper's, App. A), a ``run(config)`` function and a
``main()`` that parses::

    accelerate launch -m trainers.pretrain --config trainers/configs/pretrain.yaml --preset tiny --max_steps 50

Every dataclass field is also a command-line flag (``--max_steps 50``); ``--help`` lists them with their defaults and
meanings. Precedence (later wins): dataclass defaults ← the stage's shipped YAML ← ``--preset`` ← the values your own
YAML changes ← command-line flags (see :func:`load_config`).

Checkpoints are the Trainer's ``output_dir/checkpoint-N`` folders. The Trainer writes them in place, so a process killed
mid-save leaves a half-written folder; :class:`CheckpointCommitCallback` therefore writes a commit marker once every
rank has finished saving, and :func:`latest_checkpoint` only ever resumes from committed checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback

from conan_hf.errors import DataError, DataFileNotFoundError, OneLineArgumentParser

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Written into ``checkpoint-N`` after every rank finished saving it; a checkpoint without it is incomplete.
COMMIT_MARKER = "checkpoint_complete.json"
#: Written last into each stage's final directory: the stage name, its config and its training summary.
STAGE_RECORD = "conan_stage.json"
#: ``resume`` values that start over.
NO_RESUME = ("no", "never", "false", "False", "", None)

C = TypeVar("C", bound="StageConfig")


@dataclasses.dataclass
class StageConfig:
    """Options shared by all training stages. Defaults follow the paper's setup (App. A) where it states one.

    Args:
        output_dir: checkpoints go to ``output_dir/checkpoint-N``, the finished model to ``final_dir``.
        final_dir: where the finished model is written (default ``output_dir/final``); the next stage reads it.
        resume: ``"auto"`` resumes from the latest complete checkpoint in ``output_dir`` if there is one (and skips
            the stage when ``final_dir`` already holds its result for the same options), ``"no"`` starts over, or a
            path to a checkpoint folder.
        seed: seed of every random number generator (python, numpy, torch) and of the data order.
        max_steps: stop after this many optimizer steps (``-1``: run ``num_train_epochs`` epochs).
        num_train_epochs: passes over the training data (when ``max_steps`` is ``-1``).
        per_device_train_batch_size: examples per batch on each device.
        gradient_accumulation_steps: batches accumulated per optimizer step.
        learning_rate: peak AdamW learning rate.
        warmup_ratio: linear warm-up over this fraction of the total optimizer steps.
        weight_decay: AdamW weight decay.
        lr_scheduler_type: learning-rate schedule after warm-up (transformers' names: ``linear``, ``cosine``, ...).
        max_grad_norm: gradient clipping norm.
        bf16: bfloat16 mixed precision (the paper's setting on GPU/NPU).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        deepspeed: a DeepSpeed config (path to a JSON file, or a dict) for the HF Trainer; ``None`` leaves the choice
            to ``accelerate launch --config_file ...`` (see ``trainers/configs/accelerate/``).
        save_steps: write a checkpoint every this many steps.
        save_total_limit: checkpoints kept (at least 2, so a crash while saving leaves an intact one).
        logging_steps: log the loss every this many steps.
        dataloader_num_workers: data-loading worker processes (0: in the main process).
        report_to: experiment tracker of the Trainer (``none``, ``tensorboard``, ``wandb``, ...).
        disable_tqdm: hide the progress bar.
        num_threads: CPU threads for torch (``None``: torch's default). The tiny presets use 1: a model of a few
            million parameters gains nothing from more, and multi-threaded kernels slow down sharply (30x measured)
            when other processes share the cores.
    """

    output_dir: str = "runs/stage"
    final_dir: str | None = None
    resume: str = "auto"
    seed: int = 42
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: Any = None
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    report_to: str = "none"
    disable_tqdm: bool = False
    num_threads: int | None = None

    #: Options that do not change what is trained; a checkpoint made with other values still resumes.
    RUN_ONLY_OPTIONS = ("resume", "final_dir", "save_steps", "save_total_limit", "logging_steps", "report_to",
                        "disable_tqdm", "dataloader_num_workers", "num_threads")

    def fingerprint(self) -> str:
        """Hash of the options that define the training run (all but `RUN_ONLY_OPTIONS`)."""
        return config_fingerprint(dataclasses.asdict(self), self.RUN_ONLY_OPTIONS)

    @property
    def final_path(self) -> Path:
        return Path(self.final_dir) if self.final_dir else Path(self.output_dir) / "final"

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `TrainingArguments` (or sentence-transformers' subclass)."""
        if not 0 <= self.warmup_ratio < 1:
            raise DataError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", hint="fix the stage config")
        kwargs = dict(
            output_dir=self.output_dir,
            seed=self.seed,
            data_seed=self.seed,
            max_steps=self.max_steps,
            num_train_epochs=self.num_train_epochs,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            # transformers 5 takes a float in [0, 1) as a ratio of the total steps.
            warmup_steps=float(self.warmup_ratio),
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            max_grad_norm=self.max_grad_norm,
            bf16=self.bf16,
            gradient_checkpointing=self.gradient_checkpointing,
            save_strategy="steps",
            save_steps=self.save_steps,
            # Keep at least two: if a crash hits while the newest is being written, the previous one is intact.
            save_total_limit=max(2, self.save_total_limit) if self.save_total_limit else None,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            dataloader_num_workers=self.dataloader_num_workers,
            report_to=self.report_to,
            disable_tqdm=self.disable_tqdm,
            # Not `restore_callback_states_from_checkpoint`: it re-creates callbacks and appends them after the commit
            # callback. Our callbacks (soft mask, DHNM) save and reload their own state files in the checkpoint.
        )
        kwargs.update(distributed_kwargs(self.deepspeed))
        return kwargs


def config_fingerprint(values: dict[str, Any], run_only: Sequence[str] = StageConfig.RUN_ONLY_OPTIONS) -> str:
    """`StageConfig.fingerprint` of a config given as a dict (e.g. the ``config`` of a stage record read back)."""
    import hashlib

    kept = {k: v for k, v in values.items() if k not in run_only}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- configs ---------------------------------------------------------------------------------------------------------
def default_config_path(stage: str) -> Path:
    return CONFIG_DIR / f"{stage}.yaml"


def _read_yaml_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level values, presets) of a stage YAML file."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise DataError(f"a stage config must be a YAML mapping, got {type(loaded).__name__}", where=str(path),
                        hint="write `key: value` lines")
    presets = loaded.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise DataError("`presets` must map preset names to option mappings", where=str(path),
                        hint="write `presets: {tiny: {key: value}}`")
    return loaded, presets


def load_config(
    cls: type[C],
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    stage: str | None = None,
) -> C:
    """Build a stage config from its dataclass, the stage's YAML files, a preset and ``overrides``.

    Precedence, later wins::

        dataclass defaults ← shipped YAML (trainers/configs/<stage>.yaml) ← presets[preset] ← your YAML ← overrides

    The shipped YAML's top-level values are the paper's defaults and a preset (``tiny``) shrinks them, so the preset
    must win over them; but a value *you* wrote must win over the preset. "Your" values are the top-level keys of
    ``path`` whose value differs from the shipped file's (or that the shipped file does not have). Hence:

    - the shipped file itself (or a verbatim copy) + ``--preset tiny`` gives the tiny values;
    - a YAML of your own with ``max_steps: 7`` (or a copy of the shipped file where you changed ``learning_rate``)
      + ``--preset tiny`` keeps your 7 (your learning rate) and takes the rest of the preset;
    - a value equal to the shipped file's counts as the paper default, so the preset still replaces it.

    The preset comes from ``path`` when that file defines it, else from the shipped file. ``stage`` names the shipped
    file; without it, it is the one in ``trainers/configs`` with the same file name as ``path``, if any (a file with
    no shipped counterpart is its own base: its preset overrides its top-level values). ``overrides`` (command-line
    flags, the main job's hand-off paths) win over everything. Preset values that lose to yours are logged.

    Raises a `DataError` naming the file and the key for unknown keys or presets, so a typo never goes unnoticed.

    Example:

    ```python
    >>> from trainers.common import load_config
    >>> from trainers.pretrain import PretrainConfig
    >>> cfg = load_config(PretrainConfig, "trainers/configs/pretrain.yaml", preset="tiny", overrides={"max_steps": 5})
    ```
    """
    values: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        user_values, user_presets = _read_yaml_config(path)
        shipped_path = default_config_path(stage) if stage else CONFIG_DIR / Path(path).name
        shipped_values: dict[str, Any] = {}
        shipped_presets: dict[str, Any] = {}
        if shipped_path.is_file() and shipped_path.resolve() != Path(path).resolve():
            shipped_values, shipped_presets = _read_yaml_config(shipped_path)
            mine = {k for k, v in user_values.items() if k not in shipped_values or shipped_values[k] != v}
        else:
            mine = set()  # the shipped file itself, or a file with no shipped counterpart: the preset refines it
        values.update(shipped_values)
        values.update(user_values)
        if preset is not None:
            presets = user_presets if preset in user_presets else shipped_presets
            if preset not in presets:
                available = sorted(set(user_presets) | set(shipped_presets))
                raise DataError(f"no preset {preset!r}", where=str(path),
                                hint=f"choose one of {available or 'none'}")
            kept = {}
            for key, value in (presets[preset] or {}).items():
                if key in mine:
                    kept[key] = (user_values[key], value)
                else:
                    values[key] = value
            if kept:
                logger.warning("%s: your values win over preset %r: %s", path, preset,
                               ", ".join(f"{k}={mine_value!r} (preset: {p!r})" for k, (mine_value, p) in kept.items()))
    elif preset is not None:
        raise DataError(f"preset {preset!r} needs a config file", hint="pass --config FILE")
    values.update(overrides or {})
    return config_from_dict(cls, values, source)


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "<dict>") -> C:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DataError(f"unknown key(s) {unknown} for {cls.__name__}", where=source,
                        hint=f"valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], value, f"{source}: {name}") for name, value in values.items()})


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert command-line strings and YAML oddities (``1e-4`` is a string to PyYAML) to the field's type."""
    if value is None:
        return None
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    if type(None) in options and isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    for option in options:
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option in (int, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return option(value)
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    continue
                if option is int and not number.is_integer():
                    continue
                return option(number)
        elif option is str and isinstance(value, str):
            return value
    if any(typing.get_origin(o) in (list, dict) or o in (list, dict, Any) for o in options):
        if isinstance(value, str):
            import yaml

            return yaml.safe_load(value)
        return value
    if str in options:
        return str(value)
    raise DataError(f"cannot read {value!r} as {hint}", where=where, hint="fix the value")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from the ``Args:`` sections of the docstrings of ``cls`` and its bases (a subclass's entry
    wins). An entry is ``name: text`` with continuation lines indented deeper; ``a: ...; b: ...`` on one line documents
    two fields."""
    import re

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = inspect.cleandoc(klass.__dict__.get("__doc__") or "").splitlines()
        if "Args:" not in [line.strip() for line in lines]:
            continue
        start = [line.strip() for line in lines].index("Args:") + 1
        entry_indent: int | None = None
        current: str | None = None
        for line in lines[start:]:
            if not line.strip():
                current = None
                continue
            indent = len(line) - len(line.lstrip())
            if entry_indent is None:
                entry_indent = indent
            if indent < entry_indent:
                break
            match = re.match(r"(\w+):\s*(.*)", line.strip())
            if indent == entry_indent and match:
                current = match.group(1)
                docs[current] = match.group(2)
            elif current is not None:
                docs[current] += " " + line.strip()
    for name, text in list(docs.items()):  # "temperature: InfoNCE τ; cosent_scale: CoSENT's scale"
        parts = re.split(r";\s+(\w+):\s+", text)
        if len(parts) > 1 and all(p in names for p in parts[1::2]):
            docs[name] = parts[0]
            docs.update(dict(zip(parts[1::2], parts[2::2])))
    return docs


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _show(value: Any) -> str:
    """A value as YAML/JSON would write it on the command line (lists, mappings and multi-line strings quoted)."""
    if isinstance(value, (dict, list)) or (isinstance(value, str) and "\n" in value):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def parse_config(cls: type[C], stage: str, argv: list[str] | None = None, description: str | None = None) -> C:
    """Command line of a stage: ``--config FILE --preset NAME`` plus one ``--<field> VALUE`` flag per option.

    ``--help`` lists every option with its meaning (from the dataclass docstrings), the value the shipped YAML gives
    it and what the ``tiny`` preset changes. Values are read as the field's type (YAML syntax for lists and mappings:
    ``--lora '{r: 8}'``).
    """
    shipped = default_config_path(stage)
    shipped_values, shipped_presets = _read_yaml_config(shipped) if shipped.is_file() else ({}, {})
    tiny = shipped_presets.get("tiny") or {}
    parser = OneLineArgumentParser(
        prog=f"python -m trainers.{stage}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence (later wins): dataclass defaults <- the shipped YAML <- --preset <- the values your own "
               "--config file changes <- these flags.")
    parser.add_argument("--config", default=str(shipped), help="stage YAML (default: %(default)s)")
    parser.add_argument("--preset", default=None,
                        help=f"a preset of the YAML file: {', '.join(sorted(shipped_presets)) or 'none shipped'}")
    docs = field_docs(cls)
    options = parser.add_argument_group("options (config keys; defaults are the shipped YAML's values)")
    for field in dataclasses.fields(cls):
        default = shipped_values.get(field.name, _field_default(field))
        text = docs.get(field.name, "").strip() or "(undocumented)"
        text += f" (default: {_show(default)}"
        if field.name in tiny:
            text += f"; --preset tiny: {_show(tiny[field.name])}"
        text += ")"
        options.add_argument(f"--{field.name}", dest=f"field__{field.name}", default=argparse.SUPPRESS,
                             metavar=field.name.upper(), help=text.replace("%", "%%"))
    args = parser.parse_args(argv)
    overrides = {k[len("field__"):]: v for k, v in vars(args).items() if k.startswith("field__")}
    return load_config(cls, args.config, args.preset, overrides, stage=stage)


# ---- distributed set-up -------------------------------------------------------------------------------------------
def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def distributed_kwargs(deepspeed: Any = None) -> dict[str, Any]:
    """`TrainingArguments` kwargs that pick DeepSpeed and the process group.

    DeepSpeed is used when ``deepspeed`` is given or ``accelerate launch`` was configured for it. On a machine without
    an accelerator (CPU tests, laptops) DeepSpeed communicates over gloo, but accelerate only counts the processes when
    it is told the backend, so the shared state is pre-configured with ``backend="gloo"`` and handed to the Trainer.
    """
    kwargs: dict[str, Any] = {"deepspeed": deepspeed}
    use_deepspeed = deepspeed is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if PartialState._shared_state and PartialState().distributed_type != DistributedType.DEEPSPEED:
            PartialState._reset_state()  # an earlier non-DeepSpeed state (e.g. the main job's); the group stays up
        PartialState(backend="gloo")
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def deepspeed_zero1_config(bf16: bool | str = "auto") -> dict[str, Any]:
    """The paper's DeepSpeed set-up: ZeRO stage 1 (optimizer states sharded), bf16; batch sizes from the Trainer."""
    return {
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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

    The marker records the config's `fingerprint`, so that a later run with different options does not silently
    continue this one (see `resolve_resume`)."""

    def __init__(self, fingerprint: str | None = None):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / COMMIT_MARKER, {"global_step": state.global_step, "time": time.time(),
                                                           "config_fingerprint": self.fingerprint})
        wait_for_everyone()
        return control


class MainProcessSaveMixin:
    """For sentence-transformers trainers: under DeepSpeed, `Trainer.save_model` calls `_save` on every rank, and
    sentence-transformers' `_save` writes unconditionally (it assumes rank 0), so all ranks would write the same
    files at once. Only the process that should save does."""

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
        saved = json.loads((found / COMMIT_MARKER).read_text(encoding="utf-8")).get("config_fingerprint")
        current = config.fingerprint() if hasattr(config, "fingerprint") else None
        if saved and current and saved != current:
            raise DataError(
                f"written by a run with different options (config fingerprint {saved} != {current}); "
                f"resuming it would continue that run", where=str(found),
                hint=f"start over with resume=no (main job: --set '*.resume=no'), use another output_dir, or resume "
                     f"it explicitly with resume={found}",
            )
        logger.warning("Resuming from %s", found)
        return str(found)
    path = Path(config.resume)
    if not (path / COMMIT_MARKER).is_file():
        raise DataError(f"resume={config.resume!r} is not a complete checkpoint folder (no {COMMIT_MARKER})",
                        hint="resume from a committed checkpoint-N folder, or use resume=auto / resume=no")
    return str(path)


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
        plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
        plugin = getattr(plugin, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            raise ValueError("the final export reads the in-memory weights, which ZeRO-3 shards across ranks; use "
                             "ZeRO stage 1 or 2 (the paper's set-up is ZeRO-1), or export_format: remote_code")
        if trainer.is_world_process_zero():
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
    trainer.add_callback(CheckpointCommitCallback(config.fingerprint()))
    return trainer.train(resume_from_checkpoint=resolve_resume(config))


#: What each stage reads from an earlier one: (its option, the module that writes it, that module's default output).
STAGE_INPUTS = {
    "pretrain": ("tokenizer", "tokenizer_stage", "runs/tokenizer"),
    "sft": ("model", "pretrain", "runs/pretrain/final"),
    "weak": ("model", "sft", "runs/sft/final"),
    "supervised": ("model", "weak", "runs/weak/final"),
}
#: Where the main job (examples/finetune.py, default --work-dir) writes the same folders.
MAIN_JOB_OUTPUTS = {"tokenizer_stage": "runs/finetune/tokenizer", "pretrain": "runs/finetune/pretrain/final",
                    "sft": "runs/finetune/sft/final", "weak": "runs/finetune/weak/final"}


class StageInputError(DataFileNotFoundError):
    """A stage's input folder (an earlier stage's output) does not exist; the message says how to make it. A
    `DataError`, so the stage command lines report it as one line with exit status 2 (`conan_hf.errors.cli_errors`)."""


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
    command = f"python -m trainers.{producer} --preset tiny"
    if Path(value) == Path(default_output):
        make = f"run `{command}` first (it writes {default_output})"
    else:
        make = f"make it with `{command} --output_dir ...`"
    hint = ""
    alternative = MAIN_JOB_OUTPUTS.get(producer)
    if alternative and Path(alternative).exists():
        hint = f"; the main job wrote one to {alternative}: --{option} {alternative}"
    raise StageInputError(f"{value} not found: {make}, or pass --{option} PATH{hint}")


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
    saved = record.get("config_fingerprint") or config_fingerprint(record.get("config") or {}, config.RUN_ONLY_OPTIONS)
    if saved != config.fingerprint():
        logger.warning("%s holds a result trained with other options; training again (it will be replaced)", final)
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
    `completed_stage`), else check that its input exists (see `check_stage_input`; ``check_input=False`` for a stage
    that reads its data first, so a bad data file is reported before a missing model) and return None."""
    if isinstance(config, StageConfig):
        done = completed_stage(config, number, stage)
        if done is not None:
            return done
    if check_input:
        check_stage_input(config, stage)
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


def setup_runtime(config: StageConfig) -> None:
    """Seed every RNG (python, numpy, torch) and apply ``num_threads``."""
    import torch
    from transformers import set_seed

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)


def print_main(*args, **kwargs) -> None:
    """`print` on the main process only (stage summaries under multi-process launches)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()


# ---- data sources ---------------------------------------------------------------------------------------------------
# A stage config lists its sources under ``data``; each entry is one of
#   - "demo": the stage's part of the embedded demo corpus (conan_hf.demo);
#   - a path or Hub dataset name, read by conan_hf.data.readers.load_rows (JSONL/CSV/TSV, SQuAD JSON, BEIR folders);
#   - a mapping {path: ..., columns: {wanted: source}, split: train, on_error: raise|skip, limit: N, ...}; other keys
#     go to conan_hf.data.readers.read_table (header, delimiter, format).
# Every row carries where it was read (conan_hf.data.readers.Row.location: "file:line" with the 1-based line of a
# JSONL file or the physical line of a CSV/TSV file, header included; "demo row N" for the demo corpus), and every
# message about a row names that place. Rows lacking a needed column, a text that is not a string, a score that is not
# a finite number, and a source without rows raise a DataError; with on_error: skip, rows that the reader cannot read
# are left out and counted in the log, never dropped silently.


def _as_list(sources: Any) -> list[Any]:
    if sources is None:
        return []
    if isinstance(sources, (str, dict)):
        return [sources]
    return list(sources)


def row_text(row: dict[str, Any], column: str, what: str, where: str | None = None, optional: bool = False) -> str:
    """The text in ``row[column]``, refusing anything that is not a string (a number or a list is not silently turned
    into text). A missing or ``None`` value is ``""`` when ``optional``, else an error. Errors name ``where``
    (default: the row's location)."""
    from conan_hf.errors import location_of

    where = location_of(row, where)
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{what}: no {column!r} column (the row has {sorted(row)})", where=where,
                        hint=f"map a source column to it with `columns: {{{column}: <source column>}}`")
    if not isinstance(value, str):
        raise DataError(f"{what}: column {column!r} must be a text, got {type(value).__name__} {value!r}", where=where,
                        hint="write it as a string in the data file (numbers and lists are not turned into text)")
    return value


def read_sources(
    sources: Any,
    demo: Callable[[], list[dict[str, Any]]],
    required: Sequence[str],
    numeric: Sequence[str] = (),
    what: str = "data",
    text: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rows from every source in ``sources``, each checked to have the ``required`` columns.

    Every row returned is a :class:`conan_hf.data.readers.Row` that knows where it was read (``row.location``).

    Args:
        sources: see the comment above.
        demo: returns the demo rows for ``"demo"``.
        required: columns every row must have (after the column mapping).
        numeric: columns converted to float (e.g. an STS ``score``); a value that is not a finite number (text,
            NaN, inf, a boolean) raises.
        what: used in messages (e.g. ``"stage 2 (SFT) data"``).
        text: columns holding texts; where a row has them (required ones always) they must be strings.

    Raises:
        DataError: naming the file and 1-based line (``"demo row N"`` for demo data) of the first bad row, or the
            source that has no rows.
    """
    from conan_hf.data.readers import Row
    from conan_hf.errors import finite_float, location_of

    rows: list[dict[str, Any]] = []
    entries = _as_list(sources)
    if not entries:
        raise DataError(f"{what}: no data sources given", hint="list files, folders, Hub names or 'demo' under `data:`")
    for entry in entries:
        if entry == "demo":
            name, part = "demo", [Row(r, f"demo row {index}") for index, r in enumerate(demo(), 1)]
            limit = None
        else:
            from conan_hf.data.readers import load_rows

            spec = {"path": entry} if isinstance(entry, str) else dict(entry)
            if "path" not in spec:
                raise DataError(f"{what}: a data source mapping needs a 'path' (file, folder or Hub name): {entry!r}",
                                hint="write `{path: FILE, columns: {...}}`")
            name = str(spec.pop("path"))
            limit = spec.pop("limit", None)
            part = load_rows(name, spec.pop("columns", None), **spec)
            if getattr(part, "num_skipped", 0):
                logger.warning("%s: skipped %d bad row(s) of %s (on_error=skip)", what, part.num_skipped, name)
        skipped = getattr(part, "num_skipped", 0)
        if limit is not None:
            part = part[: int(limit)]
        if not part:
            why = f"all {skipped} rows were bad and skipped" if skipped else "the source is empty"
            raise DataError(f"{what}: no rows ({why})", where=name,
                            hint="give a source with at least one row, or remove it from `data:`")
        for index, row in enumerate(part, 1):
            where = location_of(row, f"{name} row {index}")
            missing = [c for c in required if c not in row or row[c] is None]
            if missing:
                raise DataError(
                    f"{what}: no {missing} column (the row has {sorted(row)})", where=where,
                    hint=f"map the source's columns with `columns: "
                         f"{{{', '.join(f'{c}: <source column>' for c in missing)}}}`",
                )
            for column in text:
                if column in row and row[column] is not None:
                    row_text(row, column, what, where)
            for column in numeric:
                try:
                    row[column] = finite_float(row[column])
                except ValueError as error:
                    raise DataError(f"{what}: column {column!r}: {error}", where=where,
                                    hint="fix the value, or remove the row") from None
        logger.info("%s: %d rows from %s", what, len(part), name)
        rows.extend(part)
    return rows


def split_holdout(rows: list[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, held-out) split; ``fraction`` of the rows are held out (at least one if > 0)."""
    import random

    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
    held = set(order[:n_out])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---- embedding models -----------------------------------------------------------------------------------------------
def load_sentence_model(
    path: str,
    attention_mode: str | None = "bidirectional",
    pooling: str | None = None,
    max_seq_length: int = 512,
    prompts: dict[str, str] | None = None,
):
    """The embedding model a stage starts from, with its backbone in ``attention_mode``.

    ``path`` (a local folder or a Hub id) is either

    - a SentenceTransformer folder (a stage 3/4 output, or any sentence-transformers model such as all-MiniLM-L6-v2):
      loaded as saved, with its pooling (``pooling``, if given, must agree with it); or
    - a transformers model folder: a Conan decoder (stage 2 output), a stock decoder (Llama, Qwen2, Qwen3, Mistral,
      ... — its ``*ForCausalLM`` checkpoint works, the LM head is dropped) or an encoder (BERT-like). Its backbone is
      wrapped as Transformer → Pooling → Normalize with ``pooling`` (``None``: ``lasttoken`` for causal attention,
      else ``mean``).

    The backbone is put in ``attention_mode`` (see `conan_hf.backbones.set_attention_mode`: ``soft`` applies the soft
    mask to a stock decoder; encoders are bidirectional only); ``None`` keeps a SentenceTransformer's saved attention
    (evaluation of a finished model) and makes a bare model folder bidirectional. Stock backbones get right padding,
    the side on which their position numbering matches the unpadded sequence (last-token pooling handles either
    side). ``max_seq_length`` and ``prompts`` (added to any saved ones) are applied.
    """
    from sentence_transformers import SentenceTransformer

    from conan_hf.backbones import padding_side_for
    from conan_hf.sentence import build_sentence_transformer

    if _is_sentence_transformer_folder(path):
        # The installed conan_hf classes (registered with the Auto classes on import) rather than the folder's copy of
        # the remote code, so isinstance checks (soft-mask helpers) and fixes in the package apply.
        model = SentenceTransformer(path, trust_remote_code=False)
        saved = pooling_mode(model)
        if pooling is not None and saved is not None and saved != pooling:
            raise ValueError(f"{path} is a SentenceTransformer with {saved!r} pooling, but pooling={pooling!r} was "
                             f"asked for; set pooling: {saved} (or null) to keep the saved one")
        model.max_seq_length = max_seq_length
        if prompts:
            model.prompts = {**model.prompts, **prompts}
    else:
        attention_mode = attention_mode or "bidirectional"
        if pooling is None:
            pooling = "lasttoken" if attention_mode == "causal" else "mean"
        # attention_mode=None: a stock config must not receive Conan's `attention_mode` key (it would be saved).
        model = build_sentence_transformer(path, pooling=pooling, prompts=prompts, max_seq_length=max_seq_length,
                                           attention_mode=None)
    if attention_mode is not None:
        set_attention_mode(model, attention_mode)
    decoder = backbone(model)
    side = padding_side_for(decoder)
    if side is not None and model.tokenizer is not None and model.tokenizer.padding_side != side:
        logger.info("%s: padding side %s -> %s (stock position numbering)", path, model.tokenizer.padding_side, side)
        model.tokenizer.padding_side = side
    logger.info("%s: %s", path, describe_attention(model)["line"])
    return model


def _is_sentence_transformer_folder(path: str) -> bool:
    """A local folder with ``modules.json``, or a Hub repository that has one."""
    if Path(path).is_dir():
        return (Path(path) / "modules.json").is_file()
    if Path(path).exists():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers.utils import cached_file

        if isinstance(try_to_load_from_cache(path, "modules.json"), str):
            return True
        return cached_file(path, "modules.json", _raise_exceptions_for_missing_entries=False) is not None
    except Exception:  # not a Hub id, or offline without a cached copy: treat it as a transformers model
        return False


def pooling_mode(model) -> str | None:
    """The pooling mode of a SentenceTransformer's Pooling module (None without one)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    for module in model:
        if isinstance(module, Pooling):
            mode = module.pooling_mode
            return mode if isinstance(mode, str) else "+".join(mode)
    return None


def describe_attention(model) -> dict[str, Any]:
    """The backbone, its attention mode (and how it is set), pooling and padding side, with a one-line summary."""
    from conan_hf.backbones import backbone_kind, get_attention_mode

    decoder = backbone(model)
    kind, mode = backbone_kind(decoder), get_attention_mode(decoder)
    how = {"conan": f"ConanConfig.attention_mode={mode!r}",
           "decoder": f"transformers' config.is_causal={mode == 'causal'}",
           "encoder": "encoder, always bidirectional"}[kind]
    if mode == "soft":
        how = (f"eq.4 soft mask through {'ConanConfig' if kind == 'conan' else 'conan_hf.apply_soft_mask'}, "
               "α from 0 = causal to 1 = bidirectional")
    info = {"backbone": type(decoder).__name__, "kind": kind, "model_type": getattr(decoder.config, "model_type", None),
            "attention_mode": mode, "pooling": pooling_mode(model),
            "padding_side": model.tokenizer.padding_side if model.tokenizer is not None else None}
    info["line"] = (f"backbone {info['backbone']} ({kind}, model_type={info['model_type']!r}): {mode} attention "
                    f"({how}), {info['pooling']} pooling, padding {info['padding_side']}")
    return info


def backbone(model):
    """The transformers model inside a SentenceTransformer (its first module's ``auto_model``)."""
    return model[0].auto_model


def set_attention_mode(model, mode: str) -> None:
    """Switch the backbone of a SentenceTransformer between causal / bidirectional / soft attention: a Conan backbone
    through its ``attention_mode``, a stock decoder through transformers' ``config.is_causal`` (and the soft-mask
    wrapper for ``soft``); an encoder is bidirectional only (see `conan_hf.backbones.set_attention_mode`)."""
    from conan_hf.backbones import set_attention_mode as set_backbone_attention_mode

    set_backbone_attention_mode(backbone(model), mode)
