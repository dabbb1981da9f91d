"""Stage configs: one dataclass per stage, each field defined once with its type, default (the paper's, App. A) and
help text (``metadata={"help": ...}``, see :func:`option`); shipped YAML files with overrides and presets; flags.

Every field is also a command-line flag (``--max_steps 50``; ``--max-steps`` is accepted too), and ``--help`` lists
them with their meaning and defaults::

    accelerate launch -m conan_hf.stages pretrain --preset tiny --max_steps 50

Precedence (later wins): dataclass defaults <- the stage's shipped YAML <- ``--preset`` <- the keys your own YAML
sets <- command-line flags (see :func:`load_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from conan_hf.errors import DataError, OneLineArgumentParser
from conan_hf.training.distributed import distributed_kwargs

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "stages" / "configs"

C = TypeVar("C", bound="StageConfig")

#: ``report_to`` trackers → the modules that provide them (any one is enough), checked by
#: :meth:`StageConfig.check_report_to`; and the package extra that installs a tracker, where there is one.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                   "codecarbon": ("codecarbon",), "trackio": ("trackio",), "swanlab": ("swanlab",)}
TRACKER_EXTRAS = {"tensorboard": "tensorboard"}


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None) -> Any:
    """A config field: its default (or ``factory`` for a mutable one) and its ``--help`` text (``metadata["help"]``).

    Example:
        >>> @dataclasses.dataclass
        ... class MyConfig:
        ...     seq_length: int = option(2048, help="tokens per packed block")
    """
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def override(base: type, name: str, default: Any = dataclasses.MISSING, *,
             factory: Callable[[], Any] | None = None) -> Any:
    """A subclass's own default for field ``name`` of ``base``, keeping the base field's help text (so the key's
    meaning is written once). Example: ``learning_rate: float = override(StageConfig, "learning_rate", 2e-5)``."""
    inherited = {f.name: f for f in dataclasses.fields(base)}[name]
    return option(default, help=inherited.metadata["help"], factory=factory)


def field_help(field: dataclasses.Field) -> str:
    """The ``--help`` text of a config field (its ``metadata["help"]``)."""
    return field.metadata.get("help", "")


@dataclasses.dataclass
class StageConfig:
    """Options shared by all training stages; the defaults are the paper's setup (App. A) where it states one, and
    each field's ``metadata["help"]`` says what it means (``conan-train <stage> --help`` lists them)."""

    output_dir: str = option("runs/stage", help="checkpoints go to ``output_dir/checkpoint-N``, the finished model to "
                                                "``final_dir``.")
    final_dir: str | None = option(None, help="where the finished model is written (default ``output_dir/final``); "
                                              "the next stage reads it.")
    resume: str = option("auto", help="``auto`` resumes from the latest complete checkpoint in ``output_dir`` if "
                                      "there is one (and skips the stage when ``final_dir`` already holds its result "
                                      "for the same options), ``no`` starts over, or a path to a checkpoint folder.")
    seed: int = option(42, help="seed of every random number generator (python, numpy, torch) and of the data "
                                "order.")
    max_steps: int = option(-1, help="stop after this many optimizer steps (``-1``: run ``num_train_epochs`` "
                                     "epochs).")
    num_train_epochs: float = option(1.0, help="passes over the training data (when ``max_steps`` is ``-1``).")
    per_device_train_batch_size: int = option(8, help="examples per batch on each device.")
    gradient_accumulation_steps: int = option(1, help="batches accumulated per optimizer step.")
    learning_rate: float = option(1e-4, help="peak AdamW learning rate (App. A: 1e-4 for pre-training, and the same "
                                             "for stages 3 and 4).")
    warmup_ratio: float = option(0.05, help="linear warm-up over this fraction of the total optimizer steps (App. A: "
                                            "5%).")
    weight_decay: float = option(0.001, help="AdamW weight decay (App. A: 0.001).")
    lr_scheduler_type: str = option("cosine", help="learning-rate schedule after warm-up (transformers' names: "
                                                   "``linear``, ``cosine``, ...; the paper states none).")
    max_grad_norm: float = option(1.0, help="gradient clipping norm.")
    bf16: bool = option(True, help="bfloat16 mixed precision (the paper's setting on GPU/NPU).")
    fp16: bool = option(False, help="float16 mixed precision, for GPUs without bfloat16 (V100, T4); with "
                                    "``bf16: false`` (``--fp16 true --bf16 false``).")
    gradient_checkpointing: bool = option(True, help="recompute activations in the backward pass to save memory.")
    deepspeed: Any = option(None, help="a DeepSpeed config (path to a JSON file, or a dict) for the HF Trainer; "
                                       "``None`` leaves the choice to ``accelerate launch --config_file ...`` (see "
                                       "``conan_hf/stages/configs/accelerate/``).")
    save_steps: int = option(1000, help="write a checkpoint every this many steps.")
    save_total_limit: int = option(2, help="checkpoints kept (at least 2, so a crash while saving leaves an intact "
                                           "one).")
    logging_steps: int = option(10, help="log the loss every this many steps.")
    dataloader_num_workers: int = option(0, help="data-loading worker processes (0: in the main process).")
    report_to: str = option("none", help="experiment tracker of the Trainer (``none``, ``tensorboard``, ``wandb``, "
                                         "...; ``tensorboard`` needs ``pip install conan-hf[tensorboard]``).")
    disable_tqdm: bool = option(False, help="hide the progress bar.")
    num_threads: int | None = option(None, help="CPU threads for torch (``None``: torch's default). The tiny presets "
                                                "use 1: a model of a few million parameters gains nothing from more, "
                                                "and multi-threaded kernels slow down sharply (30x measured) when "
                                                "other processes share the cores.")
    push_to_hub: bool = option(False, help="the Trainer pushes to the Hugging Face Hub repo ``hub_model_id`` as it "
                                           "saves (the model files in ``output_dir``; needs ``huggingface-cli "
                                           "login``). The finished model in ``final_dir`` is yours to push: "
                                           "``SentenceTransformer(final_dir).push_to_hub(hub_model_id)``.")
    hub_model_id: str | None = option(None, help="the Hub repo (``NAME`` or ``OWNER/NAME``) for ``push_to_hub``; "
                                                 "also the model id in the title and usage of the model card.")
    hub_private_repo: bool | None = option(None, help="create the Hub repo as private (``None``: the Hub account's "
                                                      "default).")

    #: Options that do not change what is trained; a checkpoint made with other values still resumes.
    RUN_ONLY_OPTIONS = ("resume", "final_dir", "save_steps", "save_total_limit", "logging_steps", "report_to",
                        "disable_tqdm", "dataloader_num_workers", "num_threads", "push_to_hub", "hub_model_id",
                        "hub_private_repo")
    #: Options that enter the fingerprint only when they differ from these values, so that a run which does not use
    #: them has the fingerprint of a config without them.
    FINGERPRINT_IF_SET: typing.ClassVar[dict[str, Any]] = {"fp16": False}

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise DataError("--fp16 and --bf16 are both on", hint="choose one mixed precision: --fp16 true --bf16 "
                                                                  "false, or leave --fp16 off")

    def check_report_to(self) -> None:
        """Refuse, before anything is loaded, a ``report_to`` tracker whose package is not installed (the Trainer
        would fail only after the data and model are loaded), naming the option and what to install."""
        names = [n.strip() for n in str(self.report_to or "none").split(",") if n.strip()]
        for name in names:
            modules = TRACKER_MODULES.get(name)
            if modules and not any(importlib.util.find_spec(module) for module in modules):
                extra = TRACKER_EXTRAS.get(name)
                install = f"pip install 'conan-hf[{extra}]'" if extra else f"pip install {modules[0]}"
                raise DataError(f"{name} is not installed", where=f"--report_to {self.report_to}",
                                hint=f"{install}, or pass --report_to none")

    def fingerprint(self) -> str:
        """Hash of the options that define the training run (all but `RUN_ONLY_OPTIONS`, and the
        `FINGERPRINT_IF_SET` ones only when set)."""
        return config_fingerprint(dataclasses.asdict(self), self.RUN_ONLY_OPTIONS, self.FINGERPRINT_IF_SET)

    @property
    def final_path(self) -> Path:
        return Path(self.final_dir) if self.final_dir else Path(self.output_dir) / "final"

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `TrainingArguments` (or sentence-transformers' subclass). No side effects: the
        process state they refer to (DeepSpeed over gloo on CPU) is set up by
        :func:`conan_hf.training.distributed.configure_process_state`, the runner's runtime-setup step."""
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
            fp16=self.fp16,
            **{checkpointing_argument(): self.gradient_checkpointing},
            save_strategy="steps",
            save_steps=self.save_steps,
            # Keep at least two: if a crash hits while the newest is being written, the previous one is intact.
            save_total_limit=max(2, self.save_total_limit) if self.save_total_limit else None,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            dataloader_num_workers=self.dataloader_num_workers,
            report_to=self.report_to,
            disable_tqdm=self.disable_tqdm,
            push_to_hub=self.push_to_hub,
            hub_model_id=self.hub_model_id,
            hub_private_repo=self.hub_private_repo,
            # Not `restore_callback_states_from_checkpoint`: it re-creates callbacks and appends them after the commit
            # callback. Our callbacks (soft mask, DHNM) save and reload their own state files in the checkpoint.
        )
        kwargs.update(distributed_kwargs(self.deepspeed))  # pure: the process state is set up by the runner
        return kwargs


