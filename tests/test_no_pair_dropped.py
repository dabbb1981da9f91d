"""Every training row reaches a batch: stage 3 trains every pair it reads (instructions with fewer pairs than a batch
and the remainders of the others in mixed-instruction batches, each row pooled without its own prompt), and stage 4
trains a task smaller than its batch size."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conan_hf.stages import weak
from conan_hf.training.config import config_from_dict

PROMPT_FORMAT = weak.WeakConfig.prompt_format


def _pairs_file(path: Path, n: int = 96, instructions: int = 48) -> Path:
    rows = [{"instruction": f"Task {i % instructions}.", "input": f"question {i}",
             "output": f"answer {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_instruction_batches_keep_every_item_and_fill_batches():
    # 3 instructions of 10, 5 and 1 items, batch 4: 2 full batches of the first, 1 of the second, then the
    # remainders (2 + 1 + 1 = 4) in one mixed batch.
    items = [(k, (f"a{k}-{i}", f"p{k}-{i}"), (k, i)) for k, n in enumerate((10, 5, 1)) for i in range(n)]
    batches = list(weak.instruction_batches(items, 4))
    assert sorted(p for b in batches for p in b) == sorted(p for _, _, p in items)
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert [{k for k, _ in b} for b in batches[:3]] == [{0}, {0}, {1}]
    assert {k for k, _ in batches[3]} == {0, 1, 2}
    # A last batch of one item joins another batch (it would have no in-batch negative).
    lone = list(weak.instruction_batches(items[:9], 4, join_lone_row=True))
    assert [len(b) for b in lone] == [4, 5]
    # Never two items with a shared text in one batch.
    clash = [(0, ("x", "1"), 0), (0, ("x", "2"), 1), (1, ("y", "1"), 2), (1, ("z", "3"), 3)]
    assert list(weak.instruction_batches(clash, 2)) == [[2, 3], [0], [1]]


def test_mixed_batch_pools_each_row_without_its_own_prompt(tiny_model_dir):
    """A batch of several instructions (per-row prompt lengths, pooled by the stage's hook) gives each row the embedding
    sentence-transformers gives it alone with its prompt."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    model = SentenceTransformer(str(tiny_model_dir))
    model.eval()
    rows = [{"anchor": "what is red", "positive": "a colour", "instruction": "Answer it."},
            {"anchor": "pandas eat bamboo", "positive": "yes", "instruction": "Find a passage about the topic."},
            {"anchor": "no prompt here", "positive": "none", "instruction": ""}]
    collator = weak.InstructionPromptCollator(preprocess_fn=model.preprocess, prompt_format=PROMPT_FORMAT)
    batch = collator(rows)
    lengths = batch["anchor_prompt_length"].tolist()
    assert lengths[2] == 0 and lengths[0] > 0 and lengths[1] > lengths[0]
    features = {k.removeprefix("anchor_"): v for k, v in batch.items() if k.startswith("anchor_")}
    hooks = [m.register_forward_pre_hook(weak.exclude_row_prompts, with_kwargs=True)
             for m in model.modules() if isinstance(m, Pooling)]
    try:
        with torch.no_grad():
            got = model(features)["sentence_embedding"]
    finally:
        for hook in hooks:
            hook.remove()
    for i, row in enumerate(rows):
        prompt = PROMPT_FORMAT.format(instruction=row["instruction"]) if row["instruction"] else None
        alone = model.encode([row["anchor"]], prompt=prompt, convert_to_tensor=True)[0]
        torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=1e-4)


