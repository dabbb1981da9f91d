"""Process set-up shared by the stages: Accelerate / DeepSpeed ZeRO-1 arguments (gloo on CPU), ranks, seeding."""

from __future__ import annotations

import os
import sys
from typing import Any


# ---- distributed set-up -------------------------------------------------------------------------------------------
def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def _deepspeed_over_gloo(deepspeed: Any) -> bool:
    """Whether this run is DeepSpeed with several processes on a machine without an accelerator (CPU tests, laptops):
    DeepSpeed then communicates over gloo. DeepSpeed is used when ``deepspeed`` is given or ``accelerate launch`` was
    configured for it."""
    use_deepspeed = deepspeed is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return use_deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator()


def distributed_kwargs(deepspeed: Any = None) -> dict[str, Any]:
    """`TrainingArguments` kwargs that pick DeepSpeed and the process group (no side effects).

    For DeepSpeed over gloo (see :func:`configure_process_state`) the Trainer is told to use the accelerate state
    set up beforehand (``accelerator_config={"use_configured_state": True}``).
    """
    kwargs: dict[str, Any] = {"deepspeed": deepspeed}
    if _deepspeed_over_gloo(deepspeed):
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def configure_process_state(deepspeed: Any = None) -> None:
    """Set accelerate's shared process state up for DeepSpeed over gloo (several processes, no accelerator):
    accelerate only counts the processes when it is told the backend, so the state is created with
    ``backend="gloo"`` (an earlier non-DeepSpeed state, e.g. the main job's, is replaced; the process group stays
    up). Does nothing otherwise. The stage runner calls it in its runtime set-up, before the Trainer's arguments are
    made (:func:`distributed_kwargs`)."""
    if not _deepspeed_over_gloo(deepspeed):
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if PartialState._shared_state and PartialState().distributed_type != DistributedType.DEEPSPEED:
        PartialState._reset_state()
    PartialState(backend="gloo")


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



def seed_everything(seed: int, num_threads: int | None = None) -> None:
    """Seed every RNG (python, numpy, torch) and apply ``num_threads`` (torch's CPU threads; ``None`` keeps them)."""
    import torch
    from transformers import set_seed

    if num_threads:
        torch.set_num_threads(num_threads)
    set_seed(seed)


def print_main(*args, **kwargs) -> None:
    """`print` on the main process only (stage summaries under multi-process launches)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()


