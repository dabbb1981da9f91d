"""The life of a training stage, written once: :class:`StageRunner`.

A stage is a small subclass that names itself (``stage``, ``number``, ``config_class``) and supplies its steps; the
runner calls them in this order::

    run():  start (skip when done) -> setup_runtime -> build_trainer -> train (resume) -> after_training -> finish
    build_trainer():  training_arguments -> load_datasets -> load_model -> create_trainer   (the default order)

- :meth:`StageRunner.start`: return the recorded summary when ``final_dir`` already holds this stage's result for
  the same options, else check that the stage's input exists (:func:`~conan_hf.training.checkpoints.start_stage`);
- :meth:`StageRunner.setup_runtime`: seeds, CPU threads, accelerate's process state (DeepSpeed over gloo on CPU);
- :meth:`StageRunner.build_trainer`: the stage's steps (model, datasets, losses, callbacks) → a Trainer; a stage
  whose steps depend on each other in another order overrides it and calls its steps itself;
- :meth:`StageRunner.train`: ``trainer.train`` resuming per ``config.resume``, the checkpoint-commit callback last;
- :meth:`StageRunner.finish`: the final directory, its stage record (``conan_stage.json``) and the summary line;
- :meth:`StageRunner.main`: the command line (``conan-train <stage>``): flags → config, one-line errors (exit 2),
  Ctrl-C → where to resume (exit 130).

Example (a stage of your own)::

    class MyRunner(StageRunner):
        stage, number, config_class = "mine", 5, MyConfig

        def load_datasets(self):
            return load_sources(self.config.data, ...)

        def load_model(self):
            return load_sentence_model(self.config.model)

        def create_trainer(self, model, datasets, args):
            return SentenceTransformerTrainer(model=model, args=args, train_dataset=datasets, loss=...)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from conan_hf.errors import cli_errors
from conan_hf.training.checkpoints import NO_RESUME, finish_stage, stage_exits, start_stage, train_with_resume
from conan_hf.training.config import StageConfig, parse_config
from conan_hf.training.distributed import configure_process_state, seed_everything
from conan_hf.training.streaming import is_streamed, stream_training_kwargs


class StageRunner:
    """One training stage: its config and its steps, run in the order described in the module docstring.

    Class attributes a stage sets:
        stage: its name (``"pretrain"``), which names its shipped YAML and its command line.
        number: its number in the paper's pipeline (0-4), shown in its messages.
        config_class: its config dataclass (a :class:`~conan_hf.training.config.StageConfig`).
        check_input_first: check that the input model exists before anything else (``False``: after reading the
            data, so that a bad data file is reported before a missing model).
        what: what its messages call its data.

    Args:
        config: the stage's options.
    """

    stage: ClassVar[str]
    number: ClassVar[int]
    config_class: ClassVar[type]
    check_input_first: ClassVar[bool] = True
    what: ClassVar[str] = "data"

    def __init__(self, config: Any):
        self.config = config

    # ---- the lifecycle ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train the stage (or return the recorded summary when it is already done); returns its summary with
        ``final_dir`` and the logged ``losses``."""
        done = self.start()
        if done is not None:
            return done
        self.setup_runtime()
        trainer = self.build_trainer()
        result = self.train(trainer)
        self.after_training(trainer)
        return self.finish(trainer, result)

    def start(self) -> dict[str, Any] | None:
        """The recorded summary if the stage is already done, else None (its input checked unless
        ``check_input_first`` is False); a ``report_to`` tracker that is not installed is refused first."""
        if isinstance(self.config, StageConfig):
            self.config.check_report_to()
        return start_stage(self.config, self.stage, self.number, check_input=self.check_input_first)

    def setup_runtime(self) -> None:
        """Seed every RNG, apply ``num_threads`` and set accelerate's process state up for the config's DeepSpeed
        (:func:`~conan_hf.training.distributed.configure_process_state`)."""
        seed_everything(self.config.seed, self.config.num_threads)
        configure_process_state(self.config.deepspeed)

    def train(self, trainer) -> Any:
        """``trainer.train``, resuming per ``config.resume`` (see :func:`~conan_hf.training.checkpoints.
        train_with_resume`)."""
        return train_with_resume(trainer, self.config)

    def finish(self, trainer, result) -> dict[str, Any]:
        """Write ``final_dir`` with the stage record (the :meth:`summary`) and print the loss line."""
        note, summary = self.summary(trainer)
        return finish_stage(trainer, self.config, self.stage, self.number, result, note=note,
                            write_model=self.write_model(), **summary)

    # ---- the steps a stage supplies ---------------------------------------------------------------------------------
    def build_trainer(self):
        """The Trainer of the stage, from its steps: arguments first (so that the process group exists when the data
        layer splits a stream by rank or lets each node's main process fill the ``datasets`` cache), then the
        datasets, the model and :meth:`create_trainer`."""
        args = self.training_arguments()
        datasets = self.load_datasets()
        model = self.load_model()
        return self.create_trainer(model, datasets, args)

    def training_arguments(self):
        """transformers' `TrainingArguments` of the config (with :meth:`training_arguments_kwargs`)."""
        from transformers import TrainingArguments

        return TrainingArguments(**self.training_arguments_kwargs())

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """The config's `TrainingArguments` keyword arguments; for a streamed ``data`` those of a stream
        (:func:`~conan_hf.training.streaming.stream_training_kwargs`: ``max_steps`` required)."""
        kwargs = self.config.training_arguments_kwargs()
        if self.streamed:
            kwargs = stream_training_kwargs(self.config, self.what, kwargs)
        return kwargs

    @functools.cached_property
    def streamed(self) -> bool:
        """Whether the stage's ``data`` sources are streamed (one says ``streaming: true``; False for a stage without
        ``data``)."""
        data = getattr(self.config, "data", None)
        return data is not None and is_streamed(data, self.what)

    @property
    def explicit_checkpoint(self) -> str | None:
        """The checkpoint folder ``resume`` names, if it names one (not ``auto`` / ``no``)."""
        resume = self.config.resume
        return None if resume in NO_RESUME or resume == "auto" else resume

    def load_datasets(self) -> Any:
        """The training data."""
        raise NotImplementedError(f"{type(self).__name__} supplies load_datasets")

    def load_model(self) -> Any:
        """The model to train."""
        raise NotImplementedError(f"{type(self).__name__} supplies load_model")

    def create_trainer(self, model, datasets, args):
        """The Trainer over ``model``, ``datasets`` and ``args`` (with the stage's losses and callbacks)."""
        raise NotImplementedError(f"{type(self).__name__} supplies create_trainer")

    def after_training(self, trainer) -> None:
        """What the stage does to the trained model before it is saved (nothing by default)."""

    def summary(self, trainer) -> tuple[str, dict[str, Any]]:
        """(a note for the loss line, extra entries of the stage record's summary)."""
        return "", {}

    def write_model(self) -> Callable[[Path], dict[str, Any] | None] | None:
        """A function writing the final model into a folder instead of ``trainer.save_model`` (None: the Trainer
        saves it)."""
        return None

    # ---- the command line -------------------------------------------------------------------------------------------
    @classmethod
    def entry_points(cls, description: str | None = None) -> tuple[Callable[..., dict[str, Any]], Callable[..., None]]:
        """The module-level ``run(config)`` and ``main(argv=None)`` of a stage module, e.g.
        ``run, main = PretrainRunner.entry_points(__doc__)``."""

        def run(config) -> dict[str, Any]:
            return cls(config).run()

        def main(argv: list[str] | None = None) -> None:
            cls.main(argv, description=description)

        run.__doc__ = (f"Train the {cls.stage} stage with ``config`` (a ``{cls.config_class.__name__}``); "
                       "returns its summary.")
        main.__doc__ = f"``conan-train {cls.stage} [options]`` (see ``--help``)."
        return run, main

    @classmethod
    def main(cls, argv: list[str] | None = None, description: str | None = None) -> None:
        """``conan-train <stage> [--config FILE] [--preset NAME] [--<option> VALUE ...]``: parse, then :meth:`run`.
        Bad options or data end with one line and exit status 2, Ctrl-C with where to resume and exit status 130."""

        @cli_errors(f"conan-train {cls.stage}")
        def main(argv: list[str] | None) -> None:
            config = parse_config(cls.config_class, cls.stage, argv, description=description)
            with stage_exits(config):
                cls(config).run()

        main(argv)


