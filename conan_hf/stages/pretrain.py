"""Stage 1 (paper §3.1): pre-train the Conan decoder from scratch as a causal language model.

    accelerate launch -m conan_hf.stages pretrain --config conan_hf/stages/configs/pretrain.yaml [--preset tiny]

Documents are tokenised as ``<bos> text <eos>``, concatenated and cut into blocks of ``seq_length`` tokens
(:func:`pack_documents`; for a dataset :func:`pack_dataset`: a batched ``map`` over the memory-mapped rows, or lazily
over a ``streaming: true`` source, whose position each checkpoint saves, see :mod:`conan_hf.training.streaming`).
Position ids restart at every document start, and the batch carries no attention mask, so
transformers' packed-sequence masking (``find_packed_sequence_indices``) makes attention block-diagonal: no token sees
another document. Paper defaults: AdamW, learning rate 1e-4, warm-up 5%, weight decay 0.001.

Output: ``final_dir`` with a `ConanForCausalLM` and the tokenizer (stage 2's ``model``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from conan_hf.data.sources import LOCATION, load_sources, main_process_first
from conan_hf.training.config import StageConfig, option, override
from conan_hf.training.distributed import print_main
from conan_hf.training.runner import CausalLMRunner
from conan_hf.training.streaming import ResumableStream

IGNORE_INDEX = -100


@dataclasses.dataclass
class PretrainConfig(StageConfig):
    """Options of stage 1 (the shared ones: :class:`conan_hf.training.config.StageConfig`)."""

    output_dir: str = override(StageConfig, "output_dir", "runs/pretrain")
    tokenizer: str = option("runs/tokenizer", help="the stage-0 tokenizer folder.")
    model: Any = option("full", help="``full`` (the released 1.4B architecture), ``tiny`` (~3M parameters, for CPUs "
                                     "and tests), a path to a ``config.json``, or a mapping of `ConanConfig` "
                                     "arguments.")
    model_overrides: dict = option(help="`ConanConfig` arguments applied on top (e.g. ``{num_hidden_layers: 4}``).",
                                   factory=dict)
    data: Any = option(help="text sources (see :mod:`conan_hf.data.sources`; ``demo``: the embedded corpus); "
                            "``streaming: true`` on one reads them lazily (then ``max_steps`` is required).",
                       factory=lambda: ["demo"])
    text_column: str = option("text", help="the column holding the text in file/Hub sources.")
    seq_length: int = option(2048, help="tokens per packed block.")


class BlockPacker:
    """Packs tokenised documents into blocks of exactly ``seq_length`` tokens, one document at a time (so it runs
    inside a batched ``datasets`` map or over a stream, in bounded memory). See :func:`pack_documents` for the layout
    of a block."""

    def __init__(self, seq_length: int, pad_token_id: int):
        if seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {seq_length}")
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.labels: list[int] = []

    def _take(self) -> dict[str, list[int]]:
        block = {"input_ids": self.ids, "position_ids": self.pos, "labels": self.labels}
        self.ids, self.pos, self.labels = [], [], []
        return block

    def add(self, document: Sequence[int], start: int = 0) -> Iterator[tuple[dict[str, list[int]], int]]:
        """Append ``document[start:]``; yields ``(block, tokens of the document consumed so far)`` for every block it
        completes (the count says where a stream resumes within the document)."""
        offset = start
        while offset < len(document):
            take = list(document[offset: offset + self.seq_length - len(self.ids)])
            self.ids.extend(take)
            self.pos.extend(range(len(take)))
            self.labels.append(IGNORE_INDEX)
            self.labels.extend(take[1:])
            offset += len(take)
            if len(self.ids) == self.seq_length:
                yield self._take(), offset

    def flush(self) -> dict[str, list[int]] | None:
        """The last, partly filled block completed with a padding segment (``None`` if there is none)."""
        if not self.ids:
            return None
        fill = self.seq_length - len(self.ids)
        self.ids.extend([self.pad_token_id] * fill)
        self.pos.extend(range(fill))
        self.labels.extend([IGNORE_INDEX] * fill)
        return self._take()


def pack_documents(
    documents: Iterable[Sequence[int]], seq_length: int, pad_token_id: int
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

    For a dataset, :func:`pack_dataset` does the same in a batched ``map`` (memory-mapped) or lazily (streamed).

    Example:
        >>> pack_documents([[5, 6, 7], [8, 9]], seq_length=4, pad_token_id=0)["position_ids"]
        [[0, 1, 2, 0], [0, 0, 1, 2]]
    """
    packer = BlockPacker(seq_length, pad_token_id)
    blocks: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
    completed = [block for document in documents for block, _ in packer.add(document)]
    last = packer.flush()
    for block in completed + ([last] if last is not None else []):
        for name, values in block.items():
            blocks[name].append(values)
    return blocks


class _TokenizeAndPack:
    """The function of the memory-mapped ``map``: tokenises a batch of texts and packs it, carrying the unfinished
    block over to the next batch; the batch holding the dataset's last row also emits the padded last block. Batches
    must come in order, in one process (``datasets`` runs a ``map`` without ``num_proc`` so)."""

    def __init__(self, tokenizer, text_column: str, seq_length: int, num_rows: int):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.num_rows = num_rows
        self.packer = BlockPacker(seq_length, tokenizer.pad_token_id)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": [], "num_tokens": []}
        blocks = []  # (block, its tokens that are not padding)
        for document in tokenize_documents(self.tokenizer, batch[self.text_column]):
            blocks.extend((block, self.packer.seq_length) for block, _ in self.packer.add(document))
        if indices and indices[-1] == self.num_rows - 1:
            real = len(self.packer.ids)
            last = self.packer.flush()
            if last is not None:
                blocks.append((last, real))
        for block, real in blocks:
            for name, values in block.items():
                out[name].append(values)
            out["num_tokens"].append(real)
        return out


