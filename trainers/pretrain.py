"""Stage 1 (paper §3.1): pre-train the Conan decoder from scratch as a causal language model.

    accelerate launch -m trainers.pretrain --config trainers/configs/pretrain.yaml [--preset tiny]

Documents are tokenised as ``<bos> text <eos>``, concatenated and cut into blocks of ``seq_length`` tokens
(:func:`pack_documents`). Position ids restart at every document start, and the batch carries no attention mask, so
transformers' packed-sequence masking (``find_packed_sequence_indices``) makes attention block-diagonal: no token sees
another document. Paper defaults: AdamW, learning rate 1e-4, warm-up 5%, weight decay 0.001.

Output: ``final_dir`` with a `ConanForCausalLM` and the tokenizer (stage 2's ``model``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conan_hf.errors import cli_errors
from conan_hf.data.sources import read_sources
from trainers.checkpoints import finish_stage, stage_exits, start_stage, train_with_resume
from trainers.config import StageConfig, parse_config
from trainers.distributed import print_main, setup_runtime

IGNORE_INDEX = -100


@dataclasses.dataclass
class PretrainConfig(StageConfig):
    """Options of stage 1 (see :class:`trainers.config.StageConfig` for the shared ones).

    Args:
        tokenizer: the stage-0 tokenizer folder.
        model: ``"full"`` (the released 1.4B architecture), ``"tiny"`` (~3M parameters, for CPUs and tests), a path
            to a ``config.json``, or a mapping of `ConanConfig` arguments.
        model_overrides: `ConanConfig` arguments applied on top (e.g. ``{num_hidden_layers: 4}``).
        data: text sources (see :mod:`conan_hf.data.sources`).
        text_column: the column holding the text in file/Hub sources.
        seq_length: tokens per packed block.
    """

    output_dir: str = "runs/pretrain"
    tokenizer: str = "runs/tokenizer"
    model: Any = "full"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: Any = dataclasses.field(default_factory=lambda: ["demo"])
    text_column: str = "text"
    seq_length: int = 2048
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.001
    bf16: bool = True


def pack_documents(
    documents: Iterable[list[int]], seq_length: int, pad_token_id: int
) -> dict[str, list[list[int]]]:
    """Pack tokenised documents into blocks of exactly ``seq_length`` tokens.

    The documents are concatenated in order and the stream is cut every ``seq_length`` tokens; a document that
    crosses a block boundary continues in the next block as a new segment (its positions restart at 0). The last
    block is filled with a padding segment. Returns, per block:

    - ``input_ids``;
    - ``position_ids``: 0, 1, 2, ... from the start of each segment (document, continued document, or padding), which
      is what tells the model where the boundaries are;
    - ``labels``: the token ids, except ``-100`` on the first token of every segment (predicting it would mean
      predicting across a boundary, since the model shifts labels by one) and on padding.

    Example:
        >>> pack_documents([[5, 6, 7], [8, 9]], seq_length=4, pad_token_id=0)["position_ids"]
        [[0, 1, 2, 0], [0, 0, 1, 2]]
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}")
    blocks: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []

    def flush() -> None:
        blocks["input_ids"].append(ids.copy())
        blocks["position_ids"].append(pos.copy())
        blocks["labels"].append(labels.copy())
        ids.clear(), pos.clear(), labels.clear()

    for document in documents:
        offset = 0
        while offset < len(document):
            take = document[offset: offset + seq_length - len(ids)]
            ids.extend(take)
            pos.extend(range(len(take)))
            labels.extend([IGNORE_INDEX] + list(take[1:]))
            offset += len(take)
            if len(ids) == seq_length:
                flush()
    if ids:
        fill = seq_length - len(ids)
        ids.extend([pad_token_id] * fill)
        pos.extend(range(fill))
        labels.extend([IGNORE_INDEX] * fill)
        flush()
    return blocks


def build_model_config(spec: Any, tokenizer, overrides: dict | None = None):
    """A `ConanConfig` from the ``model`` option, with the tokenizer's special-token ids.

    For ``"tiny"`` the vocabulary size is derived from the tokenizer (rounded up to a multiple of 64); otherwise the
    configured size must hold the tokenizer.
    """
    from conan_hf import ConanConfig

    overrides = dict(overrides or {})
    if spec == "full":
        config = ConanConfig(**overrides)
    elif spec == "tiny":
        overrides.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
        config = ConanConfig.tiny(**overrides)
    elif isinstance(spec, dict):
        config = ConanConfig(**{**spec, **overrides})
    else:
        path = Path(str(spec))
        if not path.is_file():
            raise ValueError(f"model must be 'full', 'tiny', a config.json path or a mapping, got {spec!r}")
        values = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        config = ConanConfig(**{**values, **overrides})
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "raise vocab_size (model_overrides) or train a smaller tokenizer"
        )
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.attention_mode = "causal"
    return config


def new_causal_lm(spec: Any, tokenizer, overrides: dict | None = None):
    """A randomly initialised `ConanForCausalLM` for pre-training (seed first for a reproducible init).

    Its KV cache is off: transformers applies packed-sequence masking only when there is no cache, and with one
    (`use_cache=True` is the config default) the packed documents would silently attend to each other.
    """
    from conan_hf import ConanForCausalLM

    model = ConanForCausalLM(build_model_config(spec, tokenizer, overrides))
    model.config.use_cache = False
    return model


def tokenize_documents(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """``<bos> text <eos>`` token ids for every text (empty texts are kept as just the markers)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [bos + ids + eos for ids in encoded]


def run(config: PretrainConfig) -> dict[str, Any]:
    """Train stage 1; returns a summary with the final directory and the logged losses."""
    done = start_stage(config, "pretrain", 1)
    if done is not None:
        return done
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from conan_hf.demo import demo_texts

    setup_runtime(config)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    rows = read_sources(config.data, lambda: [{"text": t} for t in demo_texts()], required=[config.text_column],
                        text=[config.text_column], what="stage 1 (pre-training) data")
    documents = tokenize_documents(tokenizer, (r[config.text_column] for r in rows))
    packed = pack_documents(documents, config.seq_length, tokenizer.pad_token_id)
    dataset = Dataset.from_dict(packed)
    num_tokens = sum(len(d) for d in documents)

    model = new_causal_lm(config.model, tokenizer, config.model_overrides)
    args = TrainingArguments(**config.training_arguments_kwargs())
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      processing_class=tokenizer)
    print_main(f"[stage 1] pre-training {model.num_parameters():,} parameters on {len(rows)} documents "
               f"({num_tokens:,} tokens, {len(dataset)} packed blocks of {config.seq_length})")
    result = train_with_resume(trainer, config)
    model.config.use_cache = True
    return finish_stage(trainer, config, "pretrain", 1, result, num_blocks=len(dataset), num_tokens=num_tokens)


@cli_errors("python -m trainers.pretrain")
def main(argv: list[str] | None = None) -> None:
    config = parse_config(PretrainConfig, "pretrain", argv, description=__doc__)
    with stage_exits(config):
        run(config)


if __name__ == "__main__":
    main()
