"""DHNM in stage 4 with its default schedule: replacements used, false negatives masked, memory-mapped tables
matching the rows, passes per example."""

from __future__ import annotations

import json
from pathlib import Path

import dhnm_helpers
import numpy as np
import pytest
import torch
from dhnm_helpers import PLACES, SUBJECTS

from conan_hf.dhnm import (
    NegativePool,
)

st_model = dhnm_helpers.st_model  # the module-scoped SentenceTransformer fixture


# ---- stage 4 with its default schedule ------------------------------------------------------------------------------
def _stage4_config(model_dir, data_file, out_dir, **overrides):
    """Stage 4 as `conan-train supervised` builds it (the shipped YAML, no preset): the schedule
    (num_train_epochs, max_steps) is the shipped default; only size, data and speed options are overridden."""
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.training.config import default_config_path, load_config

    values = {
        "model": str(model_dir), "output_dir": str(out_dir / "run"), "final_dir": str(out_dir / "final"),
        "tasks": [{"name": "qa", "type": "retrieval", "data": [{"path": str(data_file)}], "batch_size": 4,
                   "prompt": "find where it sleeps"}],
        "num_negatives": 2, "max_seq_length": 32, "num_threads": 1, "bf16": False, "gradient_checkpointing": False,
        "logging_steps": 1, "save_steps": 1000, "disable_tqdm": True,
        # S0 < 2 holds for every cosine: each negative is replaced at its first scoring, so the run makes
        # replacements whatever the tiny random model's scores are (eq. 6 itself is tested above).
        "dhnm_s0_min": 2.0,
        **overrides,
    }
    config = load_config(SupervisedConfig, default_config_path("supervised"), preset=None, overrides=values)
    assert config.max_steps <= 0 and config.num_train_epochs >= 2  # the shipped schedule, not the test's
    return config


def _stage4_rows():
    positives = [f"the {s} sleeps on the {p}" for s, p in zip(SUBJECTS, PLACES)]
    rows = []
    for i, (s, p) in enumerate(zip(SUBJECTS, PLACES)):
        # The two hardest candidates are other rows' positives: whenever such a row shares the batch, the candidate
        # is an in-batch false negative of that row's query (the sampler only sees id/anchor/positive).
        near = [f"the {s} sleeps on the {q}" for q in PLACES if q != p][:4]
        rows.append({"query": f"the {s} sleeps on the", "positive": positives[i],
                     "negatives": [positives[(i + 1) % 8], positives[(i + 2) % 8], *near]})
    return rows


