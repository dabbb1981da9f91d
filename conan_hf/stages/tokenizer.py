"""Stage 0 (paper §3.1): train the byte-level BPE tokenizer that every later stage uses.

    conan-train tokenizer --config conan_hf/stages/configs/tokenizer.yaml --preset tiny

The paper's vocabulary has 150,000 entries; the special tokens (bos/eos/pad and the SFT instruction separators) come
from :mod:`conan_hf.tokenizer`. The result is a fast tokenizer folder that `AutoTokenizer.from_pretrained` loads and
that stage 1 saves next to the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conan_hf.data.sources import load_sources
from conan_hf.training.checkpoints import STAGE_RECORD, read_stage_record, write_json_atomic
from conan_hf.training.config import option
from conan_hf.training.distributed import print_main
from conan_hf.training.runner import StageRunner


@dataclasses.dataclass
class TokenizerConfig:
    """Options of stage 0 (each field's ``metadata["help"]`` says what it means)."""

    output_dir: str = option("runs/tokenizer", help="the tokenizer folder (the next stage's ``tokenizer``).")
    data: Any = option(help="text sources (see :mod:`conan_hf.data.sources`); ``demo`` is the embedded bilingual "
                            "corpus.", factory=lambda: ["demo"])
    text_column: str = option("text", help="the column holding the text in file/Hub sources.")
    vocab_size: int = option(150_000, help="target vocabulary size (150,000 in the paper).")
    min_frequency: int = option(2, help="minimum pair frequency for a BPE merge.")
    model_max_length: int = option(32_768, help="stored in the tokenizer (the model's context length).")


def _already_trained(out: Path, config: TokenizerConfig, digest: str) -> bool:
    """Whether ``out`` holds a tokenizer trained with these options on exactly these texts (its stage record)."""
    record = read_stage_record(out)
    if record is None:
        return False
    options = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return record.get("config") == options and (record.get("summary") or {}).get("texts_sha256") == digest


#: Texts per batch read from the data layer.
BATCH_SIZE = 1000


def iter_texts(dataset, column: str) -> Iterator[str]:
    """The texts of a data-layer dataset (memory-mapped or streamed), read ``BATCH_SIZE`` rows at a time: only one
    batch is held as Python strings."""
    for batch in dataset.select_columns([column]).iter(batch_size=BATCH_SIZE):
        yield from batch[column]


def texts_digest(texts: Iterator[str]) -> tuple[str, int]:
    """(sha256 of the texts joined by NUL characters, their number), computed as they stream by."""
    digest, count = hashlib.sha256(), 0
    for text in texts:
        if count:
            digest.update(b"\0")
        digest.update(text.encode("utf-8"))
        count += 1
    return digest.hexdigest(), count


class TokenizerRunner(StageRunner):
    """Stage 0: no Trainer; its own "already done" check (same options and the same texts, by hash)."""

    stage, number, config_class, what = "tokenizer", 0, TokenizerConfig, "stage 0 (tokenizer) data"

    def run(self):
        """Train and save the tokenizer; returns it.

        The texts are never all in memory: one pass over the data layer's dataset (memory-mapped, or streamed with
        ``streaming: true``) hashes them (an unchanged corpus is not trained on again), a second feeds the BPE
        trainer."""
        from conan_hf.tokenizer import train_tokenizer

        config = self.config
        dataset = self.load_datasets()
        out = Path(config.output_dir)
        digest, num_texts = texts_digest(iter_texts(dataset, config.text_column))
        if _already_trained(out, config, digest):
            # Rewriting an identical tokenizer would make every later stage see a newer input and train again.
            print_main(f"[stage 0] already done: {out} (same options and texts; delete it to retrain)")
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(out))
        tokenizer = train_tokenizer(iter_texts(dataset, config.text_column), vocab_size=config.vocab_size,
                                    min_frequency=config.min_frequency, model_max_length=config.model_max_length)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out))
        write_json_atomic(out / STAGE_RECORD, {"stage": "tokenizer", "config": dataclasses.asdict(config),
                                               "summary": {"vocab_size": len(tokenizer), "num_texts": num_texts,
                                                           "texts_sha256": digest}})
        print_main(f"[stage 0] tokenizer: {len(tokenizer)} tokens from {num_texts} texts -> {out}")
        return tokenizer

    def load_datasets(self):
        """The text column of the ``data`` sources (a data-layer dataset)."""
        from conan_hf.demo import demo_texts

        column = self.config.text_column
        return load_sources(self.config.data, lambda: [{"text": t} for t in demo_texts()], required=[column],
                            text=[column], keep=[column], what=self.what)


run, main = TokenizerRunner.entry_points(__doc__)


if __name__ == "__main__":
    main()
