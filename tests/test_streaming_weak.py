"""Stage 3 on the data layer (issue 11): pairs read memory-mapped or streamed through ``load_sources`` and converted in
a batched ``map`` equal the pairs of the file computed naively; grouping by instruction and the teacher filter give
the groups and decisions of the list-based implementation; a stream is batched by instruction as it arrives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conan_hf.errors import DataError
from conan_hf.stages import weak

PROMPT_FORMAT = weak.WeakConfig.prompt_format


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _mixed_rows(n: int = 60) -> list[dict]:
    """instruction/input/output rows of three instructions, query/positive rows (some with an instruction), an
    instruction without input (the instruction alone is the query) and rows without instruction."""
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            rows.append({"instruction": "Answer the question.", "input": f"question {i}", "output": f"answer {i}"})
        elif kind == 1:
            rows.append({"query": f"q {i} é", "positive": f"p {i}", "extra": i})
        elif kind == 2:
            rows.append({"instruction": "翻译成英文。", "input": f"句子 {i}", "output": f"sentence {i}"})
        elif kind == 3:
            rows.append({"instruction": "Answer the question.", "query": f"query {i}", "positive": f"passage {i}"})
        else:
            rows.append({"instruction": f"Summarise item {i % 3}.", "output": f"summary {i}"})
    return rows


def _naive_pairs(paths: list[Path]) -> list[tuple[str, str, str]]:
    """(instruction, anchor, positive) straight from the files, by stage 3's rules."""
    out = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "query" in row and "positive" in row:
                out.append((row.get("instruction", ""), row["query"], row["positive"]))
            else:
                out.append((row.get("instruction", ""), row.get("input", ""), row["output"]))
    return out


