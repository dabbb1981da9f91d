"""Quality smoke test of the supervised stage on real data (not a unit test).

    CONAN_DATA_DIR=../shared/data python benchmarks/quality_smoke.py

1. Stages 0-3 with the tiny preset on the embedded demo corpus (or ``--stage3 DIR`` to reuse a stage-3 model).
2. Stage 4 (the real `conan_hf.stages.supervised` code: CoSENT + Matryoshka, STS prompt) on STS-B English train
   (``$CONAN_DATA_DIR/sts/stsb-multi-mt/stsb-en-train.csv``).
3. STS-B English dev Spearman (cosine) of the stage-3 model (the baseline, measured in the same run) and of the
   stage-4 model; the script prints both and their difference, and exits non-zero unless stage 4 improves on stage 3.

Results are appended to ``benchmarks/results/quality_smoke.md`` with the device name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _device import describe_device  # noqa: E402


def stsb_spearman(model, rows: list[dict], prompt_name: str | None = None) -> float:
    """Spearman correlation between cosine similarity and the gold 0-5 scores."""
    from scipy.stats import spearmanr

    first = model.encode([r["sentence1"] for r in rows], prompt_name=prompt_name, convert_to_tensor=True,
                         batch_size=64)
    second = model.encode([r["sentence2"] for r in rows], prompt_name=prompt_name, convert_to_tensor=True,
                          batch_size=64)
    cosine = model.similarity_pairwise(first, second).float().cpu().numpy()
    return float(spearmanr(cosine, [r["score"] for r in rows]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("CONAN_DATA_DIR"),
                        help="the shared data folder (default: $CONAN_DATA_DIR)")
    parser.add_argument("--work-dir", default="runs/quality-smoke")
    parser.add_argument("--stage3", default=None, help="an existing stage-3 model folder (skips stages 0-3)")
    parser.add_argument("--epochs", type=float, default=1.0, help="stage-4 epochs over STS-B train")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "quality_smoke.md"))
    args = parser.parse_args()
    if not args.data_dir or not Path(args.data_dir).is_dir():
        parser.error("set CONAN_DATA_DIR (or --data-dir) to the shared data folder")
    stsb = Path(args.data_dir) / "sts" / "stsb-multi-mt"

    from conan_hf.data.readers import read_stsb_multi_mt
    from conan_hf.stages import supervised
    from conan_hf.stages.run_all import run_pipeline
    from conan_hf.training.config import config_from_dict, default_config_path, load_config
    from conan_hf.training.models import load_sentence_model

    start = time.perf_counter()
    work = Path(args.work_dir)
    stage3 = args.stage3
    if stage3 is None:
        run_pipeline(["tokenizer", "pretrain", "sft", "weak"], work_dir=str(work / "pipeline"),
                     output_dir=str(work / "unused"), preset="tiny", demo_eval=False)
        stage3 = str(work / "pipeline" / "weak" / "final")

    tiny = load_config(supervised.SupervisedConfig, default_config_path("supervised"), preset="tiny")
    config = config_from_dict(supervised.SupervisedConfig, {
        **{f: getattr(tiny, f) for f in ("num_threads", "max_seq_length", "learning_rate", "bf16",
                                        "gradient_checkpointing", "warmup_ratio", "weight_decay", "lr_scheduler_type")},
        "model": stage3, "output_dir": str(work / "supervised"), "resume": "no", "num_train_epochs": args.epochs,
        "max_steps": args.max_steps, "save_steps": 10**6, "logging_steps": 20,
        "tasks": [{"name": "sts", "type": "sts", "batch_size": 32, "prompt": "Retrieve semantically similar text",
                   "data": [{"path": str(stsb / "stsb-en-train.csv"),
                             "columns": {"sentence1": 0, "sentence2": 1, "score": 2}}]}],
    })
    summary = supervised.run(config)

    dev = list(read_stsb_multi_mt(stsb, "en", split="dev"))
    before = stsb_spearman(load_sentence_model(stage3, max_seq_length=config.max_seq_length), dev)
    after_model = load_sentence_model(summary["final_dir"], max_seq_length=config.max_seq_length)
    after = stsb_spearman(after_model, dev, prompt_name="STS")
    after_no_prompt = stsb_spearman(after_model, dev)
    minutes = (time.perf_counter() - start) / 60
    device = describe_device()
    lines = [
        f"STS-B en dev ({len(dev)} pairs) Spearman x100, tiny Conan model (demo-corpus stages 0-3):",
        f"  stage 3 (baseline)                 {before * 100:6.2f}",
        f"  stage 4 on STS-B en train, prompt  {after * 100:6.2f}   ({(after - before) * 100:+.2f})",
        f"  stage 4, without prompt            {after_no_prompt * 100:6.2f}   "
        f"({(after_no_prompt - before) * 100:+.2f})",
        f"  stage 4: {summary['global_step']} steps of batch 32 (CoSENT + Matryoshka {summary['matryoshka_dims']}); "
        f"total {minutes:.1f} min",
    ]
    print("\n" + "\n".join(lines))
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        if new:
            handle.write("# Quality smoke: supervised stage on STS-B (benchmarks/quality_smoke.py)\n\n")
        handle.write(f"## {time.strftime('%Y-%m-%d')} — {device}\n\n```\n" + "\n".join(lines) + "\n```\n\n")
    if not after > before:
        sys.exit("stage 4 did not improve STS-B dev Spearman over the stage-3 model")


if __name__ == "__main__":
    main()
