"""Training throughput of the supervised stage (stage 4): tokens/s, MFU and peak memory.

    # GPU (the paper's setup, DeepSpeed ZeRO-1 + bf16, full 1.4B architecture, random init):
    accelerate launch --config_file trainers/configs/accelerate/deepspeed_zero1_bf16.yaml --num_processes 1 \\
        benchmarks/train_throughput.py --model full --seq-length 512 --steps 20
    # CPU smoke run (tiny preset):
    python benchmarks/train_throughput.py --model tiny

Each run trains the real stage-4 code (`conan_hf.stages.supervised.run`) on synthetic retrieval rows (query, positive
and 7 hard negatives, every text exactly ``--seq-length`` tokens) twice:

- ``recipe``: InfoNCE + 7 hard negatives + DHNM + Matryoshka (what stage 4 does);
- ``baseline``: the same model, batches and optimizer with plain InfoNCE (no DHNM, no Matryoshka),

and prints tokens/s of both, their ratio (the cost of DHNM + MRL), MFU (model FLOPs 6·N·tokens plus attention
12·L·h·s·tokens, over the device's peak bf16 FLOPs, when the device is known) and peak memory. Results are appended
to ``benchmarks/results/train_throughput.md`` with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _device import accelerator_name, describe_device, peak_bf16_flops  # noqa: E402


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def synthetic_rows(tokenizer, n: int, seq_length: int, negatives: int, seed: int = 0) -> list[dict]:
    """Rows whose every text is exactly `seq_length` tokens (random token ids decoded to text and cut)."""
    import random

    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]

    def text() -> str:
        ids = [rng.choice(vocab) for _ in range(seq_length * 2)]
        return tokenizer.decode(ids)

    return [{"query": text(), "positive": text(), "negatives": [text() for _ in range(negatives)]} for _ in range(n)]


class StepTimer:
    """Wall time of each optimizer step (synchronised on GPU)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._sync()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer._sync()
                timer.times.append(time.perf_counter() - timer._start)

        self.times: list[float] = []
        self.callback = _Callback()

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def measure(label: str, model_dir: str, data_file: str, args, recipe: bool, work: Path) -> dict:
    import torch

    from conan_hf.stages import supervised
    from conan_hf.training.config import config_from_dict
    from conan_hf.training.distributed import deepspeed_zero1_config

    gpu = torch.cuda.is_available()
    config = config_from_dict(supervised.SupervisedConfig, {
        "model": model_dir, "output_dir": str(work / label), "resume": "no", "max_steps": args.steps,
        "save_steps": 10**9, "logging_steps": 10**9, "disable_tqdm": True, "max_seq_length": args.seq_length,
        "per_device_train_batch_size": args.batch_size, "bf16": gpu, "gradient_checkpointing": args.model == "full",
        "dhnm": recipe, "matryoshka": recipe, "num_threads": None if gpu else 1,
        "deepspeed": deepspeed_zero1_config(bf16=gpu) if args.deepspeed else None,
        "tasks": [{"name": "retrieval", "type": "retrieval", "data": [{"path": data_file}],
                   "batch_size": args.batch_size}],
    })
    timer = StepTimer()
    original = supervised.MultiTaskTrainer.__init__

    def with_timer(self, *a, callbacks=None, **kw):
        original(self, *a, callbacks=[*(callbacks or []), timer.callback], **kw)

    supervised.MultiTaskTrainer.__init__ = with_timer
    reset_peak_memory()
    try:
        supervised.run(config)
    finally:
        supervised.MultiTaskTrainer.__init__ = original
    steady = timer.times[args.warmup:] or timer.times
    seconds = sum(steady) / len(steady)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens = world * args.batch_size * (2 + 7) * args.seq_length  # query + positive + 7 negatives, all full length
    return {"label": label, "seconds_per_step": seconds, "tokens_per_step": tokens, "tokens_per_s": tokens / seconds,
            "peak_memory_gib": peak_memory_gib(), "steps_timed": len(steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per text (default: 32 tiny, 512 full)")
    parser.add_argument("--batch-size", type=int, default=4, help="queries per device (paper: 4 for retrieval)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30 tiny, 20 full)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false",
                        help="plain PyTorch instead of DeepSpeed ZeRO-1")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "train_throughput.md"))
    args = parser.parse_args()
    args.seq_length = args.seq_length or (32 if args.model == "tiny" else 512)
    args.steps = args.steps or (30 if args.model == "tiny" else 20)
    # DeepSpeed needs a process group even for one process; outside a launcher, make this process rank 0 of 1.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)

    from transformers import AutoTokenizer

    from conan_hf import ConanConfig, build_sentence_transformer
    from conan_hf.tokenizer import demo_tokenizer

    device, peak_flops = describe_device(), peak_bf16_flops(accelerator_name())
    work = Path(tempfile.mkdtemp(prefix="conan-throughput-"))
    tokenizer = demo_tokenizer()
    if args.model == "tiny":
        config = ConanConfig.tiny(vocab_size=-(-len(tokenizer) // 64) * 64)
    else:
        config = ConanConfig()  # the released 1.4B architecture, random init
    model = build_sentence_transformer(config, tokenizer=tokenizer, max_seq_length=args.seq_length)
    model_dir = str(work / "model")
    model.save(model_dir)
    # The embedding matrix is a lookup, not a matmul: MFU counts the other weights.
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    del model
    rows = synthetic_rows(AutoTokenizer.from_pretrained(model_dir), 64 * args.batch_size, args.seq_length, 15)
    data_file = str(work / "rows.jsonl")
    with open(data_file, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)

    results = [measure("recipe", model_dir, data_file, args, True, work),
               measure("baseline", model_dir, data_file, args, False, work)]
    # Training FLOPs per token: 6·N for the (non-embedding) weights (forward + backward), plus attention scores and
    # values,
    # 12·layers·hidden·seq (forward + backward, full bidirectional attention).
    flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * args.seq_length
    lines = []
    for r in results:
        mfu = (r["tokens_per_s"] * flops_per_token / (peak_flops * int(os.environ.get("WORLD_SIZE", "1")))
               if peak_flops else None)
        r["mfu"] = mfu
        lines.append(f"{r['label']:<9} {r['tokens_per_s']:>12,.0f} tokens/s  "
                     f"{r['seconds_per_step'] * 1000:8.1f} ms/step  "
                     f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  "
                     f"peak {'RSS' if device.startswith('CPU') else 'memory'} {r['peak_memory_gib']:.2f} GiB")
    ratio = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    header = (f"{device}; model {args.model} ({n_params / 1e6:,.1f}M non-embedding parameters), seq {args.seq_length}, "
              f"{args.batch_size} queries x (1 positive + 7 negatives) per device, "
              f"{'DeepSpeed ZeRO-1' if args.deepspeed else 'plain PyTorch'}, "
              f"{'bf16' if not device.startswith('CPU') else 'fp32'}, "
              f"{results[0]['steps_timed']} timed steps")
    summary = f"recipe / baseline throughput: {ratio:.3f}x (DHNM + Matryoshka overhead: {1 / ratio - 1:+.1%} time)"
    print("\n" + header)
    for line in lines:
        print(line)
    print(summary)
    if int(os.environ.get("RANK", "0")) == 0:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as handle:
            if new:
                handle.write("# Stage-4 training throughput (benchmarks/train_throughput.py)\n\n")
            body = "\n".join(lines) + f"\n{summary}"
            handle.write(f"## {time.strftime('%Y-%m-%d')} — {header}\n\n```\n{body}\n```\n\n")


if __name__ == "__main__":
    main()
