"""Training-step time with Dynamic Hard Negative Mining on vs off, measured in the same training run.

One ``SentenceTransformerTrainer`` run alternates the two configurations step by step, so both see the same machine
load (other jobs on a shared machine make separate runs incomparable):

- *off* steps: the negatives are plain dataset columns, collated by sentence-transformers' own collator; no ids reach
  the loss, so ``InfoNCELoss`` records nothing, and no DHNM decision is made;
- *on* steps: the same dataset rows are batched by ``DHNMDataCollator`` (ids out of tokenisation, negatives from the
  ``NegativePool``), ``InfoNCELoss`` records the query–negative scores, and ``DHNMCallback`` applies eq. 6.

Both train the same model on rows with the same number of negative columns. The step time is the time between
consecutive ``on_step_end`` events (collation, forward, backward, optimizer, callbacks) as process CPU time (one
torch thread by default) and as wall time. The headline is the median over adjacent (off, on) step pairs of their
ratio. The DHNM-specific work (callback, the loss's score record, the collator's pool lookups) is also timed
directly as a noise-free cross-check. Target: ratio <= 1.02.

Usage:
    python benchmarks/dhnm_overhead.py                       # tiny Conan model, CPU
    python benchmarks/dhnm_overhead.py --model path/to/sentence-transformer --batch-size 64 --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from _device import describe_device  # noqa: E402

WORDS = (
    "river mountain city data model train energy music garden window paper light stone market science history "
    "language ocean forest engine network signal health school bridge winter summer animal planet story system"
).split()


def make_data(num_examples: int, pool_size: int, seed: int = 0):
    rng = random.Random(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    anchors = [sentence(10) for _ in range(num_examples)]
    positives = [a + " " + sentence(12) for a in anchors]
    pools = [[a + " " + sentence(12) for _ in range(pool_size)] for a in anchors]
    return anchors, positives, pools


def run(model, args) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from transformers import TrainerCallback

    from conan_hf.dhnm import DHNMCallback, DHNMDataCollator, NegativePool
    from conan_hf.losses import InfoNCELoss

    num_steps = args.warmup + 2 * args.steps
    num_examples = args.batch_size * num_steps  # one epoch: every row is batched once
    anchors, positives, pools = make_data(num_examples, args.pool_size)
    ids = list(range(num_examples))
    pool = NegativePool(ids, pools, k=args.k)
    columns = {"id": ids, "anchor": anchors, "positive": positives}
    for j in range(args.k):
        columns[f"negative_{j + 1}"] = [p[j] for p in pools]  # the texts DHNM starts with, for the off steps
    dataset = Dataset.from_dict(columns)
    dhnm_cpu = [0.0]

    def is_on(step: int) -> bool:  # global steps 1, 3, 5, ... run with DHNM
        return step % 2 == 1

    class AlternatingCollator(DHNMDataCollator):
        calls = 0

        def __call__(self, features):
            type(self).calls += 1  # batches are collated in step order (prefetching keeps the order)
            if is_on(self.calls):
                start = time.process_time()
                rows = [self.pool.row(f["id"]) for f in features]
                _ = [[self.pool.candidates[r][c] for c in self.pool.active[r] if c >= 0] for r in rows]
                dhnm_cpu[0] += time.process_time() - start
                return super().__call__(features)
            plain = [{k: v for k, v in f.items() if k != "id"} for f in features]
            return SentenceTransformerDataCollator.__call__(self, plain)

    class TimedInfoNCELoss(InfoNCELoss):
        def _record(self, embeddings, labels):  # the loss's only DHNM-specific work (a no-op without ids)
            start = time.process_time()
            super()._record(embeddings, labels)
            if labels is not None:
                dhnm_cpu[0] += time.process_time() - start

    class AlternatingDHNM(DHNMCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if is_on(state.global_step):
                start = time.process_time()
                super().on_step_end(args, state, control, **kwargs)
                dhnm_cpu[0] += time.process_time() - start

    timings: dict[int, tuple[float, float]] = {}

    class StepTimer(TrainerCallback):  # added last: its interval includes DHNMCallback's work
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.last = (time.process_time(), time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            now = (time.process_time(), time.perf_counter())
            timings[state.global_step] = (now[0] - self.last[0], now[1] - self.last[1])
            self.last = now

    loss = TimedInfoNCELoss(model, temperature=0.05)
    with tempfile.TemporaryDirectory() as out_dir:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=out_dir,
            max_steps=num_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            logging_steps=10**9,
            save_strategy="no",
            report_to=[],
            seed=0,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            loss=loss,
            data_collator=AlternatingCollator(preprocess_fn=model.preprocess, pool=pool),
            callbacks=[AlternatingDHNM(pool, loss), StepTimer()],
        )
        trainer.train()

    timed = [s for s in sorted(timings) if s > args.warmup]
    pairs = [(s, s + 1) for s in timed if not is_on(s) and s + 1 in timings]  # (off, on) neighbours
    out = {}
    for unit, index in (("cpu", 0), ("wall", 1)):
        off = [timings[s][index] for s in timed if not is_on(s)]
        on = [timings[s][index] for s in timed if is_on(s)]
        out[unit] = {
            "median_off_s": statistics.median(off),
            "median_on_s": statistics.median(on),
            "ratio_pairs": statistics.median(timings[b][index] / timings[a][index] for a, b in pairs),
            "ratio_medians": statistics.median(on) / statistics.median(off),
        }
    out["pairs"] = len(pairs)
    out["dhnm_work_per_on_step_cpu_s"] = dhnm_cpu[0] / sum(1 for s in timings if is_on(s))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (random ConanConfig.tiny()) or a SentenceTransformer path"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=7, help="active hard negatives per example (paper: 7)")
    parser.add_argument("--pool-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps at the start")
    parser.add_argument("--max-seq-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "dhnm_overhead_cpu.txt"))
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from conan_hf import ConanConfig, build_sentence_transformer

        model = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=args.max_seq_length)
        model_name = "ConanConfig.tiny() (random weights)"
    else:
        model = SentenceTransformer(args.model)
        model.max_seq_length = args.max_seq_length
        model_name = args.model

    out = run(model, args)
    cpu, wall = out["cpu"], out["wall"]
    direct = out["dhnm_work_per_on_step_cpu_s"]
    result = {
        "device": describe_device(),
        "model": model_name,
        "batch_size": args.batch_size,
        "k": args.k,
        "max_seq_length": args.max_seq_length,
        "torch_threads": torch.get_num_threads(),
        "timed_steps_per_config": args.steps,
        "adjacent_pairs": out["pairs"],
        "median_step_cpu_s_off": round(cpu["median_off_s"], 5),
        "median_step_cpu_s_on": round(cpu["median_on_s"], 5),
        "ratio_on_off": round(cpu["ratio_pairs"], 4),
        "cpu_ratio_of_medians": round(cpu["ratio_medians"], 4),
        "median_step_wall_s_off": round(wall["median_off_s"], 5),
        "median_step_wall_s_on": round(wall["median_on_s"], 5),
        "wall_ratio_on_off": round(wall["ratio_pairs"], 4),
        "dhnm_work_per_step_cpu_s": round(direct, 6),
        "direct_overhead_ratio": round((cpu["median_off_s"] + direct) / cpu["median_off_s"], 4),
        "target": "<= 1.02",
        "torch": torch.__version__,
    }
    lines = [
        f"device: {result['device']}",
        f"model: {model_name}; batch {args.batch_size}, k={args.k} hard negatives, "
        f"max_seq_length {args.max_seq_length}",
        f"one training run, DHNM on/off alternating per step: {args.steps} timed steps each, "
        f"{out['pairs']} adjacent (off, on) pairs",
        f"median step CPU time: off {cpu['median_off_s'] * 1000:.1f} ms, on {cpu['median_on_s'] * 1000:.1f} ms",
        f"ratio on/off (median of adjacent pairs, CPU time): {cpu['ratio_pairs']:.4f}x (target <= 1.02x); "
        f"ratio of medians {cpu['ratio_medians']:.4f}x",
        f"wall time: off {wall['median_off_s'] * 1000:.1f} ms, on {wall['median_on_s'] * 1000:.1f} ms, "
        f"median pair ratio {wall['ratio_pairs']:.4f}x",
        f"DHNM work timed directly: {direct * 1000:.3f} ms CPU per step -> {result['direct_overhead_ratio']:.4f}x",
    ]
    print("\n".join(lines))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n\n" + json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
