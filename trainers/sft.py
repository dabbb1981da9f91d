"""Stage 2 (paper §3.1): supervised fine-tuning of the pre-trained decoder on (instruction, input, output) triples.

    accelerate launch -m trainers.sft --config trainers/configs/sft.yaml [--preset tiny]

Each example is ``<bos><|instruction|>{instruction}<|input|>{input}<|response|>{output}<eos>``; the loss is taken on
the output tokens and the closing ``<eos>`` only (labels are -100 on the prompt, see :func:`build_sft_example`).
Paper defaults: learning rate 2e-5, warm-up 2%.

Output: ``final_dir`` with the fine-tuned `ConanForCausalLM` and tokenizer (stage 3's ``model``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from conan_hf.errors import cli_errors
from trainers.common import (
    StageConfig,
    finish_stage,
    parse_config,
    print_main,
    read_sources,
    setup_runtime,
    stage_exits,
    start_stage,
    train_with_resume,
)

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclasses.dataclass
class SFTConfig(StageConfig):
    """Options of stage 2 (see :class:`trainers.common.StageConfig` for the shared ones).

    Args:
        model: the stage-1 output folder (a `ConanForCausalLM` with its tokenizer).
        data: sources of ``instruction``, ``input`` (may be empty) and ``output`` columns.
        max_length: examples are truncated to this many tokens.
    """

    output_dir: str = "runs/sft"
    model: str = "runs/pretrain/final"
    data: Any = dataclasses.field(default_factory=lambda: ["demo"])
    max_length: int = 2048
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.02
    weight_decay: float = 0.001
    bf16: bool = True


def _marker(tokenizer, special: str, fallback: str) -> str:
    """The special separator if the tokenizer has it (stage-0 tokenizers do), else a plain-text marker."""
    return special if special in tokenizer.get_vocab() else fallback


def build_sft_example(tokenizer, instruction: str, input: str, output: str, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one SFT example: labels are ``-100`` on the prompt and equal the ids on the response.

    The prompt and the response are tokenised separately, so the boundary between them is exact.

    Example:
        >>> ex = build_sft_example(tok, "Translate into Chinese.", "Good morning", "早上好", max_length=64)
        >>> response = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
        >>> response == tok("早上好").input_ids + [tok.eos_token_id]
        True
    """
    bos = tokenizer.bos_token or ""
    prompt = (
        f"{bos}{_marker(tokenizer, '<|instruction|>', 'Instruction: ')}{instruction}"
        f"{_marker(tokenizer, '<|input|>', chr(10) + 'Input: ')}{input}"
        f"{_marker(tokenizer, '<|response|>', chr(10) + 'Response: ')}"
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def run(config: SFTConfig) -> dict[str, Any]:
    """Train stage 2; returns a summary with the final directory and the logged losses."""
    done = start_stage(config, "sft", 2)
    if done is not None:
        return done
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from conan_hf import ConanForCausalLM
    from conan_hf.demo import demo_instructions

    setup_runtime(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tokenizer.padding_side = "right"
    rows = read_sources(config.data, demo_instructions, required=["instruction", "output"],
                        text=["instruction", "input", "output"], what="stage 2 (SFT) data")
    examples = [build_sft_example(tokenizer, r["instruction"], r.get("input") or "", r["output"], config.max_length)
                for r in rows]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if len(kept) < len(examples):
        logger.warning("stage 2: %d of %d examples had no response token within max_length=%d and were left out",
                       len(examples) - len(kept), len(examples), config.max_length)
    if not kept:
        raise ValueError(f"stage 2: no example has a response within max_length={config.max_length}")
    dataset = Dataset.from_list(kept)

    model = ConanForCausalLM.from_pretrained(config.model)
    model.config.use_cache = False
    args = TrainingArguments(**config.training_arguments_kwargs())
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer)
    print_main(f"[stage 2] SFT of {config.model} on {len(dataset)} (instruction, input, output) examples")
    result = train_with_resume(trainer, config)
    model.config.use_cache = True
    return finish_stage(trainer, config, "sft", 2, result, num_examples=len(dataset))


@cli_errors("python -m trainers.sft")
def main(argv: list[str] | None = None) -> None:
    config = parse_config(SFTConfig, "sft", argv, description=__doc__)
    with stage_exits(config):
        run(config)


if __name__ == "__main__":
    main()