class PackedBlocks(ResumableStream):
    """Packed blocks of a stream of tokenised documents (rows ``{"input_ids": [...]}``), produced lazily. A position
    inside a document (``skip``: its tokens already in earlier blocks) is kept, so a resumed run continues the
    document mid-way, exactly as the uninterrupted run would."""

    def __init__(self, documents, seq_length: int, pad_token_id: int, what: str = "stage 1 (pre-training) data"):
        super().__init__(documents, what)
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self._packer: BlockPacker | None = None

    def _pass(self, stream, state, skip: int):
        self._packer = packer = BlockPacker(self.seq_length, self.pad_token_id)
        before = state  # the source's state before the current document (None: the start of the pass)
        for row in stream:
            document = row["input_ids"]
            after = stream.state_dict()
            for block, consumed in packer.add(document, skip):
                if consumed < len(document):  # the document continues in the next block
                    yield block, before, consumed
                else:
                    yield block, after, 0
            skip, before = 0, after

    def _end_of_pass(self):
        last = self._packer.flush() if self._packer is not None else None
        return iter([last] if last is not None else [])


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
    from conan_hf.stages.sft import _token_ids

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [bos + ids + eos for ids in _token_ids(tokenizer, list(texts))]


#: Texts per batch of the tokenising ``map`` (one tokenizer call each).
MAP_BATCH_SIZE = 1000


def pack_dataset(dataset, tokenizer, text_column: str, seq_length: int):
    """The packed blocks of a data-layer dataset (:func:`conan_hf.data.sources.load_sources`), equal to
    :func:`pack_documents` over its texts in order.

    - memory-mapped ``datasets.Dataset``: one batched ``map`` (tokenise + pack, the unfinished block carried between
      batches) written to the ``datasets`` cache, by the main process of each node first (the others load the
      cache); returns a memory-mapped ``Dataset`` with a ``num_tokens`` column (tokens of each block that are not
      padding).
    - ``datasets.IterableDataset`` (streamed): tokenised in a lazy batched ``map``, packed lazily by
      :class:`PackedBlocks` (a resumable, endless stream; see :mod:`conan_hf.training.streaming`).
    """
    from datasets import Features, IterableDataset, Value
    from datasets import Sequence as ArrowList

    if isinstance(dataset, IterableDataset):
        documents = dataset.map(lambda batch: {"input_ids": tokenize_documents(tokenizer, batch[text_column])},
                                batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=[text_column, LOCATION])
        return PackedBlocks(documents, seq_length, tokenizer.pad_token_id)
    ids = ArrowList(Value("int32"))
    features = Features({"input_ids": ids, "position_ids": ids, "labels": ids, "num_tokens": Value("int64")})
    with main_process_first():
        return dataset.map(_TokenizeAndPack(tokenizer, text_column, seq_length, len(dataset)), batched=True,
                           batch_size=MAP_BATCH_SIZE, with_indices=True, remove_columns=dataset.column_names,
                           features=features, desc="tokenising and packing")


class PretrainRunner(CausalLMRunner):
    """Stage 1: the stage-0 tokenizer, the packed blocks of the texts, a new `ConanForCausalLM`."""

    stage, number, config_class, what = "pretrain", 1, PretrainConfig, "stage 1 (pre-training) data"

    def load_datasets(self):
        """The texts packed into blocks of ``seq_length`` tokens (:func:`pack_dataset`)."""
        from transformers import AutoTokenizer

        from conan_hf.demo import demo_texts

        config = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        self.texts = load_sources(config.data, lambda: [{"text": t} for t in demo_texts()],
                                  required=[config.text_column], text=[config.text_column], keep=[config.text_column],
                                  what=self.what, streaming=self.streamed)
        packed = pack_dataset(self.texts, self.tokenizer, config.text_column, config.seq_length)
        if self.streamed:
            self.num_tokens, self.num_blocks = None, None
            return packed
        import pyarrow.compute

        self.num_tokens = int(pyarrow.compute.sum(packed.data.column("num_tokens")).as_py())
        self.num_blocks = len(packed)
        return packed.remove_columns("num_tokens")

    def load_model(self):
        return new_causal_lm(self.config.model, self.tokenizer, self.config.model_overrides)

    def collator(self):
        from transformers import default_data_collator

        return default_data_collator

    def create_trainer(self, model, datasets, args):
        trainer = super().create_trainer(model, datasets, args)
        if self.streamed:
            print_main(f"[stage 1] pre-training {model.num_parameters():,} parameters on a stream of documents "
                       f"(blocks of {self.config.seq_length} tokens, packed as they are read)")
        else:
            print_main(f"[stage 1] pre-training {model.num_parameters():,} parameters on {len(self.texts)} documents "
                       f"({self.num_tokens:,} tokens, {self.num_blocks} packed blocks of {self.config.seq_length})")
        return trainer

    def summary(self, trainer):
        return "", {"num_blocks": self.num_blocks, "num_tokens": self.num_tokens, "streamed": self.streamed}


run, main = PretrainRunner.entry_points(__doc__)


if __name__ == "__main__":
    main()
