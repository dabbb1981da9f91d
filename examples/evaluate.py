"""Evaluate an embedding model on local data with mteb, as in the paper's §4, and (optionally) write its model card.

    export CONAN_DATA_DIR=/path/to/shared/data
    python examples/evaluate.py --model runs/final                        # a trained Conan SentenceTransformer
    python examples/evaluate.py --model runs/final --dim 256 --card        # Matryoshka dim; write runs/final/README.md

Without ``--model`` a tiny random Conan model is built, which shows the plumbing (numbers are near chance).
Runs STS (English and Chinese STS-B dev), retrieval (SciFact subset), bitext mining (Tatoeba deu-eng), MKQA-style
cross-lingual retrieval on XQuAD (Table 13 layout) and the Fig. 3 language-distribution plot.

The model is encoded with the prompts it was trained with (its saved ``prompts``, none for a task type it has no
prompt for), as plain ``mteb.evaluate`` would; the table names model, task, split, metric, score and prompt. SciFact
has only train qrels: a model trained on them is scored on its training data, and a warning says so. Result files go
to ``<output>/<model>/<task>.json``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SentenceTransformer folder or Hub id (default: a tiny random Conan model)")
    parser.add_argument("--data-dir", default=os.environ.get("CONAN_DATA_DIR"), help="shared data folder")
    parser.add_argument("--output", default="eval_results",
                        help="<output>/<model>/<task>.json result files, summary.json, the plot")
    parser.add_argument("--dim", type=int, help="Matryoshka dimension")
    parser.add_argument("--limit", type=int, default=300, help="rows / queries per task (quick runs)")
    parser.add_argument("--card", action="store_true", help="write the model card (README.md) into --model")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("set CONAN_DATA_DIR or pass --data-dir")
    data = Path(args.data_dir)

    from conan_hf.eval import (
        bitext_task,
        evaluate,
        evaluate_cross_lingual,
        load_xquad,
        plot_language_distribution,
        retrieval_task,
        sts_task,
    )
    from conan_hf.eval.tasks import read_sts

    if args.model:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, trust_remote_code=True)
    else:
        from conan_hf import ConanConfig, build_sentence_transformer

        model = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=128)

    tasks = [
        sts_task(data / "sts/stsb-multi-mt/stsb-en-dev.csv", limit=args.limit),
        sts_task(data / "sts/zh/sts-b-dev.txt", limit=args.limit),
        retrieval_task(data / "retrieval/scifact", limit_queries=args.limit // 3, limit_corpus=1000),
        bitext_task(data / "xling/tatoeba/tatoeba.deu-eng", limit=args.limit),
    ]
    report = evaluate(model, tasks, dim=args.dim, output_folder=args.output)
    print(report.table(), "\n")

    xling = evaluate_cross_lingual(model, load_xquad(data / "xling/xquad", languages=["de", "es", "zh"],
                                                     limit_queries=args.limit), dim=args.dim,
                                   output_folder=args.output)
    print(xling.table(), "\n")

    texts = {lang: read_sts(data / f"sts/stsb-multi-mt/stsb-{lang}-dev.csv", limit=200).sentence1
             for lang in ("en", "de", "zh")}
    print("Wrote", plot_language_distribution(model, texts, Path(args.output) / "language_distribution.png",
                                              dim=args.dim))

    if args.card and args.model:
        from conan_hf.model_card import generate_model_card

        generate_model_card(args.model, results=[report, xling])
        print("Wrote", Path(args.model) / "README.md")


if __name__ == "__main__":
    main()