def _weights(final_dir):
    from safetensors.torch import load_file

    files = sorted(Path(final_dir).rglob("*.safetensors"))
    assert files, f"no weights in {final_dir}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_stage4_default_schedule_uses_replacements_and_masks_false_negatives(tiny_model_dir, tmp_path):
    from conan_hf.stages import supervised

    rows = _stage4_rows()
    data_file = tmp_path / "qa.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = []
    original = supervised.MultiTaskCollator.__call__

    def spy(self, features):
        batch = original(self, features)
        batches.append(([f["positive"] for f in features], batch["label"].numpy().copy(), self.pool))
        return batch

    histories = []
    from conan_hf.training import runner

    original_finish = runner.finish_stage

    def finish(trainer, *args, **kwargs):
        histories.append([h for h in trainer.state.log_history if "loss" in h])
        return original_finish(trainer, *args, **kwargs)

    threads = torch.get_num_threads()
    supervised.MultiTaskCollator.__call__ = spy
    runner.finish_stage = finish
    try:
        on = supervised.run(_stage4_config(tiny_model_dir, data_file, tmp_path / "on"))
        on_batches, batches[:] = list(batches), []
        off = supervised.run(_stage4_config(tiny_model_dir, data_file, tmp_path / "off", dhnm=False))
        off_batches = list(batches)
    finally:
        supervised.MultiTaskCollator.__call__ = original
        runner.finish_stage = original_finish
        torch.set_num_threads(threads)

    # DHNM changes training: the replaced negatives are trained in the second pass, so the weights differ.
    on_weights, off_weights = _weights(on["final_dir"]), _weights(off["final_dir"])
    assert on_weights.keys() == off_weights.keys()
    assert any(not torch.equal(on_weights[k], off_weights[k]) for k in on_weights)
    assert off["dhnm"] is None and len(off_batches) == len(on_batches) == on["global_step"] == 4  # 2 epochs x 2

    # Independent count of "used": distinct (example, candidate) pairs beyond the initially active ones that a
    # trained batch carried (every collated batch was trained: the run ends with its epoch).
    pool = on_batches[0][2]
    initially_active = np.minimum(pool.pool_sizes, pool.k)
    carried = {(int(label[0]), int(rank)) for _, labels, _ in on_batches for label in labels for rank in label[1:]
               if rank >= initially_active[label[0]]}
    dhnm = on["dhnm"]
    assert dhnm["used"] == len(carried) == 16  # 8 examples x 2 slots replaced in epoch 1, carried in epoch 2
    assert dhnm["replaced"] == 32 and dhnm["pending"] == 16 and dhnm["used_fraction"] == 0.5
    # The per-step logs carry the counts: nothing used in epoch 1 (steps 1-2), all 16 in epoch 2.
    assert [h["dhnm_used"] for h in histories[0]] == [0, 0, 8, 8]
    assert sum(h["dhnm_replaced"] for h in histories[0]) == 32

    # Independent count of masked in-batch false negatives: pairs (query i, filled negative slot of any row of the
    # batch) whose text is query i's positive.
    expected_masked = 0
    for positives, labels, batch_pool in on_batches:
        for row_positive in positives:
            for label in labels:
                texts = [batch_pool.candidates[int(label[0])][int(r)] for r in label[1:] if r >= 0]
                expected_masked += sum(text == row_positive for text in texts)
    assert expected_masked > 0  # the data makes some (rows i and i+1 or i+2 share a batch in epoch 1)
    assert on["false_negatives_masked"] == expected_masked
    assert sum(h["infonce_false_negatives_masked"] for h in histories[0]) == expected_masked


