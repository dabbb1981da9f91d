"""Stage configs: one dataclass per stage whose field defaults are the paper's (App. A), shipped YAML files, presets
and command-line flags.

A stage is ``config → datasets → Trainer → output_dir/final``. Each stage module defines a dataclass of its options
(subclassing :class:`StageConfig`), a ``run(config)`` function and a ``main()`` that parses::

    accelerate launch -m conan_hf.stages.pretrain --config trainers/configs/pretrain.yaml --preset tiny --max_steps 50

Every dataclass field is also a command-line flag (``--max_steps 50``); ``--help`` lists them with their defaults and
meanings. Precedence (later wins): dataclass defaults ← the stage's shipped YAML ← ``--preset`` ← the values your own
YAML changes ← command-line flags (see :func:`load_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from conan_hf.errors import DataError, OneLineArgumentParser
from conan_hf.training.distributed import distributed_kwargs

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "stages" / "configs"

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
    >>> from conan_hf.training.config import load_config
    >>> from conan_hf.stages.pretrain import PretrainConfig
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
        prog=f"conan-train {stage}", description=description,
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


