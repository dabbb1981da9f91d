"""All training stages in order, each handing its output to the next (the main job, ``examples/finetune.py``).

    accelerate launch -m conan_hf.stages all                      # = accelerate launch examples/finetune.py

Hand-off: ``work_dir/tokenizer`` → ``work_dir/pretrain/final`` (ConanForCausalLM) → ``work_dir/sft/final`` →
``work_dir/weak/final`` (SentenceTransformer, soft mask ended bidirectional) → ``output_dir`` (final
SentenceTransformer with prompts and MRL dims, exported with stock transformers classes: it loads without
``trust_remote_code``). ``--stages 3,4 --set weak.model=<your decoder>`` starts from your own model instead.

With the demo data (the default), a held-out part of the demo CLR pairs and STS pairs is written aside before training
and used to evaluate the embedding model before stage 3 (stage 3's input, e.g. the SFT decoder, mean-pooled and
bidirectional), after stage 3 and after stage 4.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError, OneLineArgumentParser, cli_errors
from conan_hf.training.checkpoints import StageInputError, read_stage_record
from conan_hf.training.config import add_option, default_config_path, load_config
from conan_hf.training.distributed import is_main_process, print_main

STAGES = ("tokenizer", "pretrain", "sft", "weak", "supervised")
STAGE_NUMBERS = {name: number for number, name in enumerate(STAGES)}


def _stage_module(stage: str):
    import importlib

    return importlib.import_module(f"conan_hf.stages.{stage}")


def _config_class(stage: str):
    module = _stage_module(stage)
    return {"tokenizer": "TokenizerConfig", "pretrain": "PretrainConfig", "sft": "SFTConfig", "weak": "WeakConfig",
            "supervised": "SupervisedConfig"}[stage], module


def parse_stages(spec: str) -> list[str]:
    """``"all"``, ``"0-4"``, ``"3,4"`` or names (``"weak,supervised"``) → stage names in pipeline order."""
    if spec == "all":
        return list(STAGES)
    chosen: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part and all(p.strip().isdigit() for p in part.split("-")):
            lo, hi = (int(p) for p in part.split("-"))
            chosen.update(STAGES[lo: hi + 1])
        elif part.isdigit() and int(part) < len(STAGES):
            chosen.add(STAGES[int(part)])
        elif part in STAGES:
            chosen.add(part)
        else:
            raise DataError(f"unknown stage {part!r}", hint=f"stages are {list(STAGES)} (or their numbers 0-4)")
    return [s for s in STAGES if s in chosen]


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["sft.max_steps=10", "supervised.lora={r: 8}"]`` → ``{"sft": {"max_steps": "10"}, ...}`` (values are
    converted to each field's type when the config is built; ``*.key=value`` applies to every stage having it)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or (stage not in STAGES and stage != "*"):
            raise DataError(f"override {item!r} is not <stage>.<key>=<value>",
                            hint=f"use a stage in {list(STAGES)} or '*', e.g. --set pretrain.max_steps=100")
        out.setdefault(stage, {})[name] = value
    return out


def build_configs(
    stages: list[str],
    work_dir: str,
    output_dir: str,
    preset: str | None = "tiny",
    config_dir: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One config per stage: the stage YAML (+ preset), the hand-off paths under ``work_dir``, then ``overrides``."""
    work = Path(work_dir)
    handoff = {
        "tokenizer": {"output_dir": str(work / "tokenizer")},
        "pretrain": {"output_dir": str(work / "pretrain"), "tokenizer": str(work / "tokenizer")},
        "sft": {"output_dir": str(work / "sft"), "model": str(work / "pretrain" / "final")},
        "weak": {"output_dir": str(work / "weak"), "model": str(work / "sft" / "final")},
        "supervised": {"output_dir": str(work / "supervised"), "model": str(work / "weak" / "final"),
                       "final_dir": output_dir},
    }
    overrides = overrides or {}
    configs = {}
    for stage in stages:
        class_name, module = _config_class(stage)
        cls = getattr(module, class_name)
        path = Path(config_dir) / f"{stage}.yaml" if config_dir else default_config_path(stage)
        values = dict(handoff[stage])
        fields = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.get("*", {}).items() if k in fields})
        values.update(overrides.get(stage, {}))
        configs[stage] = load_config(cls, path, preset=preset, overrides=values)
    return configs


