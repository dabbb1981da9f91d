"""Process set-up shared by the stages: Accelerate / DeepSpeed ZeRO-1 arguments (gloo on CPU), ranks, seeding."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conan_hf.training.config import StageConfig

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