def _naive_groups(pairs: list[tuple[str, str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(instruction, its (anchor, positive) pairs in order), instructions in order of first appearance."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for instruction, anchor, positive in pairs:
        groups.setdefault(instruction, []).append((anchor, positive))
    return list(groups.items())


def _triples(pairs) -> list[tuple[str, str, str]]:
    return [(r["instruction"], r["anchor"], r["positive"]) for r in pairs]


# ---- reading and grouping ---------------------------------------------------------------------------------------
def test_memory_mapped_and_streamed_pairs_equal_the_files(tmp_path):
    rows = _mixed_rows()
    first = _write_jsonl(tmp_path / "a.jsonl", rows[:35])
    second = _write_jsonl(tmp_path / "b.jsonl", rows[35:])  # sources with different columns concatenate
    sources = [str(first), {"path": str(second)}]
    expected = _naive_pairs([first, second])
    mapped = weak.load_pairs(sources, cache_dir=str(tmp_path / "cache"))
    assert _triples(mapped) == expected
    assert mapped.column_names == ["instruction", "anchor", "positive"]
    assert mapped.cache_files  # the pairs are a memory-mapped Arrow table, not Python objects
    streamed = weak.load_pairs([str(first), {"path": str(second), "streaming": True}])
    assert not isinstance(streamed, type(mapped))
    assert _triples(streamed) == expected
    # The list form (small data, tests) follows the same rules.
    assert [tuple(p.values()) for p in weak.to_pairs(rows)] == expected


def test_groups_are_memory_mapped_selections_equal_to_naive_grouping(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", _mixed_rows())
    pairs = weak.load_pairs([str(path)], cache_dir=str(tmp_path / "cache"))
    datasets, prompts = weak.group_by_instruction(pairs, PROMPT_FORMAT)
    expected = _naive_groups(_naive_pairs([path]))
    assert list(datasets) == [f"instruction_{k}" for k in range(len(expected))]
    for (name, dataset), (instruction, group) in zip(datasets.items(), expected, strict=True):
        assert list(zip(dataset["anchor"], dataset["positive"])) == group
        assert dataset.column_names == ["anchor", "positive"]
        assert prompts.get(name) == ({"anchor": PROMPT_FORMAT.format(instruction=instruction)} if instruction
                                     else None)
        assert dataset.cache_files == pairs.cache_files  # a selection of the same table, nothing copied


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_rows_name_their_file_and_line(tmp_path, streaming):
    rows = _mixed_rows(10)
    rows[6] = {"instruction": "x", "input": 7, "output": "y"}  # not a text: caught while reading
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:7: stage 3 \(weakly-supervised\) data: column 'input' must be a "
                                        r"text, got int 7"):
        list(weak.load_pairs([str(path)], streaming=streaming, cache_dir=str(tmp_path / "c1")))
    rows[6] = {"query": "only a query"}  # no positive, no output: caught by the pair conversion (batched map)
    path = _write_jsonl(tmp_path / "bad2.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:7: .*needs instruction/input/output or query/positive columns, "
                                        r"got \['query'\]"):
        list(weak.load_pairs([str(path)], streaming=streaming, cache_dir=str(tmp_path / "c2")))


# ---- a stream, batched by instruction ----------------------------------------------------------------------------
def _stream_reference(pairs: list[tuple[str, str, str]], batch_size: int) -> tuple[list[list[tuple]], int]:
    """Without repeated texts: each instruction's pairs in stream order, cut into batches of ``batch_size``; a batch is
    emitted when its last pair arrives; then the pairs left over (by instruction in order of first appearance, each in
    stream order) in mixed batches of ``batch_size``, the last one smaller. Returns the batches in emission order and
    the number of pairs left over."""
    seen: dict[str, list[tuple[int, tuple]]] = {}
    for position, pair in enumerate(pairs):
        seen.setdefault(pair[0], []).append((position, pair))
    batches, rest = [], []
    for items in seen.values():
        full = len(items) - len(items) % batch_size
        for start in range(0, full, batch_size):
            chunk = items[start:start + batch_size]
            batches.append((chunk[-1][0], [pair for _, pair in chunk]))
        rest += [pair for _, pair in items[full:]]
    batches.sort()
    return [b for _, b in batches] + [rest[i:i + batch_size] for i in range(0, len(rest), batch_size)], len(rest)


def test_stream_batches_hold_one_instruction_in_arrival_order():
    rng = np.random.default_rng(0)
    instructions = ["", "Answer.", "Translate.", "Summarise."]
    weights = [0.1, 0.5, 0.3, 0.1]
    pairs = [(instructions[rng.choice(4, p=weights)], f"anchor {i}", f"positive {i}") for i in range(500)]
    stream = [{"instruction": i, "anchor": a, "positive": p} for i, a, p in pairs]
    counts: dict[str, int] = {}
    out = list(weak._instruction_batches(stream, 8, counts))
    batches = [out[i:i + 8] for i in range(0, len(out), 8)]
    expected, left = _stream_reference(pairs, 8)
    assert [[(r["instruction"], r["anchor"], r["positive"]) for r in b] for b in batches] == expected
    assert counts == {"read": 500} and len(out) == 500  # every pair read is batched
    assert 0 < left < 8 * len(instructions) and len(batches[-1]) == left % 8
    mixed = (left + 7) // 8
    assert all(len({r["instruction"] for r in b}) > 1 for b in batches[-mixed:])
    batches = batches[:-mixed]  # the batches of one instruction, before the mixed remainders
    assert all(len({r["instruction"] for r in b}) == 1 for b in batches)
    # proportional: each instruction's share of the batches follows its share of the stream
    share = {i: sum(b[0]["instruction"] == i for b in batches) / len(batches) for i in instructions}
    assert all(abs(share[i] - w) < 0.1 for i, w in zip(instructions, weights))


def test_stream_batches_never_repeat_a_text():
    stream = [{"instruction": "A", "anchor": a, "positive": p} for a, p in
              [("x", "1"), ("x", "2"), ("y", "3"), ("z", "1"), ("w", "4"), ("v", "5")]]
    out = list(weak._instruction_batches(stream, 2))
    # ("x","2") clashes with ("x","1") and opens a second batch; ("y","3") completes the first; ("z","1") no longer
    # clashes (its batch is gone) and completes the second; ("w","4") and ("v","5") make the third.
    assert [(r["anchor"], r["positive"]) for r in out] == [("x", "1"), ("y", "3"), ("x", "2"), ("z", "1"),
                                                           ("w", "4"), ("v", "5")]
    # The remainders at the end of the stream follow the same rule across instructions.
    tail = [{"instruction": i, "anchor": a, "positive": p} for i, a, p in [("A", "x", "1"), ("B", "x", "2"),
                                                                          ("C", "y", "3")]]
    out = list(weak._instruction_batches(tail, 2))
    assert [r["anchor"] for r in out] == ["x", "y", "x"]  # ("x","1") + ("y","3"), then ("x","2") alone


def test_instruction_prompt_collator_takes_the_batch_instruction(tiny_model_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.data_collator import (
        SentenceTransformerDataCollator,
    )

    from conan_hf.sentence import prompt_tokens_in_joint_encoding

    model = SentenceTransformer(str(tiny_model_dir))
    checked: list[tuple[str, list[str] | None]] = []
    collator = weak.InstructionPromptCollator(preprocess_fn=model.preprocess, prompt_format=PROMPT_FORMAT,
                                              check_prompt=lambda prompt, texts=None: checked.append((prompt, texts)))
    rows = [{"anchor": f"what is {i}", "positive": f"it is {i}", "instruction": "Answer it."} for i in range(3)]
    batch = collator(rows)
    collator(rows)
    prompt = PROMPT_FORMAT.format(instruction="Answer it.")
    assert checked == [(prompt, None)]  # once per distinct prompt
    # the same tensors as sentence-transformers' own collator given that prompt for the anchor column
    reference = SentenceTransformerDataCollator(preprocess_fn=model.preprocess, prompts={"anchor": prompt})(
        [{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    assert batch.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(batch[key], value), key
        else:
            assert batch[key] == value, key
    assert int(torch.as_tensor(batch["anchor_prompt_length"]).flatten()[0]) > 0
    plain = collator([{**r, "instruction": ""} for r in rows])  # no instruction: no prompt
    assert "anchor_prompt_length" not in plain
    # Mixed instructions: each row's own prompt, its length per row (sentence-transformers' count for that prompt).
    mixed = [rows[0], {**rows[1], "instruction": "Other task."}, {**rows[2], "instruction": ""}]
    batch = collator(mixed)
    prompts = [prompt, PROMPT_FORMAT.format(instruction="Other task."), ""]
    assert batch["anchor_prompt_length"].tolist() == [
        prompt_tokens_in_joint_encoding(model.tokenizer, p, r["anchor"]) if p else 0 for p, r in zip(prompts, mixed)]
    assert torch.equal(batch["anchor_input_ids"], SentenceTransformerDataCollator(preprocess_fn=model.preprocess)(
        [{"anchor": p + r["anchor"], "positive": r["positive"]} for p, r in zip(prompts, mixed)])["anchor_input_ids"])
    assert (prompts[1], None) in checked and (prompt, [rows[0]["anchor"]]) in checked


# ---- teacher filter ------------------------------------------------------------------------------------------------
def test_teacher_filter_per_group_equals_filtering_all_pairs(tiny_model_dir, restore_threads):
    """The stage filters each instruction group with its instruction as the teacher's prompt; the reference is the
    list-based stage: one filter over all pairs with a prompt per row, then grouping the kept pairs."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from conan_hf.data.teacher import filter_by_teacher
    from conan_hf.demo import demo_instructions

    torch.set_num_threads(1)
    rows = demo_instructions()[::3] + [{"query": "what is red", "positive": "a colour"},
                                      {"query": "a bamboo eater", "positive": "the giant panda"}]
    pairs = Dataset.from_list(weak.to_pairs(rows))
    teacher = SentenceTransformer(str(tiny_model_dir))
    per_row = [PROMPT_FORMAT.format(instruction=i) if i else None for i in pairs["instruction"]]
    _, reference = filter_by_teacher(pairs, teacher, threshold=-2.0, query_column="anchor", score_column=None,
                                     query_prompt=per_row, show_progress_bar=False, verbose=False)
    scores = np.sort(np.asarray(reference.scores))
    k = len(scores) // 3
    threshold = float((scores[k - 1] + scores[k]) / 2)  # midway between two scores: no pair sits on the threshold
    kept_ref = [p for p, s in zip(_triples(pairs), reference.scores) if s >= threshold]

    groups, report = weak.filter_groups_by_teacher(pairs, weak.instruction_groups(pairs), teacher, threshold,
                                                   PROMPT_FORMAT, show_progress_bar=False)
    datasets, _ = weak._group_datasets(pairs, groups, PROMPT_FORMAT)
    got = [(instruction, list(zip(d["anchor"], d["positive"])))
           for (instruction, _), d in zip(groups, datasets.values(), strict=True)]
    assert got == _naive_groups(kept_ref)
    assert (report.total, report.kept, report.dropped) == (len(pairs), len(kept_ref), len(pairs) - len(kept_ref))
    np.testing.assert_allclose(report.scores, reference.scores, atol=1e-5)  # in row order
    kept, report2 = weak.filter_pairs_by_teacher(pairs, teacher, threshold, PROMPT_FORMAT)
    assert _triples(kept) == kept_ref and report2.kept == report.kept


# ---- the stage ---------------------------------------------------------------------------------------------------
def _stage_config(tiny_model_dir: Path, tmp_path: Path, data, **overrides):
    from conan_hf.training.config import config_from_dict

    return config_from_dict(weak.WeakConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "weak"), "data": data, "max_steps": 2,
        "per_device_train_batch_size": 4, "max_seq_length": 32, "bf16": False, "num_threads": 1,
        "disable_tqdm": True, "logging_steps": 1, "save_steps": 100, **overrides})


def test_streamed_stage_trains_and_needs_max_steps(tiny_model_dir, tmp_path, restore_threads):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _mixed_rows(80))
    data = [{"path": str(path), "streaming": True}]
    with pytest.raises(DataError, match=r"streamed source .* needs max_steps"):
        weak.run(_stage_config(tiny_model_dir, tmp_path, data, max_steps=-1))
    summary = weak.run(_stage_config(tiny_model_dir, tmp_path, data))
    assert summary["streamed"] is True and summary["global_step"] == 2
    assert summary["final_alpha"] == 1.0 and summary["attention_mode"] == "bidirectional"
    assert all(np.isfinite(loss) for _, loss in summary["losses"])


RANK_SCRIPT = """
import json, sys
import torch
from accelerate import PartialState
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from conan_hf.losses import InfoNCELoss
from conan_hf.stages import weak

state = PartialState(cpu=True)  # gloo, from torchrun's environment
torch.set_num_threads(1)
model_dir, pattern, out = sys.argv[1:4]
pairs = weak.load_pairs([{"path": pattern, "streaming": True}])  # this rank's files (split_dataset_by_node)
model = SentenceTransformer(model_dir)
args = SentenceTransformerTrainingArguments(output_dir=out + "/run", per_device_train_batch_size=4, max_steps=2,
                                            dataloader_drop_last=False, report_to="none", save_strategy="no",
                                            use_cpu=True, accelerator_config={"dispatch_batches": False})
trainer = weak.WeakTrainer(model=model, args=args, train_dataset=weak.stream_instruction_batches(pairs, 4),
                           loss=InfoNCELoss(model), data_collator=weak.InstructionPromptCollator(model.preprocess))
loader = trainer.get_train_dataloader()
rows = [(r["instruction"], r["anchor"], r["positive"]) for r in loader.dataset]
batches = sum(1 for _ in loader)
trainer.train()
with open(f"{out}/rank{state.process_index}.json", "w") as handle:
    json.dump({"world": args.world_size, "rows": rows, "batches": batches, "step": trainer.state.global_step}, handle)
state.wait_for_everyone()
torch.distributed.destroy_process_group()  # before interpreter exit, so no gloo thread is left running at teardown
"""


@pytest.mark.slow
def test_two_ranks_train_on_their_own_share_of_a_stream(tiny_model_dir, tmp_path):
    """Under torchrun (2 processes, gloo) each rank's dataloader yields its own files' pairs, batched by instruction:
    accelerate neither dispatches rank 0's rows nor splits the rank's share again."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    files = []
    for f in range(4):
        rows = [{"instruction": ["A.", "B."][i % 2], "input": f"in {f}-{i}", "output": f"out {f}-{i}"}
                for i in range(18)]
        files.append(_write_jsonl(tmp_path / f"part-{f}.jsonl", rows))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_model_dir), str(tmp_path / "part-*.jsonl"), str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    owners = []
    for report in got:
        assert report["world"] == 2 and report["step"] == 2
        rows = [tuple(r) for r in report["rows"]]
        mine = sorted({anchor.split()[1].split("-")[0] for _, anchor, _ in rows})
        assert len(mine) == 2, mine  # two of the four files each
        expected, _ = _stream_reference(_naive_pairs([files[int(f)] for f in mine]), 4)
        assert rows == [pair for batch in expected for pair in batch]
        assert report["batches"] == len(expected)
        owners.append(set(mine))
    assert not owners[0] & owners[1]  # no file read by both ranks
