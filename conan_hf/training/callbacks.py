"""Trainer callbacks shared by the training stages.

`SoftMaskCallback` drives the soft mask of paper §3.2 (eq.4) with the App. C schedules during weakly-supervised
training: α(t) = schedule(t / τ) with t the 1-based optimizer step being taken, so the last step (t = τ = max_steps)
trains at α = 1 (bidirectional).
"""

from __future__ import annotations

import json
import logging
import os

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from conan_hf.soft_mask import SOFT_MASK_SCHEDULES, set_soft_mask_alpha, soft_mask_alpha

logger = logging.getLogger(__name__)


class SoftMaskCallback(TrainerCallback, ExportableState):
    """Set the soft-mask α(t) (paper §3.2, eq.4; App. C) on the model at the start of every optimizer step.

    Step t of τ (1-based: the step being taken, `state.global_step + 1`) trains at α(t) = schedule(t / τ), with
    τ = `total_steps` (default: the trainer's `max_steps`). So the final step trains at α(τ) = 1 (exactly
    bidirectional) and the first at α(1) = schedule(1 / τ), as close to causal as a schedule that starts at t = 1 gets
    (1/τ linear, 1/τ² accelerating, 2/τ − 1/τ² decelerating); steps past τ stay at 1. The log entry of step s carries
    α(s), the value that step trained with; after training the model keeps α(global_step) (1 when τ steps ran).

    Resuming: t comes back with the trainer state; the schedule and τ are written next to every checkpoint
    (`soft_mask_callback.json`) and read back when training resumes from `output_dir/checkpoint-<step>`, so a resumed
    run continues the same curve even if `max_steps` changed. (With `restore_callback_states_from_checkpoint=True` the
    same state also travels through transformers' `ExportableState`.)

    The model must contain a soft-masked decoder: a `ConanModel` with `attention_mode="soft"` or a stock decoder
    patched by `conan_hf.apply_soft_mask`.

    Args:
        schedule: "linear" (default), "accelerating" or "decelerating".
        total_steps: τ; None uses the trainer's `max_steps`.

    Example:

    ```python
    >>> from sentence_transformers import SentenceTransformerTrainer
    >>> from conan_hf import ConanConfig, build_sentence_transformer
    >>> model = build_sentence_transformer(ConanConfig.tiny(), attention_mode="soft")
    >>> trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
    ...                                      callbacks=[SoftMaskCallback()])
    ```
    """

    STATE_FILE = "soft_mask_callback.json"

    def __init__(self, schedule: str = "linear", total_steps: int | None = None):
        if schedule not in SOFT_MASK_SCHEDULES:
            raise ValueError(f"schedule must be one of {SOFT_MASK_SCHEDULES}, got {schedule!r}.")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}.")
        self.schedule = schedule
        self.total_steps = total_steps
        self.alpha = 0.0

    def _set(self, step: int, model) -> None:
        self.alpha = soft_mask_alpha(step, self.total_steps, self.schedule)
        if model is None:
            raise ValueError("SoftMaskCallback needs the trainer's model to set alpha on.")
        set_soft_mask_alpha(model, self.alpha)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step > 0:
            self._load(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        if self.total_steps is None:
            if not state.max_steps or state.max_steps <= 0:
                raise ValueError("SoftMaskCallback needs total_steps or a trainer with a known max_steps.")
            self.total_steps = int(state.max_steps)
        self._set(state.global_step + 1, kwargs.get("model"))
        logger.info(
            f"SoftMaskCallback: {self.schedule} schedule over tau={self.total_steps} steps; step "
            f"{state.global_step + 1} trains at alpha={self.alpha:.4f}."
        )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # `global_step` counts the steps already taken; this one is step global_step + 1 (1-based), eq.4's t.
        self._set(state.global_step + 1, kwargs.get("model"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._set(state.global_step, kwargs.get("model"))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is not None:
            logs["soft_mask_alpha"] = self.alpha
        # The trainer appended its copy of the logs before calling us; keep alpha in trainer_state.json too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["soft_mask_alpha"] = self.alpha

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            record = {
                "schedule": self.schedule,
                "total_steps": self.total_steps,
                "global_step": state.global_step,
                "alpha": self.alpha,
            }
            with open(os.path.join(checkpoint, self.STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)

    def _load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, self.STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(f"SoftMaskCallback: resuming without {path}; using schedule={self.schedule!r}.")
            return
        with open(path, encoding="utf-8") as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from error
        schedule, total_steps = record.get("schedule"), record.get("total_steps")
        if schedule not in SOFT_MASK_SCHEDULES or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"{path}: expected a schedule in {SOFT_MASK_SCHEDULES} and a positive total_steps, "
                             f"got schedule={schedule!r}, total_steps={total_steps!r}.")
        if (schedule, total_steps) != (self.schedule, self.total_steps) and self.total_steps is not None:
            logger.info(f"SoftMaskCallback: continuing the checkpoint's schedule {schedule!r} over tau={total_steps} "
                        f"(this run asked for {self.schedule!r} over tau={self.total_steps}).")
        self.schedule, self.total_steps = schedule, total_steps

    def state(self) -> dict:
        return {
            "args": {"schedule": self.schedule, "total_steps": self.total_steps},
            "attributes": {"alpha": self.alpha},
        }


__all__ = ["SoftMaskCallback"]