def test_stage3_trains_all_96_pairs_of_48_instructions(tiny_model_dir, tmp_path, restore_threads, capsys):
    path = _pairs_file(tmp_path / "pairs.jsonl")
    seen: list[str] = []
    original = weak.InstructionPromptCollator.__call__

    def spy(self, features):
        seen.extend(row["anchor"] for row in features)
        return original(self, features)

    config = config_from_dict(weak.WeakConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "weak"), "data": [str(path)],
        "num_train_epochs": 1, "per_device_train_batch_size": 8, "max_seq_length": 48, "bf16": False,
        "num_threads": 1, "disable_tqdm": True, "logging_steps": 1, "save_steps": 1000})
    weak.InstructionPromptCollator.__call__ = spy
    try:
        summary = weak.run(config)
    finally:
        weak.InstructionPromptCollator.__call__ = original
    assert summary["global_step"] >= 12
    assert (summary["pairs_read"], summary["pairs_trained"], summary["num_pairs"]) == (96, 96, 96)
    assert "96 pairs read, 96 trained" in capsys.readouterr().out
    assert sorted(seen) == sorted(f"question {i}" for i in range(96))  # each pair in exactly one batch


def test_streamed_stage3_trains_the_remainders(tiny_model_dir, tmp_path, restore_threads, capsys):
    """A stream of 20 pairs of 10 instructions, batch 4, 5 steps: one pass of the stream, every row batched."""
    path = _pairs_file(tmp_path / "pairs.jsonl", n=20, instructions=10)
    config = config_from_dict(weak.WeakConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "weak"),
        "data": [{"path": str(path), "streaming": True}], "max_steps": 5, "per_device_train_batch_size": 4,
        "max_seq_length": 48, "bf16": False, "num_threads": 1, "disable_tqdm": True, "logging_steps": 1,
        "save_steps": 1000})
    summary = weak.run(config)
    assert summary["global_step"] == 5
    assert (summary["pairs_read"], summary["pairs_trained"]) == (20, 20)
    assert "20 pairs read, 20 trained" in capsys.readouterr().out


def test_stage4_trains_an_sts_task_smaller_than_its_batch(tiny_model_dir, tmp_path, restore_threads, capsys):
    from conan_hf.stages import supervised

    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": f"a cat sat {i}", "sentence2": f"a cat is sitting {i}",
                                       "score": i / 4}) + "\n" for i in range(5)), encoding="utf-8")
    names: list[str] = []
    original = supervised.MultiTaskCollator.__call__

    def spy(self, features):
        names.append(features[0]["dataset_name"])
        return original(self, features)

    config = config_from_dict(supervised.SupervisedConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "sup"), "max_seq_length": 32, "num_threads": 1,
        "bf16": False, "disable_tqdm": True, "num_train_epochs": 1, "logging_steps": 1, "save_steps": 1000,
        "tasks": [{"name": "sim", "type": "sts", "batch_size": 8, "data": [str(sts)]}]})
    supervised.MultiTaskCollator.__call__ = spy
    try:
        summary = supervised.run(config)
    finally:
        supervised.MultiTaskCollator.__call__ = original
    assert summary["global_step"] >= 1 and names.count("sim") >= 1
    assert summary["tasks"]["sim"]["rows"] == summary["tasks"]["sim"]["rows_trained"] == 5
    assert "sim: 5 rows read, 5 trained" in capsys.readouterr().out


def test_stage4_refuses_a_task_of_one_row(tiny_model_dir, tmp_path):
    """A task of one row has nothing to compare it with in a batch: one line naming the task, exit 2."""
    import subprocess
    import sys

    sts = tmp_path / "one.jsonl"
    sts.write_text(json.dumps({"sentence1": "a cat", "sentence2": "a cat sits", "score": 0.5}) + "\n", encoding="utf-8")
    tasks = json.dumps([{"name": "sim", "type": "sts", "batch_size": 8, "data": [str(sts)]}])
    result = subprocess.run([sys.executable, "-m", "conan_hf.stages", "supervised", "--model", str(tiny_model_dir),
                             "--output_dir", str(tmp_path / "sup"), "--max_seq_length", "32", "--bf16", "false",
                             "--tasks", tasks], capture_output=True, text=True, timeout=300, check=False,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "task 'sim' has 1 row(s); a task needs at least 2" in last