class CausalLMRunner(StageRunner):
    """A stage that trains a causal LM with transformers' `Trainer` (stages 1 and 2): memory-mapped data, or a
    streamed one (a :class:`~conan_hf.training.streaming.ResumableStream` whose position each checkpoint saves,
    trained by :class:`~conan_hf.training.streaming.StreamTrainer`). The LM's KV cache is off while training
    (packed-sequence masking needs that) and back on in the saved model.

    Besides the steps of :class:`StageRunner`, a subclass sets ``self.tokenizer`` and supplies :meth:`collator`.
    """

    tokenizer: Any = None

    def collator(self) -> Any:
        """The batch collator."""
        raise NotImplementedError(f"{type(self).__name__} supplies collator")

    def create_trainer(self, model, datasets, args):
        from transformers import Trainer

        from conan_hf.training.streaming import StreamPositionCallback, StreamTrainer

        self.model = model
        if self.streamed:
            return StreamTrainer(model=model, args=args, train_dataset=datasets, data_collator=self.collator(),
                                 processing_class=self.tokenizer,
                                 callbacks=[StreamPositionCallback(datasets, self.explicit_checkpoint)])
        return Trainer(model=model, args=args, train_dataset=datasets, data_collator=self.collator(),
                       processing_class=self.tokenizer)

    def after_training(self, trainer) -> None:
        self.model.config.use_cache = True


__all__ = ["CausalLMRunner", "StageRunner"]