def test_stage4_tables_are_memory_mapped_and_the_pool_matches_the_rows(st_model, tmp_path, monkeypatch):
    from datasets.table import MemoryMappedTable

    from conan_hf.stages import tasks
    from conan_hf.stages.supervised import (
        TaskConfig,
        TaskTable,
        build_negative_pool,
        iter_task_examples,
        task_rows,
        write_task_table,
    )

    monkeypatch.setattr(tasks, "_TABLE_BATCH_ROWS", 3)  # several Arrow record batches per file
    qa_rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}-{j}" for j in range(i % 4)]}
               for i in range(8)]
    qa_rows[5] = {"query": "q5", "positive": "p5", "negative_1": "x", "negative_2": "y"}
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    labels = ["sport", "music", "food"]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": labels[i % 3]}) + "\n"
                                                for i in range(7)))
    (tmp_path / "sts.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 0.5}\n')
    tasks = [TaskConfig(name="qa", type="retrieval", data=[str(tmp_path / "qa.jsonl")]),
             TaskConfig(name="cls", type="classification", data=[str(tmp_path / "cls.jsonl")]),
             TaskConfig(name="sim", type="sts", data=[str(tmp_path / "sts.jsonl")])]
    tables, first_id, expected_rows, expected_candidates = {}, 0, [], []
    for task in tasks:
        tables[task.name] = write_task_table(task, iter_task_examples(task, seed=3), tmp_path / "t" / task.name,
                                             first_id=first_id)
        rows, candidates = task_rows(task, seed=3)
        if task.type != "sts":
            first_id += len(rows)
            expected_rows += [{"anchor": r["anchor"], "positive": r["positive"]} for r in rows]
            expected_candidates += candidates
    for table in tables.values():
        assert isinstance(table.dataset.data, MemoryMappedTable) and table.dataset.cache_files
    assert tables["qa"].dataset.data.column("id").num_chunks == 3  # 8 rows written 3 at a time
    assert tables["sim"].dataset.to_list() == [{"sentence1": "a", "sentence2": "b", "score": 0.5}]
    assert tables["qa"].dataset["id"][:] == list(range(8)) and tables["cls"].dataset["id"][:] == list(range(8, 15))
    assert [{"anchor": r["anchor"], "positive": r["positive"]} for t in ("qa", "cls")
            for r in tables[t].dataset.to_list()] == expected_rows
    assert expected_candidates[5] == ["x", "y"] and sorted(expected_candidates[8] + ["sport"]) == sorted(labels)

    pool = build_negative_pool([tables["qa"], tables["cls"]], k=2, folder=tmp_path / "t")
    assert pool.ids is None and isinstance(pool.candidate_ids, np.memmap) and len(pool) == 15
    assert pool.candidates == expected_candidates
    assert pool.active_negatives(9) == expected_candidates[9][:2]

    # A task whose pools a teacher mined (stage 4 with `teacher:`): its pool's ids and in-memory table are used.
    mined = NegativePool.from_mining(tables["qa"].dataset, st_model, k=2, num_candidates=3, verbose=False)
    mined_table = TaskTable(tables["qa"].dataset, texts=mined.text_table, pool_sizes=mined.pool_sizes,
                            candidate_ids=mined.candidate_ids)
    assert sum(map(len, mined.candidates)) > 0
    pool = build_negative_pool([mined_table, tables["cls"]], k=2, folder=tmp_path / "m")
    assert pool.candidates == list(mined.candidates) + expected_candidates[8:]


def test_dhnm_passes_counts_visits_per_example():
    from types import SimpleNamespace

    from conan_hf.stages.supervised import SupervisedConfig, dhnm_passes

    args = SimpleNamespace(world_size=2, gradient_accumulation_steps=1)
    rows, sizes = {"qa": 40, "sts": 64}, {"qa": 4, "sts": 32}
    assert dhnm_passes(SupervisedConfig(num_train_epochs=2), args, rows, sizes) == 2.0
    assert SupervisedConfig().num_train_epochs == 2  # the stage-4 default lets DHNM act
    # (40 // 4 + 64 // 32) = 12 batches per epoch, shared by 2 ranks: 6 steps; 9 steps = 1.5 passes.
    assert dhnm_passes(SupervisedConfig(max_steps=9), args, rows, sizes) == 1.5


@pytest.mark.slow
def test_stage4_dhnm_score_baseline_reaches_eq6(tiny_model_dir, tmp_path):
    """``dhnm_score_baseline`` b is applied by the stage's DHNM: with the paper's thresholds and b = 0.999, a negative
    whose first cosine is below 0.9994 rescales below 0.4 and is replaced at once, exactly as with ``s0_min`` 2 and
    no rescaling; the two runs make the same replacements and end with the same weights."""
    from conan_hf.stages import supervised

    data_file = tmp_path / "qa.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in _stage4_rows()))
    threads = torch.get_num_threads()
    try:
        rescaled = supervised.run(_stage4_config(tiny_model_dir, data_file, tmp_path / "b", dhnm_s0_min=0.4,
                                                 dhnm_score_baseline=0.999))
        every = supervised.run(_stage4_config(tiny_model_dir, data_file, tmp_path / "all"))  # s0_min = 2
    finally:
        torch.set_num_threads(threads)
    assert rescaled["dhnm"]["replaced"] == every["dhnm"]["replaced"] == 32  # 8 examples x 2 slots x 2 epochs
    assert rescaled["dhnm"]["replaced_low_s0"] == 32
    a, b = _weights(rescaled["final_dir"]), _weights(every["final_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
