"""Stages 0-2 on the data layer (issue 11): packing in a batched map and over a stream equals packing the whole list,
a streamed run resumed from a checkpoint sees exactly the batches of an uninterrupted one, SFT preprocessing in a
batched map equals the per-row reference, the tokenizer trains from an iterator over the rows."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conan_hf.data.sources import load_sources
from conan_hf.errors import DataError

WORDS = "the cat sat on mat a dog ran in park 大 熊猫 吃 竹子".split()


@pytest.fixture(scope="module")
def tokenizer():
    from conan_hf.tokenizer import train_tokenizer

    return train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, show_progress=False)


def _texts(count: int, seed: int = 0, longest: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(count)]


def _write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def _naive_blocks(documents: list[list[int]], length: int, pad: int) -> list[tuple[list, list, list]]:
    """Packing written from its definition: concatenate, cut every ``length`` tokens; a segment is a maximal run of
    one document (or of padding) within one block; positions count from the segment start, labels are -100 on a
    segment's first token and on padding."""
    tokens = [(t, d) for d, doc in enumerate(documents) for t in doc]
    tokens += [(pad, -1)] * (-len(tokens) % length)
    blocks = []
    for start in range(0, len(tokens), length):
        chunk = tokens[start: start + length]
        ids, pos, labels = [], [], []
        for i, (token, doc) in enumerate(chunk):
            new_segment = i == 0 or chunk[i - 1][1] != doc
            pos.append(0 if new_segment else pos[-1] + 1)
            ids.append(token)
            labels.append(-100 if new_segment or doc == -1 else token)
        blocks.append((ids, pos, labels))
    return blocks


def _rows(blocks) -> list[tuple[list, list, list]]:
    return [(list(b["input_ids"]), list(b["position_ids"]), list(b["labels"])) for b in blocks]


# ---- stage 1: packing ------------------------------------------------------------------------------------------------
def test_packing_in_a_map_and_over_a_stream_equals_packing_the_whole_list(tokenizer, tmp_path, monkeypatch):
    from conan_hf.stages import pretrain

    texts = _texts(300)
    path = _write_texts(tmp_path / "texts.jsonl", texts)
    documents = pretrain.tokenize_documents(tokenizer, texts)
    reference = _naive_blocks(documents, 16, tokenizer.pad_token_id)
    assert _rows([dict(zip(("input_ids", "position_ids", "labels"), b)) for b in zip(
        *pretrain.pack_documents(documents, 16, tokenizer.pad_token_id).values())]) == reference
    monkeypatch.setattr(pretrain, "MAP_BATCH_SIZE", 7)  # many map batches: the unfinished block is carried over

    mapped = pretrain.pack_dataset(load_sources([str(path)], required=["text"], keep=["text"],
                                                cache_dir=str(tmp_path / "cache")), tokenizer, "text", 16)
    assert _rows(mapped) == reference
    assert sum(mapped["num_tokens"]) == sum(map(len, documents))

    streamed = pretrain.pack_dataset(load_sources([str(path)], required=["text"], keep=["text"], streaming=True),
                                     tokenizer, "text", 16)
    blocks = iter(streamed)
    first_pass = [next(blocks) for _ in range(len(reference))]
    assert _rows(first_pass) == reference
    # the stream is endless: a second pass starts again at the first document
    assert _rows([next(blocks) for _ in range(3)]) == reference[:3]


