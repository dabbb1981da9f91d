"""DHNMCallback in real Trainer runs: replacements carried by the next batch, kill and resume, dataloader
workers refused, two-process runs deciding identically."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from dhnm_helpers import (
    COUNTS,
    PLACES,
    REPO_ROOT,
    SUBJECTS,
    make_dataset,
    make_pool,
    naive_apply,
)

from conan_hf.dhnm import (
    DHNM_STATE_NAME,
    DHNMCallback,
    DHNMDataCollator,
)


# ---- real Trainer runs ----------------------------------------------------------------------------------------------
def snapshot_callback(events):
    """Factory of a TrainerCallback placed before DHNMCallback: it records the pool and the scores the loss
    recorded, right before each step's decisions."""
    from transformers import TrainerCallback

    def make(pool, loss):
        class Snapshot(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                records = [
                    (r.example_ids.numpy().copy(), r.negative_ids.numpy().copy(), r.scores.numpy().astype(float))
                    for r in loss.peek_hard_negative_scores()
                ]
                events.append(
                    ("step_end", state.global_step, pool.active.copy(), pool.s0.copy(), pool.cursor.copy(), records,
                     pool.fresh.copy())
                )

        return Snapshot()

    return make


def train(model_dir, out_dir, pool, max_steps, *, stop_at=None, resume=None, extra_callbacks=(), preprocess=None,
          save_steps=None, **arg_overrides):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    from conan_hf.losses import InfoNCELoss

    model = SentenceTransformer(str(model_dir))
    loss = InfoNCELoss(model, temperature=0.05)
    dhnm = DHNMCallback(pool, loss)
    callbacks = [make(pool, loss) for make in extra_callbacks]
    if stop_at is not None:
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop_at:
                    control.should_training_stop = True

        callbacks.append(Stop())
    settings = dict(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        seed=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    args = SentenceTransformerTrainingArguments(**{**settings, **arg_overrides})
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(),
        loss=loss,
        data_collator=DHNMDataCollator(preprocess_fn=preprocess(model) if preprocess else model.preprocess,
                                       pool=pool),
        callbacks=[*callbacks, dhnm],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, dhnm, loss


def dhnm_logs(trainer):
    return {h["step"]: {k: v for k, v in h.items() if k.startswith("dhnm_")} for h in trainer.state.log_history
            if "loss" in h}


def run_and_replay(model_dir, out_dir, max_steps=10, **overrides):
    """Train with DHNM, replay every step's decisions with the loop reference, and check the next batch of each
    changed example carries its new negative. Returns (drop_replacements, new_negative_checks, trainer)."""
    pool = make_pool(k=2)
    events: list = []

    def recording(model):
        def preprocess(inputs, prompt=None, **kwargs):
            events.append(("column", list(inputs)))
            return model.preprocess(inputs, prompt=prompt, **kwargs)

        return preprocess

    trainer, dhnm, _ = train(model_dir, out_dir, pool, max_steps=max_steps, preprocess=recording,
                             extra_callbacks=[snapshot_callback(events)], **overrides)
    logs = dhnm_logs(trainer)
    assert sorted(logs) == list(range(1, max_steps + 1))

    steps = [e for e in events if e[0] == "step_end"]
    posts = [(s[2], s[3], s[4]) for s in steps[1:]] + [(pool.active, pool.s0, pool.cursor)]
    drop_replacements = 0
    new_negative_checks = 0
    reason = np.full(pool.active.shape, "", dtype=object)  # the clause behind each slot's replacement, across steps
    for (_, step, active, s0, cursor, records, fresh), (post_active, post_s0, post_cursor) in zip(steps, posts):
        # The decisions follow eq. 6 on exactly the scores the loss recorded for this step.
        pre_active, pre_s0 = active.copy(), s0.copy()
        active, s0, cursor, fresh = active.copy(), s0.copy(), cursor.copy(), fresh.copy()
        counts = dict.fromkeys(COUNTS, 0)
        for rows, negs, scores in records:
            step_counts = naive_apply(active, s0, cursor, pool.pool_sizes, rows, negs, scores, fresh=fresh,
                                      reason=reason)
            counts = {k: counts[k] + step_counts[k] for k in counts}
        np.testing.assert_array_equal(post_active, active)
        np.testing.assert_array_equal(post_cursor, cursor)
        np.testing.assert_array_equal(post_s0, s0)
        # The counts reach the Trainer's logs (nothing is re-queued: a plain SentenceTransformerTrainer's sampler).
        assert logs[step] == {f"dhnm_{k}": v for k, v in {**counts, "requeued": 0, "requeue_late": 0}.items()}
        assert counts["checked"] == 4 * 2  # batch of 4, k = 2, every pair scored

        index = next(i for i, e in enumerate(events) if e[0] == "step_end" and e[1] == step)
        later = [e[1] for e in events[index + 1 :] if e[0] == "column"]
        for row, slot in np.argwhere(post_active != pre_active):
            if not math.isnan(pre_s0[row, slot]):
                drop_replacements += 1  # replaced because its score fell, not at its first scoring
            # The next batch containing this example (collated after the decision) carries the new negative.
            anchor = f"the {SUBJECTS[row]} sleeps on the"
            for b in range(0, len(later) - 3, 4):  # one batch = anchor, positive, negative_1, negative_2 columns
                if anchor in later[b]:
                    position = later[b].index(anchor)
                    assert later[b + 2 + slot][position] == pool.candidates[row][post_active[row, slot]]
                    new_negative_checks += 1
                    break
    assert dhnm.totals["replaced"] == sum(v["dhnm_replaced"] for v in logs.values())
    return drop_replacements, new_negative_checks, trainer


@pytest.mark.slow
def test_trainer_run_replaces_falling_negatives_and_next_batch_carries_them(tiny_model_dir, tmp_path):
    # 10 steps = 5 epochs of 8 examples: enough for the near-duplicate negatives to become easy under training
    # (checked on 10 random initialisations of the tiny model: 3-14 drop replacements, 2-14 re-batched checks).
    drop_replacements, new_negative_checks, _ = run_and_replay(tiny_model_dir, tmp_path / "run", max_steps=10)
    assert drop_replacements >= 1
    assert new_negative_checks >= 1


@pytest.mark.slow
def test_kill_and_resume_gives_same_state_and_losses(tiny_model_dir, tmp_path):
    full_pool = make_pool(k=2)
    full, full_cb, _ = train(tiny_model_dir, tmp_path / "full", full_pool, max_steps=6, save_steps=3)

    first_pool = make_pool(k=2)
    train(tiny_model_dir, tmp_path / "cut", first_pool, max_steps=6, save_steps=3, stop_at=3)
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    with np.load(checkpoint / DHNM_STATE_NAME) as saved:
        assert json.loads(str(saved["meta"]))["global_step"] == 3
        assert not np.isnan(saved["s0"]).all()  # a non-trivial state was saved
    assert not (tmp_path / "cut" / "checkpoint-6").exists()

    resumed_pool = make_pool(k=2)  # a fresh process would rebuild the pools from the data
    resumed, resumed_cb, _ = train(tiny_model_dir, tmp_path / "cut", resumed_pool, max_steps=6, save_steps=3,
                                   resume=str(checkpoint))
    np.testing.assert_array_equal(resumed_pool.active, full_pool.active)
    np.testing.assert_array_equal(resumed_pool.cursor, full_pool.cursor)
    np.testing.assert_allclose(resumed_pool.s0, full_pool.s0, rtol=1e-5, atol=1e-6)
    assert resumed_cb.totals == full_cb.totals
    full_logs = {h["step"]: h for h in full.state.log_history if "loss" in h}
    resumed_logs = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    assert sorted(resumed_logs) == sorted(full_logs) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed_logs[step]["loss"] == pytest.approx(full_logs[step]["loss"], rel=1e-4)
        assert {k: v for k, v in resumed_logs[step].items() if k.startswith("dhnm_")} == {
            k: v for k, v in full_logs[step].items() if k.startswith("dhnm_")
        }
    # The state files of the final checkpoints agree too.
    with np.load(tmp_path / "full" / "checkpoint-6" / DHNM_STATE_NAME) as a, \
            np.load(tmp_path / "cut" / "checkpoint-6" / DHNM_STATE_NAME) as b:
        for name in ("active", "cursor", "fresh_bits"):
            np.testing.assert_array_equal(a[name], b[name])

    # Resuming without the DHNM state is an error, not a silent restart of the pools.
    bare = tmp_path / "bare" / "checkpoint-3"
    shutil.copytree(checkpoint, bare)
    (bare / DHNM_STATE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no dhnm_state.npz \(or dhnm_state.json\) was found"):
        train(tiny_model_dir, tmp_path / "bare", make_pool(k=2), max_steps=6, resume=str(bare))


def test_callback_refuses_dataloader_workers(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        train(tiny_model_dir, tmp_path / "w", make_pool(), max_steps=1, dataloader_num_workers=1)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch.distributed as dist
    from dhnm_case import make_dataset, make_pool, train_with

    out = sys.argv[2]
    pool = make_pool()
    seen = []
    trainer, dhnm = train_with(sys.argv[1], out, pool, seen)
    rank = dist.get_rank()
    arrays = pool.state_dict()
    state = {
        "world_size": dist.get_world_size(),
        "pool": {"fingerprint": arrays["fingerprint"], "active": arrays["active"].tolist(),
                 "cursor": arrays["cursor"].tolist(), "fresh_bits": arrays["fresh_bits"].tolist(),
                 "s0": [[None if v != v else v for v in row] for row in arrays["s0"].tolist()]},
        "totals": dhnm.totals,
        "logs": [{k: v for k, v in h.items() if k.startswith("dhnm_") or k == "step"}
                 for h in trainer.state.log_history if "loss" in h],
        "seen_ids": seen,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(state, f)
    dist.barrier()
    dist.destroy_process_group()  # before interpreter exit, so no gloo thread is left running at teardown
    """
)

CASE_MODULE = textwrap.dedent(
    """
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments,
    )
    from conan_hf.losses import InfoNCELoss
    from conan_hf.dhnm import DHNMCallback, DHNMDataCollator, NegativePool

    SUBJECTS = {subjects!r}
    PLACES = {places!r}

    def make_dataset():
        return Dataset.from_dict({{
            "id": list(range(8)),
            "anchor": [f"the {{s}} sleeps on the" for s in SUBJECTS],
            "positive": [f"the {{s}} sleeps on the {{p}}" for s, p in zip(SUBJECTS, PLACES)],
        }})

    def make_pool(k=2):
        candidates = [
            [f"the {{s}} sleeps on the {{q}}" for q in PLACES if q != p][:5] for s, p in zip(SUBJECTS, PLACES)
        ]
        return NegativePool(list(range(8)), candidates, k=k)

    class Recording(DHNMDataCollator):
        def __call__(self, features):
            self.seen.extend(int(f["id"]) for f in features)
            return super().__call__(features)

    def train_with(model_dir, out, pool, seen):
        model = SentenceTransformer(model_dir)
        # Cross-device negatives too: each query also sees the other rank's documents.
        loss = InfoNCELoss(model, temperature=0.05, gather_across_devices=True)
        dhnm = DHNMCallback(pool, loss)
        collator = Recording(preprocess_fn=model.preprocess, pool=pool)
        collator.seen = seen
        args = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=2e-3,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=1,
            use_cpu=True, disable_tqdm=True, ddp_backend="gloo",
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=make_dataset(), loss=loss,
                                             data_collator=collator, callbacks=[dhnm])
        trainer.train()
        return trainer, dhnm
    """
)


@pytest.mark.slow
def test_two_process_run_makes_identical_decisions_on_both_ranks(tiny_model_dir, tmp_path):
    (tmp_path / "dhnm_case.py").write_text(CASE_MODULE.format(subjects=SUBJECTS, places=PLACES))
    script = tmp_path / "ddp_dhnm.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tiny_model_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    # Each rank batched its own shard of the data ...
    assert set(r0["seen_ids"]) and set(r1["seen_ids"]) and not set(r0["seen_ids"][:2]) & set(r1["seen_ids"][:2])
    # ... yet both judged every pair scored on either rank (2 ranks x 2 rows x k=2 per step) ...
    assert [log["dhnm_checked"] for log in r0["logs"]] == [8, 8, 8, 8]
    # ... and made the same decisions: identical pools, S0 values and counts.
    assert r0["pool"] == r1["pool"]
    assert r0["totals"] == r1["totals"] and r0["logs"] == r1["logs"]
    scored = {i for i, row in enumerate(r0["pool"]["s0"]) if any(v is not None for v in row)}
    replaced = {i for i, c in enumerate(r0["pool"]["cursor"]) if c > 2}
    assert (scored | replaced) >= set(r0["seen_ids"]) | set(r1["seen_ids"])