def config_fingerprint(values: dict[str, Any], run_only: Sequence[str] = StageConfig.RUN_ONLY_OPTIONS,
                       if_set: dict[str, Any] | None = None) -> str:
    """`StageConfig.fingerprint` of a config given as a dict (e.g. the ``config`` of a stage record read back):
    a hash of ``values`` without the ``run_only`` keys and without the ``if_set`` keys whose value is the one given
    there (default: `StageConfig.FINGERPRINT_IF_SET`)."""
    import hashlib

    unset = StageConfig.FINGERPRINT_IF_SET if if_set is None else if_set
    kept = {k: v for k, v in values.items() if k not in run_only and not (k in unset and v == unset[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def checkpointing_argument() -> str:
    """The `TrainingArguments` field that turns activation (gradient) checkpointing on: ``activation_checkpointing``
    where the installed transformers has it (``gradient_checkpointing`` is then a deprecated alias that warns), else
    ``gradient_checkpointing`` (e.g. transformers 5.2, the oldest that setup.cfg allows)."""
    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


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
    """Build a stage config from its dataclass, the stage's shipped YAML, a preset, your YAML and ``overrides``.

    Precedence, later wins::

        dataclass defaults <- shipped YAML (conan_hf/stages/configs/<stage>.yaml) <- presets[preset] <- your YAML
        <- overrides

    The dataclass holds the defaults (the paper's values); the shipped YAML holds only values that differ from them
    and its presets (``tiny``). ``path`` is your YAML: every key it sets wins over the preset (a value equal to the
    default included); a ``path`` that is the shipped file itself adds nothing over it. The preset comes from
    ``path`` when that file defines it, else from the shipped file. ``stage`` names the shipped file; without it,
    it is the one in ``conan_hf/stages/configs`` with the same file name as ``path``, if any. ``overrides``
    (command-line flags, the main job's hand-off paths) win over everything. Preset values that lose to yours are
    logged.

    Raises a `DataError` naming the file and the key for unknown keys or presets, so a typo never goes unnoticed.

    Example:

    ```python
    >>> from conan_hf.training.config import load_config
    >>> from conan_hf.stages.pretrain import PretrainConfig
    >>> cfg = load_config(PretrainConfig, "mine.yaml", preset="tiny", stage="pretrain", overrides={"max_steps": 5})
    ```
    """
    if path is None and stage is None and preset is not None:
        raise DataError(f"preset {preset!r} needs a config file", hint="pass --config FILE")
    shipped_path = default_config_path(stage) if stage else CONFIG_DIR / Path(path).name if path is not None else None
    shipped_values: dict[str, Any] = {}
    shipped_presets: dict[str, Any] = {}
    if shipped_path is not None and shipped_path.is_file():
        shipped_values, shipped_presets = _read_yaml_config(shipped_path)
    user_values: dict[str, Any] = {}
    user_presets: dict[str, Any] = {}
    if path is not None and not (shipped_path is not None and shipped_path.is_file()
                                 and shipped_path.resolve() == Path(path).resolve()):
        user_values, user_presets = _read_yaml_config(path)
    source = str(path if path is not None else shipped_path or "<defaults>")
    values = dict(shipped_values)
    if preset is not None:
        presets = user_presets if preset in user_presets else shipped_presets
        if preset not in presets:
            available = sorted(set(user_presets) | set(shipped_presets))
            raise DataError(f"no preset {preset!r}", where=source, hint=f"choose one of {available or 'none'}")
        chosen = presets[preset] or {}
        values.update(chosen)
        lost = {k: (user_values[k], v) for k, v in chosen.items() if k in user_values and user_values[k] != v}
        if lost:
            logger.warning("%s: your values win over preset %r: %s", path, preset,
                           ", ".join(f"{k}={mine!r} (preset: {p!r})" for k, (mine, p) in lost.items()))
    values.update(user_values)
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
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise DataError(f"cannot read {value!r} as {expected}", where=where, hint="fix the value")


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


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kwargs: Any) -> None:
    """Add ``--name`` (the documented spelling, underscores as in transformers) and ``--name-with-dashes`` (accepted,
    not listed in ``--help``) to ``parser``; both fill the same destination."""
    parser.add_argument(f"--{name}", **kwargs)
    if "_" in name:
        hidden = {k: v for k, v in kwargs.items() if k not in ("help", "metavar")}
        parser.add_argument(f"--{name.replace('_', '-')}", **hidden, help=argparse.SUPPRESS)


def parse_config(cls: type[C], stage: str, argv: list[str] | None = None, description: str | None = None) -> C:
    """Command line of a stage: ``--config FILE --preset NAME`` plus one ``--<field> VALUE`` flag per option
    (``--max_steps``; ``--max-steps`` is accepted too).

    ``--help`` lists every option with its meaning (the field's ``metadata["help"]``), its default (the dataclass's,
    or the shipped YAML's where it differs) and what the ``tiny`` preset changes. Values are read as the field's type
    (YAML syntax for lists and mappings: ``--lora '{r: 8}'``).
    """
    shipped = default_config_path(stage)
    shipped_values, shipped_presets = _read_yaml_config(shipped) if shipped.is_file() else ({}, {})
    tiny = shipped_presets.get("tiny") or {}
    parser = OneLineArgumentParser(
        prog=f"conan-train {stage}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence (later wins): dataclass defaults <- the shipped YAML <- --preset <- the keys your own "
               "--config file sets <- these flags. Flags are spelled with underscores (--max_steps); dashes "
               "(--max-steps) are accepted too.")
    parser.add_argument("--config", default=str(shipped), help="stage YAML (default: %(default)s)")
    parser.add_argument("--preset", default=None,
                        help=f"a preset of the YAML file: {', '.join(sorted(shipped_presets)) or 'none shipped'}")
    options = parser.add_argument_group("options (config keys)")
    for field in dataclasses.fields(cls):
        default = shipped_values.get(field.name, _field_default(field))
        text = field_help(field).strip() or "(undocumented)"
        text += f" (default: {_show(default)}"
        if field.name in tiny:
            text += f"; --preset tiny: {_show(tiny[field.name])}"
        text += ")"
        add_option(options, field.name, dest=f"field__{field.name}", default=argparse.SUPPRESS,
                   metavar=field.name.upper(), help=text.replace("%", "%%"))
    args = parser.parse_args(argv)
    hints = typing.get_type_hints(cls)
    # Read the flags as their fields' types here, so that a bad value is blamed on its flag, not on a YAML file.
    overrides = {name: _coerce(hints[name], value, f"--{name}")
                 for name, value in ((k[len("field__"):], v) for k, v in vars(args).items() if k.startswith("field__"))}
    return load_config(cls, args.config, args.preset, overrides, stage=stage)