# ---- demo data and evaluation ---------------------------------------------------------------------------------------
def prepare_demo_data(data_dir: str | Path, holdout: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Split the demo corpus: training files for the stages (JSONL under ``data_dir``) and held-out evaluation sets
    (CLR pairs, STS pairs; also written as ``sts_heldout.jsonl`` / ``clr_heldout.jsonl``). Texts of held-out pairs
    are removed from every training file, including pre-training."""
    from conan_hf import demo
    from conan_hf.data.sources import split_holdout

    data_dir = Path(data_dir)
    clr_train, clr_eval = split_holdout(demo.demo_clr(), holdout, seed)
    sts_train, sts_eval = split_holdout(demo.demo_sts(), holdout, seed)
    held = {r["query"] for r in clr_eval} | {r["positive"] for r in clr_eval}
    held |= {r["sentence1"] for r in sts_eval} | {r["sentence2"] for r in sts_eval}

    def clean(rows, columns):
        return [r for r in rows if not any(r.get(c) in held for c in columns)]

    files = {
        "texts": [{"text": t} for t in demo.demo_texts() if t not in held],
        "instructions": clean(demo.demo_instructions(), ("input", "output")),
        "retrieval": demo.demo_retrieval(),
        "clr": [dict(r, negatives=[n for n in r["negatives"] if n not in held]) for r in clr_train],
        "classification": clean(demo.demo_classification(), ("text",)),
        "sts": clean(sts_train, ("sentence1", "sentence2")),
    }
    # The held-out sets too, so a user can evaluate the finished model on them (e.g. with conan_hf.eval); no stage
    # reads them.
    heldout = {"sts_heldout": sts_eval, "clr_heldout": clr_eval}
    paths = {}
    if is_main_process():
        data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in {**files, **heldout}.items():
        paths[name] = str(data_dir / f"{name}.jsonl")
        if is_main_process():
            with open(paths[name], "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {"paths": paths, "clr_eval": clr_eval, "sts_eval": sts_eval,
            "sizes": {name: len(rows) for name, rows in files.items()}}


def use_demo_files(configs: dict[str, Any], paths: dict[str, str]) -> None:
    """Point every ``data: [demo]`` of the stage configs at the held-out-free demo files."""
    simple = {"tokenizer": "texts", "pretrain": "texts", "sft": "instructions", "weak": "instructions"}
    for stage, config in configs.items():
        if stage in simple and config.data in (["demo"], "demo"):
            config.data = [{"path": paths[simple[stage]]}]
        if stage == "supervised":
            for task in config.tasks:
                if task.get("data", ["demo"]) in (["demo"], "demo"):
                    task["data"] = [{"path": paths[task["type"]]}]


def trained_prompts(folder: str | Path) -> dict[str, str]:
    """``{task name: prompt}`` of the stage-4 tasks recorded in ``folder/conan_stage.json`` (empty without one)."""
    record = read_stage_record(folder) or {}
    tasks = (record.get("summary") or {}).get("tasks") or {}
    return {name: task["prompt"] for name, task in tasks.items() if isinstance(task, dict) and task.get("prompt")}


def evaluate_embedder(model, clr_eval: list[dict], sts_eval: list[dict],
                      prompts: dict[str, str] | None = None) -> dict[str, float]:
    """CLR accuracy@1 / MRR@10 (English query → its Chinese translation among all held-out Chinese sentences, with
    sentence-transformers' InformationRetrievalEvaluator) and the Spearman correlation of cosine similarity with the
    STS scores. ``prompts`` (``{"clr": ..., "sts": ...}``, e.g. :func:`trained_prompts`) are the prompts the model
    was trained with for those tasks; they are excluded from pooling, and a task without one is encoded without."""
    from scipy.stats import spearmanr
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    prompts = prompts or {}
    queries = {f"q{i}": r["query"] for i, r in enumerate(clr_eval)}
    corpus = {f"d{i}": r["positive"] for i, r in enumerate(clr_eval)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(len(clr_eval))}
    ir = InformationRetrievalEvaluator(queries, corpus, relevant, name="clr", write_csv=False, accuracy_at_k=[1],
                                       precision_recall_at_k=[1], mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10],
                                       query_prompt=prompts.get("clr"))
    ir_scores = ir(model)
    sts_prompt = prompts.get("sts")
    first = model.encode([r["sentence1"] for r in sts_eval], prompt=sts_prompt, convert_to_tensor=True)
    second = model.encode([r["sentence2"] for r in sts_eval], prompt=sts_prompt, convert_to_tensor=True)
    cosine = model.similarity_pairwise(first, second).float().cpu().numpy()
    return {"clr_accuracy@1": ir_scores["clr_cosine_accuracy@1"], "clr_mrr@10": ir_scores["clr_cosine_mrr@10"],
            "sts_spearman": float(spearmanr(cosine, [r["score"] for r in sts_eval]).statistic)}


# ---- the pipeline ----------------------------------------------------------------------------------------------------
def run_pipeline(
    stages: list[str],
    work_dir: str = "runs/finetune",
    output_dir: str = "conan-v2",
    preset: str | None = "tiny",
    config_dir: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    demo_eval: bool = True,
) -> dict[str, Any]:
    """Run ``stages`` in order; returns ``{"stages": {stage: summary}, "evaluation": {...}, "seconds": {...}}``."""
    from accelerate import PartialState

    state = PartialState()  # one process group for the whole job (the stages' Trainers reuse it)
    configs = build_configs(stages, work_dir, output_dir, preset, config_dir, overrides)
    demo_data = None
    uses_demo = any(getattr(c, "data", None) in (["demo"], "demo") for c in configs.values()) or (
        "supervised" in configs and any(t.get("data", ["demo"]) in (["demo"], "demo")
                                         for t in configs["supervised"].tasks))
    if uses_demo:
        demo_data = prepare_demo_data(Path(work_dir) / "demo-data")
        use_demo_files(configs, demo_data["paths"])
        state.wait_for_everyone()
        print_main(f"demo corpus (written by us, en/zh): {demo_data['sizes']}; held out for evaluation: "
                   f"{len(demo_data['clr_eval'])} CLR pairs, {len(demo_data['sts_eval'])} STS pairs")
    evaluation: dict[str, dict[str, float]] = {}

    def evaluate(label: str, path: str) -> None:
        if not (demo_eval and demo_data) or not state.is_main_process:
            return
        from conan_hf.training.models import load_sentence_model

        # A stage output keeps its saved attention and pooling (stage 4 may be causal with last-token pooling); stage
        # 3's input, a bare decoder, is evaluated bidirectional and mean-pooled.
        model = load_sentence_model(path, attention_mode=None, max_seq_length=128)
        evaluation[label] = evaluate_embedder(model, demo_data["clr_eval"], demo_data["sts_eval"],
                                              trained_prompts(path))
        print_main(f"[eval] {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation[label].items()))

    summaries: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for stage in stages:
        if stage == "weak":
            start_model = configs["weak"].model
            own = Path(start_model) != Path(work_dir) / "sft" / "final"
            evaluate(f"before stage 3 ({Path(start_model).name if own else 'SFT decoder'} as embedder)", start_model)
        start = time.perf_counter()
        print_main(f"\n=== stage {STAGE_NUMBERS[stage]}: {stage} ===")
        module = _stage_module(stage)
        if stage == "tokenizer":
            if state.is_main_process:
                module.run(configs[stage])
            state.wait_for_everyone()
            summaries[stage] = {"final_dir": configs[stage].output_dir}
        else:
            try:
                summaries[stage] = module.run(configs[stage])
            except StageInputError as error:  # say it with the main job's options
                raise StageInputError(
                    f"{error.value} not found: run stage {STAGE_NUMBERS[error.producer]} ({error.producer}) too "
                    f"(--stages {STAGE_NUMBERS[error.producer]}-{STAGE_NUMBERS[stage]}), or pass --set "
                    f"{stage}.{error.option}=PATH", stage=stage, option=error.option, value=error.value,
                    producer=error.producer) from None
        seconds[stage] = time.perf_counter() - start
        if stage in ("weak", "supervised"):
            evaluate(f"after stage {STAGE_NUMBERS[stage]} ({stage})", summaries[stage]["final_dir"])
    if "supervised" in summaries and state.is_main_process:
        write_model_card(summaries, evaluation)
    state.wait_for_everyone()
    return {"stages": summaries, "evaluation": evaluation, "seconds": seconds}


def write_model_card(summaries: dict[str, Any], evaluation: dict[str, dict[str, float]]) -> Path:
    """README.md of the final model, from the stage records the stages wrote and the held-out demo scores."""
    from conan_hf.model_card import generate_model_card
    from conan_hf.training.checkpoints import STAGE_RECORD

    records = [Path(s["final_dir"]) / STAGE_RECORD for s in summaries.values()
               if (Path(s["final_dir"]) / STAGE_RECORD).is_file()]
    final_scores = evaluation.get(f"after stage {STAGE_NUMBERS['supervised']} (supervised)", {})
    results = {f"demo-heldout/{name}": score for name, score in final_scores.items()} or None
    model_dir = Path(summaries["supervised"]["final_dir"])
    generate_model_card(model_dir, run_info=records, results=results)
    print_main(f"[model card] {model_dir / 'README.md'} ({len(records)} stage records)")
    return model_dir / "README.md"


def print_report(report: dict[str, Any]) -> None:
    """Per-stage losses and the before/after evaluation, as a small table."""
    print_main("\n=== summary ===")
    for stage, summary in report["stages"].items():
        losses = summary.get("losses") or []
        loss = f"loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f} ({summary.get('global_step')} steps)" if losses else ""
        print_main(f"stage {STAGE_NUMBERS[stage]} {stage:<10} {report['seconds'][stage]:6.1f}s  {loss}  "
                   f"-> {summary.get('final_dir')}")
    if report["evaluation"]:
        names = list(next(iter(report["evaluation"].values())))
        print_main(f"{'model':<42}" + "".join(f"{n:>16}" for n in names))
        for label, scores in report["evaluation"].items():
            print_main(f"{label:<42}" + "".join(f"{scores[n]:>16.3f}" for n in names))


@cli_errors("finetune")
def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = OneLineArgumentParser(
        prog="finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags are spelled with underscores (--max_steps), as the stages' and transformers'; dashes "
               "(--max-steps) are accepted too.")
    add_option(parser, "output_dir", default="conan-v2", help="final SentenceTransformer folder (%(default)s)")
    add_option(parser, "work_dir", default="runs/finetune", help="stage outputs and checkpoints (%(default)s)")
    parser.add_argument("--stages", default="all", help="'all', '0-4', '3,4' or names (default: all)")
    parser.add_argument("--preset", default="tiny",
                        help="preset of the stage YAMLs: 'tiny' (CPU demo, default) or 'none' for the paper's "
                             "full-size defaults")
    add_option(parser, "config_dir", default=None,
               help="folder with your own <stage>.yaml files (default: conan_hf/stages/configs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a stage option, e.g. --set pretrain.max_steps=100 "
                             "--set 'supervised.lora={r: 8}' --set '*.max_steps=5' (repeatable)")
    add_option(parser, "max_steps", type=int, default=None, help="cap every training stage at this many steps")
    parser.add_argument("--resume", default=None,
                        help="every training stage's resume option: 'auto' (their default: continue from the latest "
                             "complete checkpoint, skip a stage already done with the same options) or 'no' (train "
                             "again from the start)")
    add_option(parser, "no_eval", action="store_true", help="skip the held-out demo evaluation")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    for name in ("max_steps", "resume"):
        if getattr(args, name) is not None:
            overrides.setdefault("*", {})[name] = getattr(args, name)
    preset = None if args.preset in ("none", "None", "") else args.preset
    report = run_pipeline(parse_stages(args.stages), args.work_dir, args.output_dir, preset, args.config_dir,
                          overrides, demo_eval=not args.no_eval)
    print_report(report)
    if "supervised" in report["stages"] and is_main_process():
        from sentence_transformers import SentenceTransformer

        export = report["stages"]["supervised"].get("export") or {}
        stock = export.get("export_format") == "stock"
        model = SentenceTransformer(args.output_dir, trust_remote_code=not stock)
        embeddings = model.encode(["What do pandas eat?", "熊猫吃什么？"], prompt_name=_first_prompt(model))
        how = (f"SentenceTransformer({args.output_dir!r}) with stock transformers classes (no remote code: "
               f"{export.get('backbone')}, model_type {export.get('model_type')!r}, is_causal "
               f"{export.get('is_causal')})" if stock else
               f"SentenceTransformer({args.output_dir!r}, trust_remote_code=True)")
        print_main(f"\n{args.output_dir}: loads with {how}; embedding dim {embeddings.shape[1]}, "
                   f"prompts {sorted(model.prompts)}")
    return report


def _first_prompt(model) -> str | None:
    """The ``query`` prompt when the model has one (stage 4 saves its retrieval prompt under it), else none."""
    return "query" if (model.prompts or {}).get("query") else None


if __name__ == "__main__":
    main()
