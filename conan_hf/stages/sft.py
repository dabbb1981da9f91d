"""Stage 2 (paper §3.1): supervised fine-tuning of the pre-trained decoder on (instruction, input, output) triples.

    accelerate launch -m conan_hf.stages sft --config conan_hf/stages/configs/sft.yaml [--preset tiny]

Each example is ``<bos><|instruction|>{instruction}<|input|>{input}<|response|>{output}<eos>``; the loss is taken on
the output tokens and the closing ``<eos>`` only (labels are -100 on the prompt, see :func:`build_sft_example`).
Paper defaults: learning rate 2e-5, warm-up 2%.

Output: ``final_dir`` with the fine-tuned `ConanForCausalLM` and tokenizer (stage 3's ``model``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

from conan_hf.data.sources import LOCATION, load_sources, main_process_first
from conan_hf.training.config import StageConfig, option, override
from conan_hf.training.distributed import print_main
from conan_hf.training.runner import CausalLMRunner
from conan_hf.training.streaming import ResumableStream

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclasses.dataclass
class SFTConfig(StageConfig):
    """Options of stage 2 (the shared ones: :class:`conan_hf.training.config.StageConfig`)."""

    output_dir: str = override(StageConfig, "output_dir", "runs/sft")
    model: str = option("runs/pretrain/final", help="the stage-1 output folder (a `ConanForCausalLM` with its "
                                                    "tokenizer).")
    data: Any = option(help="sources of ``instruction``, ``input`` (may be empty) and ``output`` columns; "
                            "``streaming: true`` on one reads them lazily (then ``max_steps`` is required).",
                       factory=lambda: ["demo"])
    max_length: int = option(2048, help="examples are truncated to this many tokens.")
    learning_rate: float = override(StageConfig, "learning_rate", 2e-5)  # §3.1
    warmup_ratio: float = override(StageConfig, "warmup_ratio", 0.02)


#: The separators of an SFT prompt: the special token when the tokenizer has it (stage-0 tokenizers do), else a
#: plain-text marker.
SFT_MARKERS = (("<|instruction|>", "Instruction: "), ("<|input|>", "\nInput: "), ("<|response|>", "\nResponse: "))


def sft_markers(tokenizer) -> tuple[str, str, str]:
    """The (instruction, input, response) markers for ``tokenizer`` (see :data:`SFT_MARKERS`).

    Compute it once per tokenizer, not per row: ``get_vocab()`` builds a dict of the whole vocabulary (~100 ms at
    150k tokens).
    """
    vocab = tokenizer.get_vocab()
    instruction, input, response = (special if special in vocab else fallback for special, fallback in SFT_MARKERS)
    return instruction, input, response


def _sft_prompt(tokenizer, markers: Sequence[str], instruction: str, input: str) -> str:
    instruction_marker, input_marker, response_marker = markers
    return f"{tokenizer.bos_token or ''}{instruction_marker}{instruction}{input_marker}{input}{response_marker}"


def _join(tokenizer, prompt_ids: list[int], output_ids: list[int], max_length: int) -> dict[str, list[int]]:
    response_ids = output_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build_sft_example(tokenizer, instruction: str, input: str, output: str, max_length: int,
                      markers: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one SFT example: labels are ``-100`` on the prompt and equal the ids on the response.

    The prompt and the response are tokenised separately, so the boundary between them is exact. For many rows use
    :func:`build_sft_examples` (batched, same result).

    Args:
        markers: :func:`sft_markers` of ``tokenizer`` (computed here when not given).

    Example:
        >>> ex = build_sft_example(tok, "Translate into Chinese.", "Good morning", "早上好", max_length=64)
        >>> response = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
        >>> response == tok("早上好").input_ids + [tok.eos_token_id]
        True
    """
    markers = sft_markers(tokenizer) if markers is None else markers
    prompt_ids = tokenizer(_sft_prompt(tokenizer, markers, instruction, input), add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    return _join(tokenizer, prompt_ids, output_ids, max_length)


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, through the Rust tokenizer directly when that gives
    the same ids (a fast tokenizer without truncation or padding set on its backend): this skips building a
    ``BatchEncoding`` with offsets and masks, ~40% of the time of a batch (``benchmarks/scale.py``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def build_sft_examples(tokenizer, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                       max_length: int, batch_size: int = 1024,
                       markers: Sequence[str] | None = None) -> dict[str, list[list[int]]]:
    """:func:`build_sft_example` for many rows, as columns: the markers are looked up once and the prompts and the
    outputs are tokenised ``batch_size`` rows per tokenizer call (a fast tokenizer encodes a batch in Rust). The
    result equals the per-row one. With ``datasets``: ``dataset.map(lambda b: build_sft_examples(tok,
    b["instruction"], b["input"], b["output"], max_length), batched=True, remove_columns=dataset.column_names)``.

    Returns:
        ``{"input_ids": [...], "attention_mask": [...], "labels": [...]}``, one list per row.
    """
    if not len(instructions) == len(inputs) == len(outputs):
        raise ValueError(f"build_sft_examples: {len(instructions)} instructions, {len(inputs)} inputs and "
                         f"{len(outputs)} outputs; they must have one entry per row")
    markers = sft_markers(tokenizer) if markers is None else markers
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for start in range(0, len(outputs), batch_size):
        stop = start + batch_size
        prompts = [_sft_prompt(tokenizer, markers, instruction, input)
                   for instruction, input in zip(instructions[start:stop], inputs[start:stop])]
        prompt_ids = _token_ids(tokenizer, prompts)
        output_ids = _token_ids(tokenizer, list(outputs[start:stop]))
        for prompt, output in zip(prompt_ids, output_ids):
            example = _join(tokenizer, prompt, output, max_length)
            for name, values in example.items():
                columns[name].append(values)
    return columns


#: Rows per batch of the preprocessing ``map``.
MAP_BATCH_SIZE = 1000
#: The columns a stage-2 row is read with (``input`` may be missing: ``None``, read as "").
SFT_COLUMNS = ("instruction", "input", "output")


def _sft_batch(batch: dict[str, list], tokenizer, max_length: int, markers: Sequence[str]) -> dict[str, list]:
    """A batch of rows → its examples that have a response token within ``max_length`` (the ``map`` function; a
    module-level function, so the ``datasets`` cache can hash it). Left-out rows are counted by the caller."""
    examples = build_sft_examples(tokenizer, batch["instruction"], [value or "" for value in batch["input"]],
                                  batch["output"], max_length, batch_size=len(batch["output"]) or 1, markers=markers)
    kept = [i for i, labels in enumerate(examples["labels"]) if any(label != IGNORE_INDEX for label in labels)]
    if len(kept) < len(examples["labels"]):
        first = next(i for i in range(len(examples["labels"])) if i not in set(kept))
        logger.warning("stage 2: %d example(s) of a batch had no response token within max_length=%d and were left "
                       "out (the first: %s)", len(examples["labels"]) - len(kept), max_length,
                       batch.get(LOCATION, ["?"] * (first + 1))[first])
        examples = {name: [values[i] for i in kept] for name, values in examples.items()}
    return examples


def preprocess(rows, tokenizer, max_length: int, what: str = "stage 2 (SFT) data"):
    """The SFT examples of a data-layer dataset (:func:`conan_hf.data.sources.load_sources`): a batched ``map`` of
    :func:`build_sft_examples` (markers looked up once) that leaves out the examples with no response token within
    ``max_length``, with a warning saying how many.

    Memory-mapped rows give a memory-mapped ``Dataset`` (computed by each node's main process first, into the
    ``datasets`` cache; token ids stored as int32); streamed rows give a lazy ``IterableDataset``.
    """
    from datasets import Features, IterableDataset, Value
    from datasets import Sequence as ArrowList

    markers = sft_markers(tokenizer)
    function = functools.partial(_sft_batch, tokenizer=tokenizer, max_length=max_length, markers=markers)
    if isinstance(rows, IterableDataset):
        return rows.map(function, batched=True, batch_size=MAP_BATCH_SIZE,
                        remove_columns=[*SFT_COLUMNS, LOCATION])
    features = Features({"input_ids": ArrowList(Value("int32")), "attention_mask": ArrowList(Value("int8")),
                         "labels": ArrowList(Value("int32"))})
    with main_process_first():
        examples = rows.map(function, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=rows.column_names,
                            features=features, desc="SFT preprocessing")
    if len(examples) < len(rows):
        logger.warning("stage 2: %d of %d examples had no response token within max_length=%d and were left out",
                       len(rows) - len(examples), len(rows), max_length)
    if not len(examples):
        raise ValueError(f"stage 2: no example has a response within max_length={max_length}")
    return examples


class SFTRunner(CausalLMRunner):
    """Stage 2: the stage-1 model and tokenizer, the SFT examples of the (instruction, input, output) rows."""

    stage, number, config_class, what = "sft", 2, SFTConfig, "stage 2 (SFT) data"

    def load_datasets(self):
        """The SFT examples (:func:`preprocess`); a stream of them when ``data`` is streamed."""
        from transformers import AutoTokenizer

        from conan_hf.demo import demo_instructions

        config = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.tokenizer.padding_side = "right"
        rows = load_sources(config.data, demo_instructions, required=["instruction", "output"],
                            text=list(SFT_COLUMNS), keep=list(SFT_COLUMNS), what=self.what, streaming=self.streamed)
        dataset = preprocess(rows, self.tokenizer, config.max_length, self.what)
        return ResumableStream(dataset, self.what) if self.streamed else dataset

    def load_model(self):
        from conan_hf import ConanForCausalLM

        model = ConanForCausalLM.from_pretrained(self.config.model)
        model.config.use_cache = False
        return model

    def collator(self):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def create_trainer(self, model, datasets, args):
        trainer = super().create_trainer(model, datasets, args)
        self.num_examples = None if self.streamed else len(datasets)
        on = "a stream of" if self.streamed else str(self.num_examples)
        print_main(f"[stage 2] SFT of {self.config.model} on {on} (instruction, input, output) examples")
        return trainer

    def summary(self, trainer):
        return "", {"num_examples": self.num_examples, "streamed": self.streamed}


run, main = SFTRunner.entry_points(__doc__)


if __name__ == "__main__":
    main()
