"""DHNM re-queueing (conan_hf.dhnm.requeue): a replacement made at an example's visit is trained by a later batch of
the same epoch; the schedule is part of the checkpointed DHNM state, so a run resumed mid-epoch makes the same
replacements and ends with the same weights; two ranks make the same decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conan_hf.dhnm import DHNM_STATE_NAME, DHNMCallback, NegativePool, RequeueSchedule

REPO_ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = ["cat", "dog", "bird", "horse", "fish", "mouse", "lion", "bear", "wolf", "fox", "owl", "frog", "duck",
            "goat", "seal", "crab"]
PLACES = ["mat", "rug", "sofa", "bed", "floor", "chair", "table", "roof"]
#: Eq. 6 with thresholds that make each clause fire on a tiny random model whatever its score scale: the S0 clause
#: never (S0 >= -2), the "became easy" clause whenever a negative's score fell at all since its first scoring.
EASY_ONLY = {"s0_min": -2.0, "drop_ratio": 1.0, "s_max": 2.0}


def make_dataset(n=16):
    from datasets import Dataset

    return Dataset.from_dict({
        "id": list(range(n)),
        "anchor": [f"the {s} sleeps on the" for s in SUBJECTS[:n]],
        "positive": [f"the {s} sleeps on the {PLACES[i % 8]}" for i, s in enumerate(SUBJECTS[:n])],
    })


def make_pool(n=16, k=2):
    # Near-duplicates of the positive: hard at first, easier as training separates them.
    candidates = [[f"the {s} sleeps on the {q}" for q in PLACES if q != PLACES[i % 8]][:6]
                  for i, s in enumerate(SUBJECTS[:n])]
    return NegativePool(list(range(n)), candidates, k=k)


def train(model_dir, out_dir, pool, *, thresholds, epochs=2, batch_size=2, requeue=True, stop_at=None, resume=None,
          save_steps=None, batches=None, **arg_overrides):
    """Stage-4 style training (MultiTaskTrainer, a DatasetDict task, MultiTaskCollator) of the tiny model with DHNM.
    ``batches`` collects (pool rows, candidate ranks) of every collated batch. Returns (trainer, callback)."""
    from datasets import DatasetDict
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    from conan_hf.losses import InfoNCELoss
    from conan_hf.training.multitask import (
        MultiTaskCollator,
        MultiTaskTrainer,
        ProportionalTaskSampler,
    )

    class Recording(MultiTaskCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            if batches is not None:
                batches.append(batch["label"].numpy().copy())
            return batch

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    model = SentenceTransformer(str(model_dir))
    loss = InfoNCELoss(model, temperature=0.05)
    dhnm = DHNMCallback(pool, {"qa": loss}, requeue=requeue, **thresholds)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to=[], seed=1, use_cpu=True, disable_tqdm=True,
        multi_dataset_batch_sampler=ProportionalTaskSampler, dataloader_drop_last=True, **arg_overrides,
    )
    trainer = MultiTaskTrainer(
        model=model, args=args, train_dataset=DatasetDict({"qa": make_dataset(len(pool))}), loss={"qa": loss},
        data_collator=Recording(preprocess_fn=model.preprocess, pool=pool, pool_tasks=frozenset({"qa"})),
        callbacks=[dhnm, *([Stop()] if stop_at else [])], task_batch_sizes={"qa": batch_size},
        no_duplicate_tasks={"qa"},
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, dhnm


def step_logs(trainer):
    return [{k: v for k, v in h.items() if k.startswith("dhnm_")} for h in trainer.state.log_history if "loss" in h]


def carried_replacements(batches, pool):
    """Distinct (pool row, candidate rank) pairs beyond the initially active candidates that collated batches
    carried: the replacements trained (independent of the pool's own "used" bookkeeping)."""
    initial = np.minimum(pool.pool_sizes, pool.k)
    return {(int(label[0]), int(rank)) for labels in batches for label in labels for rank in label[1:]
            if rank >= initial[label[0]]}


# ---- the schedule ----------------------------------------------------------------------------------------------------
def test_schedule_enters_rows_for_later_batches_of_their_task_with_a_cap():
    schedule = RequeueSchedule(max_rows=2)
    # Two tasks: dataset indices 0-5 (pool rows 0-5) and 6-9 (pool rows 6-9); pool row 10 is not trained.
    index_of_row = np.array([*range(10), -1])
    schedule.attach(offsets=[0, 6], index_of_row=index_of_row, caps=[2, 2])
    assert schedule.begin_epoch(0, global_step=0) == 0
    schedule.start_iteration()
    assert schedule.draw([0, 1]) == [0, 1]  # position 0, task 0
    assert schedule.schedule(np.array([0, 1, 2, 6, 10]), boundary=2) == {"requeued": 4}
    assert schedule.draw([6, 7]) == [6, 7]  # position 1 < boundary: nothing yet
    assert schedule.draw([3, 0]) == [3, 0, 1, 2]  # row 0 is in the batch: resolved without a copy; then 1 and 2
    assert schedule.draw([8, 9]) == [8, 9, 6]  # task 1's first batch at or after position 2
    assert schedule.schedule(np.array([3, 4, 5]), boundary=5) == {"requeued": 3}
    assert schedule.draw([1, 2]) == [1, 2]  # position 4 < 5
    assert schedule.draw([0, 1]) == [0, 1, 3, 4]  # at most 2 rows per batch: row 5 waits for the next batch
    assert schedule.unresolved() == 1
    state = schedule.state_dict()
    assert state["epoch"] == 0 and state["row"].tolist() == [0, 1, 2, 6, 3, 4, 5]
    # A resumed run loads the entries and redraws the batches its checkpoint trained: the same resolutions.
    other = RequeueSchedule(max_rows=2)
    other.attach(offsets=[0, 6], index_of_row=index_of_row, caps=[2, 2])
    other.load_state_dict(state)
    other.start_iteration()
    redrawn = [other.draw(b) for b in ([0, 1], [6, 7], [3, 0], [8, 9], [1, 2], [0, 1], [4, 3])]
    assert redrawn[:6] == [[0, 1], [6, 7], [3, 0, 1, 2], [8, 9, 6], [1, 2], [0, 1, 3, 4]]
    assert redrawn[6] == [4, 3, 5]
    # A new epoch drops the entries and reports those no batch resolved.
    assert schedule.begin_epoch(1, global_step=6) == 1 and schedule.entries == []
    assert schedule.begin_epoch(1, global_step=6) == 0  # the same epoch (a resumed run's epoch begin): kept
    # Without a sampler serving it nothing is entered.
    assert RequeueSchedule().schedule(np.array([1]), boundary=0) == {"requeued": 0}
    with pytest.raises(ValueError, match="max_rows"):
        RequeueSchedule(max_rows=0)


# ---- real Trainer runs -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_replacement_made_in_the_first_epoch_trains_in_that_epoch(tiny_model_dir, tmp_path):
    # S0 < 2 holds for every cosine: each negative is replaced at its first scoring (the S0 clause).
    thresholds = {"s0_min": 2.0}
    batches, pool = [], make_pool()
    trainer, dhnm = train(tiny_model_dir, tmp_path / "on", pool, thresholds=thresholds, epochs=1, batches=batches)
    # One epoch: 16 examples in batches of 2 = 8 steps, the same count as without re-queueing; re-queued rows make
    # some batches larger, no batch holds an example twice.
    assert trainer.state.global_step == len(batches) == 8
    assert max(len(b) for b in batches) > 2 and all(len(set(b[:, 0])) == len(b) for b in batches)
    carried = carried_replacements(batches, pool)
    totals = dhnm.replacement_summary()
    assert len(carried) == totals["used"] == totals["used_low_s0"] > 0
    assert totals["requeued"] > 0
    logs = step_logs(trainer)
    assert sum(log["dhnm_used"] for log in logs) == totals["used"]

    # Without re-queueing one epoch trains none of its replacements (each example is batched once).
    batches, pool = [], make_pool()
    _, off = train(tiny_model_dir, tmp_path / "off", pool, thresholds=thresholds, epochs=1, batches=batches,
                   requeue=False)
    assert off.totals["replaced"] > 0 and off.totals["used"] == 0 and not carried_replacements(batches, pool)


@pytest.mark.slow
def test_the_became_easy_clause_trains_within_two_epochs(tiny_model_dir, tmp_path):
    # Only the "became easy" clause can fire (S0 >= -2; replace when the score fell since the first scoring): its
    # replacements are made at second scorings, i.e. in the second epoch, the last one.
    batches, pool = [], make_pool()
    trainer, dhnm = train(tiny_model_dir, tmp_path / "on", pool, thresholds=EASY_ONLY, epochs=2, batches=batches)
    totals = dhnm.replacement_summary()
    assert totals["replaced_low_s0"] == totals["used_low_s0"] == 0
    assert totals["used_easy"] > 0 and totals["used_easy"] == totals["used"] == len(carried_replacements(batches, pool))
    assert sum(log["dhnm_used_easy"] for log in step_logs(trainer)) == totals["used_easy"]

    # The shipped behaviour before re-queueing: the same clause fires, but none of its replacements ever trains.
    batches, pool = [], make_pool()
    _, off = train(tiny_model_dir, tmp_path / "off", pool, thresholds=EASY_ONLY, epochs=2, batches=batches,
                   requeue=False)
    assert off.totals["replaced_easy"] > 0 and off.totals["used_easy"] == 0
    assert not carried_replacements(batches, pool)


def _weights(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize(("thresholds", "stop_at"), [({"s0_min": 2.0}, 3), (EASY_ONLY, 11)],
                         ids=["S0-clause-epoch-1", "easy-clause-epoch-2"])
def test_mid_epoch_resume_gives_the_same_replacements_and_weights(tiny_model_dir, tmp_path, thresholds, stop_at):
    full_pool = make_pool()
    full, full_cb = train(tiny_model_dir, tmp_path / "full", full_pool, thresholds=thresholds, save_steps=stop_at)

    cut_pool = make_pool()
    train(tiny_model_dir, tmp_path / "cut", cut_pool, thresholds=thresholds, save_steps=stop_at, stop_at=stop_at)
    checkpoint = tmp_path / "cut" / f"checkpoint-{stop_at}"
    with np.load(checkpoint / DHNM_STATE_NAME) as saved:
        # Mid-epoch (8 steps per epoch), with re-queued rows assigned to batches the checkpoint has not trained.
        assert stop_at % 8 and saved["requeue_row"].size > 0
        assert json.loads(str(saved["meta"]))["requeue"]["epoch"] == stop_at // 8

    resumed_pool = make_pool()  # a new process rebuilds the pools from the data
    resumed, resumed_cb = train(tiny_model_dir, tmp_path / "cut", resumed_pool, thresholds=thresholds,
                                save_steps=stop_at, resume=str(checkpoint))
    for name in ("active", "s0", "cursor", "fresh_bits", "easy_keys"):
        np.testing.assert_array_equal(getattr(resumed_pool, name), getattr(full_pool, name))
    assert resumed_cb.totals == full_cb.totals and full_cb.totals["requeued"] > 0
    assert resumed_cb.requeue.entries == full_cb.requeue.entries
    # The steps after the checkpoint trained re-queued replacements, and logged the same counts in both runs.
    assert sum(log["dhnm_used"] for log in step_logs(full)[stop_at:]) > 0
    assert step_logs(resumed)[-(16 - stop_at):] == step_logs(full)[stop_at:]
    full_weights, resumed_weights = _weights(full), _weights(resumed)
    assert full_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[3])
    import torch.distributed as dist
    from test_dhnm_requeue import make_pool, step_logs, train

    out = sys.argv[2]
    pool, batches = make_pool(), []
    trainer, dhnm = train(sys.argv[1], out, pool, thresholds={"s0_min": 2.0}, epochs=1, batches=batches,
                          ddp_backend="gloo")
    state = {
        "world_size": dist.get_world_size(),
        "pool": {name: getattr(pool, name).tolist() for name in ("active", "cursor", "fresh_bits", "easy_keys")},
        "s0": [[None if v != v else v for v in row] for row in pool.s0.tolist()],
        "entries": [list(entry) for entry in dhnm.requeue.entries],
        "totals": dhnm.totals,
        "logs": step_logs(trainer),
        "batches": [b.tolist() for b in batches],
    }
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(state, f)
    dist.barrier()
    dist.destroy_process_group()  # before interpreter exit, so no gloo thread is left running at teardown
    """
)


@pytest.mark.slow
def test_two_ranks_make_identical_decisions_and_requeue_alike(tiny_model_dir, tmp_path):
    script = tmp_path / "ddp_requeue.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*cmd, str(script), str(tiny_model_dir), str(tmp_path), str(REPO_ROOT / "tests")],
                          check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # The same pools, S0 values, schedule and counts on both ranks ...
    for key in ("pool", "s0", "entries", "totals", "logs"):
        assert r0[key] == r1[key], key
    assert r0["totals"]["requeued"] > 0 and r0["totals"]["used"] > 0
    # ... though each rank trained its own batches (8 batches of 16 examples, 4 per rank), some with re-queued rows.
    assert len(r0["batches"]) == len(r1["batches"]) == 4 and r0["batches"] != r1["batches"]
    assert max(len(b) for b in r0["batches"] + r1["batches"]) > 2
    pool = make_pool()
    carried = carried_replacements([np.array(b) for b in r0["batches"] + r1["batches"]], pool)
    assert len(carried) == r0["totals"]["used"]