def test_a_resumed_stream_continues_exactly_where_it_stopped(tokenizer, tmp_path):
    """At every position (mid-document, at a document end, at and after the end of a pass), a fresh stream resumed
    from the saved position (through JSON, as in a checkpoint) yields exactly the blocks the uninterrupted one does."""
    from conan_hf.stages.pretrain import pack_dataset

    path = _write_texts(tmp_path / "texts.jsonl", _texts(60, longest=40))

    def stream():
        return pack_dataset(load_sources([str(path)], required=["text"], keep=["text"], streaming=True), tokenizer,
                            "text", 8)

    whole = stream()
    blocks = iter(whole)
    uninterrupted = [next(blocks) for _ in range(400)]
    per_pass = next(i for i in range(1, 400) if whole.position_after(i)["pass"] == 1)
    assert 100 < per_pass < 300
    middles = [k for k in range(1, 60) if whole.position_after(k)["skip"] > 0]
    assert middles, "no block boundary falls inside a document; the test would not cover it"
    for k in [0, 1, middles[0], middles[-1], 59, per_pass - 1, per_pass, per_pass + 1, per_pass + middles[0], 399]:
        resumed = stream()
        resumed.resume(json.loads(json.dumps(whole.position_after(k))))
        again = iter(resumed)
        assert _rows([next(again) for _ in range(len(uninterrupted) - k)]) == _rows(uninterrupted[k:]), k
        assert resumed.position_after(400) == whole.position_after(400)


def _pretrain_config(tmp_path: Path, tokenizer_dir: Path, data: list, output: str, **values):
    from conan_hf.stages.pretrain import PretrainConfig
    from conan_hf.training.config import config_from_dict

    return config_from_dict(PretrainConfig, {
        "tokenizer": str(tokenizer_dir), "model": "tiny", "output_dir": str(tmp_path / output), "data": data,
        "seq_length": 16, "per_device_train_batch_size": 2, "max_steps": 6, "save_steps": 3, "logging_steps": 1,
        "learning_rate": 3e-3, "bf16": False, "num_threads": 1, "disable_tqdm": True, "report_to": "none",
        **values})


def test_streamed_pretraining_resumed_mid_stream_equals_an_uninterrupted_run(tokenizer, tmp_path, restore_threads,
                                                                              caplog):
    """Stage 1 on a streamed source, stopped after its step-3 checkpoint and resumed, trains steps 4-6 on the same
    blocks as an uninterrupted run: the same losses and bit-identical weights."""
    from safetensors.torch import load_file

    from conan_hf.stages.pretrain import run
    from conan_hf.training.checkpoints import STAGE_RECORD
    from conan_hf.training.streaming import STREAM_POSITION

    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    path = _write_texts(tmp_path / "texts.jsonl", _texts(200))
    data = [{"path": str(path), "streaming": True}]
    reference = run(_pretrain_config(tmp_path, tokenizer_dir, data, "ref"))
    assert reference["streamed"] and reference["global_step"] == 6

    # "Interrupted" after step 3: what a killed run leaves is its committed checkpoint-3 (and nothing later).
    interrupted = tmp_path / "ref"
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoint-6")
    position = json.loads((interrupted / "checkpoint-3" / STREAM_POSITION.format(rank=0)).read_text())
    assert position["examples"] == 3 * 2 and position["pass"] == 0
    with caplog.at_level("INFO"):
        resumed = run(_pretrain_config(tmp_path, tokenizer_dir, data, "ref"))
    assert f"Resuming from {interrupted / 'checkpoint-3'}" in caplog.text
    assert "resuming the stream after 6 examples" in caplog.text
    # steps 1-3 come from the checkpoint's log, 4-6 were trained again after the resume
    assert resumed["losses"] == reference["losses"] and len(resumed["losses"]) == 6
    weights = load_file(interrupted / "final" / "model.safetensors")
    # the reference's weights were overwritten by the resumed run's final folder: compare with a third, fresh run
    fresh = run(_pretrain_config(tmp_path, tokenizer_dir, data, "fresh"))
    for name, tensor in load_file(Path(fresh["final_dir"]) / "model.safetensors").items():
        assert torch.equal(weights[name], tensor), name
    record = json.loads((Path(fresh["final_dir"]) / STAGE_RECORD).read_text())
    assert record["summary"]["num_blocks"] is None  # a stream has no length


