"""Stage 3 (paper §3.1-3.2): weakly-supervised embedding training with the soft mask.

    accelerate launch -m trainers.weak --config trainers/configs/weak.yaml [--preset tiny]

The stage-2 decoder becomes an embedding model (Transformer → Pooling → Normalize). Training pairs are
(query, passage): the input is the query, the output the positive, and the row's instruction becomes the query's
sentence-transformers *prompt* (``Instruct: {instruction}\nQuery:\n``), left out of mean pooling exactly as in
stage 4 and at inference. A prompt is a property of a batch in sentence-transformers, so rows are grouped by
instruction (one dataset per instruction, batches drawn from one group at a time in proportion to the group sizes);
in-batch negatives then come from the same kind of task. The loss is InfoNCE (eq. 1) with in-batch negatives. The attention moves from causal to bidirectional along the soft mask (eq. 4):
α(t) = t/τ with τ the number of training steps (App. C's linear schedule), set every step by
:class:`trainers.callbacks.SoftMaskCallback`. Optionally, pairs a teacher embedder scores below 0.4 are dropped
first (the paper used gte-Qwen2-7B-instruct), see :func:`conan_hf.data.teacher.filter_by_teacher`.

Output: ``final_dir``, a SentenceTransformer folder; when α reached 1 its backbone is saved bidirectional (α ≥ 1 is
exactly bidirectional attention), ready for stage 4.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sentence_transformers import SentenceTransformerTrainer

from conan_hf.errors import DataError, cli_errors, location_of
from conan_hf.sentence import QUERY_PROMPT_FORMAT
from conan_hf.data.sources import read_sources, row_text
from trainers.checkpoints import (
    MainProcessSaveMixin,
    check_stage_input,
    finish_stage,
    stage_exits,
    start_stage,
    train_with_resume,
)
from trainers.config import StageConfig, parse_config
from trainers.distributed import print_main, setup_runtime
from trainers.models import backbone, describe_attention, load_sentence_model, set_attention_mode

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WeakConfig(StageConfig):
    """Options of stage 3 (see :class:`trainers.config.StageConfig` for the shared ones).

    Args:
        model: the stage-2 output folder, or your own decoder (a local folder or Hub id of Llama, Qwen2, Qwen3,
            Mistral, ... — any decoder `conan_hf.apply_soft_mask` supports; the stage applies the soft mask), or a
            SentenceTransformer folder built on one.
        data: sources with ``instruction``/``input``/``output`` columns, or ``query``/``positive`` columns (an
            optional ``instruction`` column too).
        prompt_format: how a row's instruction becomes the query prompt (``{instruction}``); rows without an
            instruction get no prompt. It must end on a token boundary (checked at start).
        pooling: ``mean`` or ``lasttoken``.
        max_seq_length: texts are truncated to this many tokens.
        temperature: τ of InfoNCE (eq. 1).
        soft_mask_schedule: ``linear`` (α = t/τ, the paper), ``accelerating`` or ``decelerating`` (App. C).
        soft_mask_steps: τ of the schedule; ``None`` = the number of training steps, so the last step trains at α = 1.
        soft_mask_length: l of eq.4: ``sequence`` (each text's real length, the default: a text's mask does not
            depend on its batch), ``max_seq_length`` (this stage's ``max_seq_length``, the paper's "training sequence
            length") or a fixed int; see :mod:`conan_hf.soft_mask`.
        teacher: a SentenceTransformer name/folder; if set, pairs it scores below ``teacher_threshold`` are dropped.
        teacher_threshold: 0.4 in the paper.
    """

    output_dir: str = "runs/weak"
    model: str = "runs/sft/final"
    data: Any = dataclasses.field(default_factory=lambda: ["demo"])
    prompt_format: str = QUERY_PROMPT_FORMAT
    pooling: str = "mean"
    max_seq_length: int = 512
    temperature: float = 0.05
    soft_mask_schedule: str = "linear"
    soft_mask_steps: int | None = None
    soft_mask_length: int | str = "sequence"
    teacher: str | None = None
    teacher_threshold: float = 0.4
    per_device_train_batch_size: int = 64
    # App. A: stages 3 and 4 use "the same optimizer parameters and learning rate as in the pre-training phase".
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.001
    bf16: bool = True


class WeakTrainer(MainProcessSaveMixin, SentenceTransformerTrainer):
    """sentence-transformers' trainer, saving from the main process only (see `MainProcessSaveMixin`)."""


def to_pairs(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """(instruction, anchor, positive) rows: input → anchor and output → positive, or the rows' own query/positive;
    ``instruction`` is the row's instruction ("" if it has none).

    Texts must be strings; errors name the row's file and line (``row.location``, see :func:`conan_hf.data.sources.
    read_sources`), or its 1-based position for rows that do not carry one.
    """
    what = "stage 3 (weakly-supervised) data"
    pairs = []
    for index, row in enumerate(rows, 1):
        where = location_of(row, f"stage 3 data row {index}")
        instruction = row_text(row, "instruction", what, where, optional=True)
        if "query" in row and "positive" in row:
            pairs.append({"instruction": instruction, "anchor": row_text(row, "query", what, where),
                          "positive": row_text(row, "positive", what, where)})
            continue
        if "input" not in row and "instruction" not in row or "output" not in row:
            raise DataError(f"{what}: needs instruction/input/output or query/positive columns, got {sorted(row)}",
                            where=where, hint="map the source's columns with `columns: {query: ..., positive: ...}`")
        pairs.append({"instruction": instruction, "anchor": row_text(row, "input", what, where, optional=True),
                      "positive": row_text(row, "output", what, where)})
    return pairs


def group_by_instruction(pairs, prompt_format: str) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """One dataset per instruction (named ``instruction_<k>`` in order of first appearance) of (anchor, positive)
    pairs, and the sentence-transformers training prompts: ``{name: {"anchor": prompt}}`` for instructed groups."""
    from datasets import Dataset

    if not isinstance(pairs, Dataset):
        raise TypeError("group_by_instruction expects a datasets.Dataset")
    order: dict[str, list[int]] = {}
    for index, instruction in enumerate(pairs["instruction"]):
        order.setdefault(instruction, []).append(index)
    datasets, prompts = {}, {}
    for k, (instruction, indices) in enumerate(order.items()):
        name = f"instruction_{k}"
        datasets[name] = pairs.select(indices).select_columns(["anchor", "positive"])
        if instruction:
            prompts[name] = {"anchor": prompt_format.format(instruction=instruction)}
    return datasets, prompts


def filter_pairs_by_teacher(dataset, teacher, threshold: float, prompt_format: str):
    """The optional teacher filter of stage 3 (pairs scored below ``threshold`` are dropped).

    Each query is encoded with its row's instruction as the prompt (``prompt_format``), replacing the teacher's own
    query prompt, and rows without an instruction with the teacher's own: one instruction per query.
    """
    from conan_hf.data.teacher import filter_by_teacher

    prompts = [prompt_format.format(instruction=i) if i else None for i in dataset["instruction"]]
    return filter_by_teacher(dataset, teacher, threshold=threshold, query_column="anchor", positive_column="positive",
                             score_column=None, query_prompt=prompts)


def run(config: WeakConfig) -> dict[str, Any]:
    """Train stage 3; returns a summary with the final directory, the logged losses and the final α."""
    done = start_stage(config, "weak", 3, check_input=False)
    if done is not None:
        return done
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    from conan_hf.backbones import backbone_kind, get_attention_mode
    from conan_hf.demo import demo_instructions
    from conan_hf.losses import InfoNCELoss
    from conan_hf.sentence import check_prompt_boundary
    from conan_hf.soft_mask import get_soft_mask_alpha, set_soft_mask_length
    from trainers.callbacks import SoftMaskCallback

    setup_runtime(config)
    rows = read_sources(config.data, demo_instructions, required=[], what="stage 3 (weakly-supervised) data")
    dataset = Dataset.from_list(to_pairs(rows))
    check_stage_input(config, "weak")  # after the data checks, before the (slow) teacher filter
    teacher_report = None
    if config.teacher:
        dataset, teacher_report = filter_pairs_by_teacher(dataset, config.teacher, config.teacher_threshold,
                                                          config.prompt_format)
        if len(dataset) == 0:
            raise ValueError(f"the teacher filter (threshold {config.teacher_threshold}) dropped every pair")

    # The stage applies the soft mask itself: a Conan backbone switches to attention_mode="soft", a stock decoder
    # (Llama, Qwen2, Qwen3, Mistral, ...) gets conan_hf.apply_soft_mask; an encoder is refused (it has no causal start).
    model = load_sentence_model(config.model, attention_mode="soft", pooling=config.pooling,
                                max_seq_length=config.max_seq_length)
    # "max_seq_length" becomes this stage's fixed max_seq_length, so l does not depend on how the collator pads.
    set_soft_mask_length(model, config.max_seq_length if config.soft_mask_length == "max_seq_length"
                         else config.soft_mask_length)
    groups, prompts = group_by_instruction(dataset, config.prompt_format)
    if not model[1].include_prompt:
        for name, prompt in prompts.items():
            check_prompt_boundary(model.tokenizer, prompt["anchor"], name=f"{name} ({prompt['anchor']!r})")
    batch = config.per_device_train_batch_size
    small = {name: len(d) for name, d in groups.items() if len(d) < batch}
    if small:
        logger.warning("stage 3: instruction group(s) %s have fewer pairs than a batch (%d) and are not trained on "
                       "(batches hold one instruction each); lower per_device_train_batch_size to use them",
                       small, batch)
    loss = InfoNCELoss(model, temperature=config.temperature)
    args = SentenceTransformerTrainingArguments(
        **config.training_arguments_kwargs(),
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate in the batch would be a false in-batch negative
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        prompts=prompts,
        dataloader_drop_last=True,
    )
    callback = SoftMaskCallback(schedule=config.soft_mask_schedule, total_steps=config.soft_mask_steps)
    trainer = WeakTrainer(model=model, args=args, train_dataset=DatasetDict(groups), loss=loss, callbacks=[callback])
    print_main(f"[stage 3] weakly-supervised training of {config.model} on {len(dataset)} pairs in {len(groups)} "
               f"instruction group(s), soft mask ({config.soft_mask_schedule} α(t), τ = "
               f"{config.soft_mask_steps or 'all steps'})")
    print_main(f"[stage 3] {describe_attention(model)['line']}")
    result = train_with_resume(trainer, config)
    alpha = get_soft_mask_alpha(model)
    if alpha >= 1.0:
        set_attention_mode(model, "bidirectional")
    elif backbone_kind(backbone(model)) != "conan":
        # A Conan config stores attention_mode="soft" and α; a stock config has only is_causal.
        logger.warning("stage 3 ended at α = %.3f < 1: a stock decoder cannot store a partial soft mask, so it is "
                       "saved causal (stage 4 sets its own attention_mode)", alpha)
        set_attention_mode(model, "causal")
    teacher_summary = teacher_report.to_dict() if teacher_report else None
    if teacher_summary:
        teacher_summary.pop("scores", None)
    return finish_stage(
        trainer, config, "weak", 3, result, note=f"α = {alpha:.3f} at the end; ",
        num_pairs=len(dataset), final_alpha=alpha,
        instruction_groups={name: {"pairs": len(d), "prompt": prompts.get(name, {}).get("anchor")}
                            for name, d in groups.items()}, soft_mask_total_steps=callback.total_steps,
        soft_mask_alphas=[(e["step"], e["soft_mask_alpha"]) for e in trainer.state.log_history
                          if "loss" in e and "soft_mask_alpha" in e],
        attention_mode=get_attention_mode(backbone(model)), teacher_filter=teacher_summary,
    )


@cli_errors("python -m trainers.weak")
def main(argv: list[str] | None = None) -> None:
    config = parse_config(WeakConfig, "weak", argv, description=__doc__)
    with stage_exits(config):
        run(config)


if __name__ == "__main__":
    main()