def test_streamed_pretraining_reads_only_what_it_trains_on_and_needs_max_steps(tokenizer, tmp_path, restore_threads):
    """A streamed source is read as training consumes it: a bad row far into the file is never reached by a 2-step
    run (reading every row first, as before, stopped at it). Without max_steps a stream is refused clearly."""
    from conan_hf.stages.pretrain import run

    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    path = tmp_path / "texts.jsonl"
    _write_texts(path, _texts(5000))
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": 42}) + "\n")
    data = [{"path": str(path), "streaming": True}]
    summary = run(_pretrain_config(tmp_path, tokenizer_dir, data, "lazy", max_steps=2, save_steps=100))
    assert summary["global_step"] == 2
    with pytest.raises(DataError, match=r"texts\.jsonl:5001: .*column 'text' must be a text"):
        run(_pretrain_config(tmp_path, tokenizer_dir, [str(path)], "whole", max_steps=2, save_steps=100))
    with pytest.raises(DataError, match="a stream has no length.*set max_steps"):
        run(_pretrain_config(tmp_path, tokenizer_dir, data, "endless", max_steps=-1))


# ---- stage 2: SFT preprocessing --------------------------------------------------------------------------------------
def _sft_rows(count: int) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for i in range(count):
        row = {"instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
               "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))}
        if i % 3:
            row["input"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        if i % 17 == 5:  # a prompt longer than max_length: no response token left, the example is left out
            row["instruction"] = " ".join(["熊猫"] * 60)
        rows.append(row)
    return rows


def test_sft_preprocessing_in_a_map_and_over_a_stream_equals_the_per_row_reference(tokenizer, tmp_path, caplog):
    from conan_hf.stages import sft
    from conan_hf.training.streaming import ResumableStream

    rows = _sft_rows(120)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    reference = []
    for row in rows:
        example = sft.build_sft_example(tokenizer, row["instruction"], row.get("input", ""), row["output"], 48)
        if any(label != -100 for label in example["labels"]):
            reference.append((example["input_ids"], example["attention_mask"], example["labels"]))
    assert 0 < len(reference) < len(rows)

    def triples(examples):
        return [(list(e["input_ids"]), list(e["attention_mask"]), list(e["labels"])) for e in examples]

    spec = dict(required=["instruction", "output"], keep=list(sft.SFT_COLUMNS))
    with caplog.at_level("WARNING"):
        mapped = sft.preprocess(load_sources([str(path)], cache_dir=str(tmp_path / "cache"), **spec), tokenizer, 48)
    assert triples(mapped) == reference
    assert f"{len(rows) - len(reference)} of {len(rows)} examples had no response token" in caplog.text

    stream = ResumableStream(sft.preprocess(load_sources([str(path)], streaming=True, **spec), tokenizer, 48))
    examples = iter(stream)
    uninterrupted = [next(examples) for _ in range(len(reference) + 10)]
    assert triples(uninterrupted) == reference + reference[:10]  # then a second pass
    for k in (1, 37, len(reference), len(reference) + 3):  # resumed: exactly the examples after the k-th
        resumed = ResumableStream(sft.preprocess(load_sources([str(path)], streaming=True, **spec), tokenizer, 48))
        resumed.resume(json.loads(json.dumps(stream.position_after(k))))
        again = iter(resumed)
        assert triples([next(again) for _ in range(len(uninterrupted) - k)]) == triples(uninterrupted[k:]), k


# ---- stage 0: the tokenizer from an iterator -------------------------------------------------------------------------
def test_tokenizer_stage_trains_from_the_rows_streamed_or_memory_mapped(tmp_path):
    from conan_hf.stages.tokenizer import TokenizerConfig, run
    from conan_hf.tokenizer import train_tokenizer
    from conan_hf.training.checkpoints import STAGE_RECORD
    from conan_hf.training.config import config_from_dict

    texts = _texts(2500, seed=4)
    path = _write_texts(tmp_path / "texts.jsonl", texts)
    expected = train_tokenizer(texts, vocab_size=300, show_progress=False).get_vocab()
    for name, source in (("mapped", str(path)), ("streamed", {"path": str(path), "streaming": True})):
        config = config_from_dict(TokenizerConfig, {"output_dir": str(tmp_path / name), "vocab_size": 300,
                                                    "data": [source]})
        assert run(config).get_vocab() == expected, name
        summary = json.loads((tmp_path / name / STAGE_RECORD).read_text())["summary"]
        assert summary["num_texts"] == len(texts)
        assert summary["texts_sha256"] == hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()


def test_streamed_sft_resumed_mid_stream_equals_an_uninterrupted_run(tokenizer, tmp_path, restore_threads):
    from safetensors.torch import load_file

    from conan_hf.stages.pretrain import new_causal_lm
    from conan_hf.stages.sft import SFTConfig, run
    from conan_hf.training.config import config_from_dict

    torch.manual_seed(0)
    model_dir = tmp_path / "lm"
    new_causal_lm("tiny", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _sft_rows(40)), encoding="utf-8")

    def config(output: str):
        return config_from_dict(SFTConfig, {
            "model": str(model_dir), "output_dir": str(tmp_path / output), "max_length": 48, "max_steps": 4,
            "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 3, "learning_rate": 3e-3,
            "bf16": False, "num_threads": 1, "disable_tqdm": True,
            "data": [{"path": str(path), "streaming": True}]})

    reference = run(config("ref"))
    assert reference["streamed"] and reference["num_examples"] is None
    shutil.rmtree(tmp_path / "ref" / "final")
    shutil.rmtree(tmp_path / "ref" / "checkpoint-4")
    resumed = run(config("ref"))  # from checkpoint-2: the stream continues after 2 x 3 examples
    assert resumed["losses"] == reference["losses"]
    fresh = run(config("fresh"))
    weights = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    for name, tensor in load_file(Path(fresh["final_dir"]) / "model.safetensors").items():
        assert torch.equal(weights[name], tensor), name


_RANK_PROBE = """
import json, os, sys
import conan_hf.training.streaming as streaming
from conan_hf.stages import pretrain
from conan_hf.training.config import config_from_dict

seen = []
iterate = streaming.ResumableStream.__iter__


def record(self):  # the blocks this rank's dataloader takes from its stream
    for block in iterate(self):
        seen.append(list(block["input_ids"]))
        yield block


streaming.ResumableStream.__iter__ = record
folder = sys.argv[1]
config = config_from_dict(pretrain.PretrainConfig, {
    "tokenizer": folder + "/tok", "model": "tiny", "output_dir": folder + "/out", "seq_length": 16,
    "data": [{"path": folder + "/texts.jsonl", "streaming": True}], "per_device_train_batch_size": 2,
    "max_steps": 3, "save_steps": 2, "bf16": False, "num_threads": 1, "disable_tqdm": True, "resume": "no"})
pretrain.run(config)
with open(f"{folder}/seen{os.environ['RANK']}.json", "w") as handle:
    json.dump(seen, handle)
"""


@pytest.mark.slow
def test_two_ranks_each_train_on_their_own_part_of_the_stream(tokenizer, tmp_path):
    """Under 2 processes (gloo), each rank packs and trains on its own shard of the stream (the data layer's
    split), which accelerate does not split again nor dispatch from rank 0; each writes its stream position."""
    import os
    import subprocess
    import sys

    from conan_hf.stages.pretrain import pack_dataset
    from conan_hf.training.streaming import STREAM_POSITION

    repo = Path(__file__).resolve().parents[1]
    tokenizer.save_pretrained(tmp_path / "tok")
    path = _write_texts(tmp_path / "texts.jsonl", _texts(400))
    (tmp_path / "probe.py").write_text(_RANK_PROBE)
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             str(tmp_path / "probe.py"), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen{rank}.json").read_text())
        # 3 steps x 2 blocks, plus the one batch accelerate's dataloader reads ahead; a second split of the stream
        # (accelerate's IterableDatasetShard keeping 1/2 of every 2 batches) would read twice as many
        assert len(seen) == 3 * 2 + 2, rank
        shard = iter(pack_dataset(load_sources([{"path": str(path), "streaming": True}], required=["text"],
                                               keep=["text"], rank=rank, world_size=2), tokenizer, "text", 16))
        assert seen == [list(next(shard)["input_ids"]) for _ in seen], rank
        position = json.loads((tmp_path / "out" / "checkpoint-2" / STREAM_POSITION.format(rank=rank)).read_text())
        assert position["examples"] == 2 * 2
    first, second = (json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in (0, 1))
    assert first[:3] != second[:3]
