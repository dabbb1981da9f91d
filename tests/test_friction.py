"""Issue 12, parts 3-4: a Hub-ready model card whose snippets run as written, and the friction a new user hits with
the stage command lines (--help, missing inputs, presets, "already done", Ctrl-C) and with evaluation (model names,
prompt names, JSONL STS files)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = {"tokenizer": ("conan_hf.stages.tokenizer", "TokenizerConfig"), "pretrain": ("conan_hf.stages.pretrain", "PretrainConfig"),
          "sft": ("conan_hf.stages.sft", "SFTConfig"), "weak": ("conan_hf.stages.weak", "WeakConfig"),
          "supervised": ("conan_hf.stages.supervised", "SupervisedConfig")}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               COLUMNS="1000", **extra)
    return env


def _config_class(stage: str):
    import importlib

    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- --help ----------------------------------------------------------------------------------------------------------
def _option_entries(help_text: str) -> list[str]:
    """One string per option of an argparse help text (its flag line and the indented help lines after it)."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    return entries


def test_stage_help_lists_every_option_with_meaning_and_defaults(capsys, monkeypatch):
    from conan_hf.training.config import field_help, parse_config

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    for stage in STAGES:
        cls = _config_class(stage)
        with pytest.raises(SystemExit) as exit_info:
            parse_config(cls, stage, ["--help"])
        assert exit_info.value.code == 0
        lines = _option_entries(capsys.readouterr().out)
        shipped = yaml.safe_load((REPO / "conan_hf" / "stages" / "configs" / f"{stage}.yaml").read_text(encoding="utf-8"))
        tiny = shipped.pop("presets")["tiny"]
        for field in dataclasses.fields(cls):
            line = next((x for x in lines if x.startswith(f"--{field.name} ")), None)
            assert line is not None, f"{stage}: --{field.name} missing from --help"
            meaning = field_help(field)
            assert meaning and meaning.split()[0] in line and "(undocumented)" not in line, (stage, field.name, line)
            default = shipped.get(field.name, field.default if field.default is not dataclasses.MISSING
                                  else field.default_factory())
            quoted = isinstance(default, (list, dict)) or (isinstance(default, str) and "\n" in default)
            shown = json.dumps(default, ensure_ascii=False) if quoted else str(default)
            assert f"(default: {shown}" in line, (stage, field.name, line)
            if field.name in tiny:
                assert f"--preset tiny: {tiny[field.name]}" in line, (stage, field.name, line)
    # the meanings come from the fields' help metadata, a subclass's own default keeping the base field's meaning
    supervised_docs = {f.name: field_help(f) for f in dataclasses.fields(_config_class("supervised"))}
    assert supervised_docs["temperature"] == "InfoNCE τ (eq. 1)."
    assert supervised_docs["cosent_scale"].startswith("CoSENT's scale")
    assert supervised_docs["output_dir"].startswith("checkpoints go to")  # inherited from StageConfig


def test_stage_help_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "conan_hf.stages.weak", "--help"], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = _option_entries(result.stdout)
    assert any(re.fullmatch(r"--soft_mask_schedule \S+ ``linear`` \(α = t/τ, the paper\).*\(default: linear\)", e)
               for e in entries), entries
    assert any(re.fullmatch(r"--per_device_train_batch_size \S+ examples per batch .*\(default: 64; --preset tiny: "
                            r"16\)", e) for e in entries), entries


# ---- presets ---------------------------------------------------------------------------------------------------------
def test_user_values_win_over_the_preset_and_the_preset_shrinks_shipped_values(tmp_path):
    from conan_hf.training.config import load_config, parse_config
    from conan_hf.stages.pretrain import PretrainConfig

    shipped_path = REPO / "conan_hf" / "stages" / "configs" / "pretrain.yaml"
    shipped = yaml.safe_load(shipped_path.read_text(encoding="utf-8"))
    tiny = shipped["presets"]["tiny"]

    # the shipped file + tiny: the preset replaces the paper values
    cfg = parse_config(PretrainConfig, "pretrain", ["--preset", "tiny"])
    assert (cfg.model, cfg.seq_length, cfg.learning_rate, cfg.bf16) == (
        tiny["model"], tiny["seq_length"], tiny["learning_rate"], tiny["bf16"])
    assert cfg.weight_decay == PretrainConfig().weight_decay == 0.001  # not in the preset: the paper value

    # a user's own YAML: its values win, the preset fills in the rest, flags win over both
    mine = tmp_path / "mine.yaml"
    mine.write_text("max_steps: 7\nlearning_rate: 0.01\nseq_length: 64\n", encoding="utf-8")
    cfg = parse_config(PretrainConfig, "pretrain", ["--config", str(mine), "--preset", "tiny"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.seq_length) == (7, 0.01, 64)
    assert (cfg.model, cfg.bf16, cfg.num_threads) == ("tiny", False, 1)  # from the shipped tiny preset
    cfg = parse_config(PretrainConfig, "pretrain", ["--config", str(mine), "--preset", "tiny", "--max_steps", "9"])
    assert cfg.max_steps == 9

    # a copy of the shipped file with one value set: that value is the user's, the rest still shrinks
    copy = tmp_path / "configs" / "pretrain.yaml"
    copy.parent.mkdir()
    copy.write_text("learning_rate: 2.0e-4\n" + shipped_path.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config(PretrainConfig, copy, preset="tiny")  # the shipped counterpart is found by the file name
    assert (cfg.learning_rate, cfg.model, cfg.seq_length) == (2e-4, "tiny", tiny["seq_length"])

    # the main job's --config-dir goes through the same rule
    from conan_hf.stages.run_all import build_configs

    configs = build_configs(["pretrain"], str(tmp_path / "work"), str(tmp_path / "out"), config_dir=str(copy.parent))
    assert (configs["pretrain"].learning_rate, configs["pretrain"].model) == (2e-4, "tiny")


# ---- missing inputs --------------------------------------------------------------------------------------------------
def test_missing_stage_inputs_say_how_to_make_them(tmp_path, monkeypatch):
    from conan_hf.training.checkpoints import StageInputError, check_stage_input

    cwd = tmp_path / "fresh"
    cwd.mkdir()
    # the README's one-stage commands in a fresh folder: one line each, exit code 2, no Hub lookup
    pretrain = subprocess.run([sys.executable, "-m", "conan_hf.stages.pretrain", "--preset", "tiny", "--max_steps", "20"],
                              env=_env(), cwd=cwd, capture_output=True, text=True, timeout=120)
    assert pretrain.returncode == 2, pretrain.stderr[-2000:]
    assert pretrain.stderr.strip().splitlines()[-1] == (
        "conan-train pretrain: error: runs/tokenizer not found: run `conan-train tokenizer "
        "--preset tiny` first "
        "(it writes runs/tokenizer), or pass --tokenizer PATH")
    assert "Traceback" not in pretrain.stderr and "Repo id" not in pretrain.stderr
    supervised = subprocess.run([sys.executable, "-m", "conan_hf.stages.supervised"], env=_env(), cwd=cwd,
                                capture_output=True, text=True, timeout=120)
    assert supervised.returncode == 2, supervised.stderr[-2000:]
    assert supervised.stderr.strip().splitlines()[-1] == (
        "conan-train supervised: error: runs/weak/final not found: run `conan-train weak --preset tiny` "
        "first (it writes "
        "runs/weak/final), or pass --model PATH")

    # in-process: the other stages, other local-looking paths, the main job's copy, and Hub ids left alone
    monkeypatch.chdir(cwd)
    sft, weak = _config_class("sft")(), _config_class("weak")()
    with pytest.raises(StageInputError, match=r"^runs/pretrain/final not found: run `conan-train pretrain"):
        check_stage_input(sft, "sft")
    (cwd / "runs" / "finetune" / "sft" / "final").mkdir(parents=True)
    with pytest.raises(StageInputError, match=r"the main job wrote one to runs/finetune/sft/final: "
                                              r"--model runs/finetune/sft/final$"):
        check_stage_input(weak, "weak")
    for local in ("./my-model", "runs/finetune/nothing", "/abs/path/model", "a/b/c"):
        weak.model = local
        with pytest.raises(StageInputError, match=f"^{re.escape(local)} not found: make it with"):
            check_stage_input(weak, "weak")
    weak.model = "Qwen/Qwen2.5-0.5B"  # a Hub id: the loaders resolve it
    check_stage_input(weak, "weak")
    weak.model = str(cwd / "runs" / "finetune" / "sft" / "final")  # exists
    check_stage_input(weak, "weak")


@pytest.mark.slow
def test_readme_one_stage_commands_run_standalone(tmp_path):
    """`tokenizer_stage` then `pretrain` in a fresh folder: the second reads the first's output."""
    for argv in (["conan_hf.stages.tokenizer", "--preset", "tiny"],
                 ["conan_hf.stages.pretrain", "--preset", "tiny", "--max_steps", "2", "--disable_tqdm", "true"]):
        result = subprocess.run([sys.executable, "-m", *argv], env=_env(), cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "pretrain" / "final" / "conan_stage.json").read_text())
    assert record["summary"]["global_step"] == 2 and record["config"]["tokenizer"] == "runs/tokenizer"


# ---- already done / Ctrl-C -------------------------------------------------------------------------------------------
def _tiny_supervised_config(model: Path, output_dir: Path, **values):
    from conan_hf.training.config import config_from_dict

    return config_from_dict(_config_class("supervised"), {
        "model": str(model), "output_dir": str(output_dir), "max_seq_length": 48, "bf16": False, "num_threads": 1,
        "max_steps": 2, "logging_steps": 1, "disable_tqdm": True, "save_steps": 100,
        "tasks": [{"name": "sim", "type": "sts", "batch_size": 8}], **values})


def test_finished_stage_says_already_done(tiny_model_dir, tmp_path, capsys, restore_threads):
    from conan_hf.stages import supervised
    from conan_hf.training.checkpoints import completed_stage

    upstream = tmp_path / "weak" / "final"  # stands for the stage-3 output, with its stage record
    shutil.copytree(tiny_model_dir, upstream)
    (upstream / "conan_stage.json").write_text("{}", encoding="utf-8")
    config = _tiny_supervised_config(upstream, tmp_path / "sup")
    first = supervised.run(config)
    capsys.readouterr()
    final = tmp_path / "sup" / "final"
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    again = supervised.run(_tiny_supervised_config(upstream, tmp_path / "sup", logging_steps=5))
    out = capsys.readouterr().out
    assert out.strip() == f"[stage 4] already done: {final} (delete it or pass --resume no to retrain)"
    assert again == json.loads(json.dumps(first))  # the recorded summary (as JSON), final_dir included
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp  # nothing retrained or rewritten
    # other options, resume: no, or an explicit checkpoint: the stage trains
    assert completed_stage(_tiny_supervised_config(upstream, tmp_path / "sup", max_steps=3), 4, "supervised") is None
    assert completed_stage(_tiny_supervised_config(upstream, tmp_path / "sup", resume="no"), 4, "supervised") is None
    # the input written again after this stage finished (stage 3 re-run): trained again
    assert completed_stage(config, 4, "supervised") is not None
    later = (final / "conan_stage.json").stat().st_mtime + 10
    os.utime(upstream / "conan_stage.json", (later, later))
    assert completed_stage(config, 4, "supervised") is None


def test_tokenizer_stage_is_not_retrained_on_the_same_texts(tmp_path, capsys):
    """Stage 0 is skipped when options and texts are unchanged, so a re-run of the main job does not rewrite it and
    make every later stage see a newer input."""
    from conan_hf.training.checkpoints import STAGE_RECORD
    from conan_hf.training.config import config_from_dict
    from conan_hf.stages.tokenizer import TokenizerConfig, run

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} about pandas"}) + "\n" for i in range(50)),
                     encoding="utf-8")
    config = config_from_dict(TokenizerConfig, {"output_dir": str(tmp_path / "tok"), "vocab_size": 300,
                                                "data": [{"path": str(texts)}]})
    first = run(config)
    record = tmp_path / "tok" / STAGE_RECORD
    stamp = record.stat().st_mtime_ns
    capsys.readouterr()
    again = run(config)
    assert capsys.readouterr().out.strip() == (
        f"[stage 0] already done: {tmp_path / 'tok'} (same options and texts; delete it to retrain)")
    assert record.stat().st_mtime_ns == stamp and again.get_vocab() == first.get_vocab()
    with texts.open("a", encoding="utf-8") as handle:  # other texts: trained again
        handle.write(json.dumps({"text": "one more sentence"}) + "\n")
    run(config)
    assert "tokenizer:" in capsys.readouterr().out and record.stat().st_mtime_ns != stamp


def test_interrupt_before_a_checkpoint_says_start_over(tmp_path, capsys):
    from conan_hf.training.checkpoints import stage_exits

    config = _config_class("sft")(output_dir=str(tmp_path / "sft"))
    with pytest.raises(SystemExit) as exit_info, stage_exits(config):
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted; run the same command again to train from the start (no complete checkpoint yet)")


@pytest.mark.slow
def test_ctrl_c_ends_with_the_checkpoint_to_resume_from(tiny_model_dir, tmp_path):
    from conan_hf.training.checkpoints import COMMIT_MARKER, latest_checkpoint

    out = tmp_path / "sup"
    cmd = [sys.executable, "-m", "conan_hf.stages.supervised", "--preset", "tiny", "--model", str(tiny_model_dir),
           "--output_dir", str(out), "--max_steps", "400", "--save_steps", "2", "--disable_tqdm", "true"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / "checkpoint-2" / COMMIT_MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    latest = latest_checkpoint(out)
    assert latest is not None and not (out / "final").exists()
    assert stderr.strip().splitlines()[-1] == f"interrupted; run the same command again to resume from {latest}"


# ---- evaluation ------------------------------------------------------------------------------------------------------
def _write_sts_jsonl(path: Path, n: int = 40, names=("sentence1", "sentence2", "score")) -> list[dict]:
    from conan_hf.demo import demo_sts

    # identical pairs left out: their cosines tie at 1 up to rounding, and mteb and numpy break such ties differently
    rows = [r for r in demo_sts() if r["sentence1"] != r["sentence2"]][:n]
    path.write_text("".join(json.dumps({names[0]: r["sentence1"], names[1]: r["sentence2"], names[2]: r["score"]},
                                       ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _spearman_of_cosine(model, rows, prompt=None) -> float:
    from scipy.stats import spearmanr

    a = model.encode([r["sentence1"] for r in rows], prompt=prompt, normalize_embeddings=True)
    b = model.encode([r["sentence2"] for r in rows], prompt=prompt, normalize_embeddings=True)
    return float(spearmanr(np.sum(a * b, axis=1), [r["score"] for r in rows]).statistic)


def test_eval_reads_the_sts_jsonl_training_accepts(tiny_model_dir, tmp_path, capsys):
    from conan_hf.data.readers import DataFormatError
    from conan_hf.eval.__main__ import main
    from conan_hf.eval.tasks import infer_task_kind, read_sts

    plain = tmp_path / "sts-train.jsonl"
    rows = _write_sts_jsonl(plain)
    data = read_sts(plain)
    assert (data.sentence1, data.sentence2, data.score) == ([r["sentence1"] for r in rows],
                                                            [r["sentence2"] for r in rows],
                                                            [float(r["score"]) for r in rows])
    renamed = tmp_path / "pairs.jsonl"
    _write_sts_jsonl(renamed, names=("a", "b", "label"))
    assert read_sts(renamed, columns={"sentence1": "a", "sentence2": "b", "score": "label"}).score == data.score
    csv_file = tmp_path / "pairs.csv"  # header-less CSV by column index, as a training `columns:` mapping
    csv_file.write_text("".join(f'"{r["sentence1"]}","{r["sentence2"]}",{r["score"]}\n' for r in rows),
                        encoding="utf-8")
    assert read_sts(csv_file, columns={"sentence1": 0, "sentence2": 1, "score": 2}).sentence2 == data.sentence2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "sentence2": "b", '
                   '"score": "high"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: column 'score'"):
        read_sts(bad)
    assert infer_task_kind(plain) == "sts"
    mkqa = tmp_path / "mkqa.jsonl"
    mkqa.write_text('{"example_id": 1, "queries": {"en": "q"}, "answers": {}}\n', encoding="utf-8")
    assert infer_task_kind(mkqa) == "xling"

    # the command line, with inferred kind, and with a column mapping
    from sentence_transformers import SentenceTransformer

    expected = _spearman_of_cosine(SentenceTransformer(str(tiny_model_dir), trust_remote_code=True), rows)
    assert main(["--model", str(tiny_model_dir), "--data", str(plain), "--instruction-template", "none"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"LocalSTS-sts-train": pytest.approx(expected, abs=1e-6)}
    assert main(["--model", str(tiny_model_dir), "--task", "sts", "--data", str(renamed), "--columns",
                 "sentence1=a", "sentence2=b", "score=label", "--instruction-template", "none"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"LocalSTS-pairs": pytest.approx(expected, abs=1e-6)}


def test_eval_names_local_models_by_folder_and_keeps_their_results_apart(tiny_model_dir, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    from conan_hf.eval import evaluate, load_summary, sts_task

    sts_file = tmp_path / "sts.jsonl"
    rows = _write_sts_jsonl(sts_file)
    alpha, beta = tmp_path / "alpha", tmp_path / "weak" / "final"
    shutil.copytree(tiny_model_dir, alpha)
    other = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    with torch.no_grad():  # a different model: its scores differ
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other.save(str(beta))

    reports = {}
    for folder in (alpha, beta):
        model = SentenceTransformer(str(folder), trust_remote_code=True)  # an object, not a path
        reports[folder] = (evaluate(model, [sts_task(sts_file)], output_folder=tmp_path / "results",
                                    instruction_template=None), _spearman_of_cosine(model, rows))
    (ra, sa), (rb, sb) = reports[alpha], reports[beta]
    assert ra.settings["model_name"] == "local/alpha" and rb.settings["model_name"] == "local/weak-final"
    assert ra.results_dir != rb.results_dir
    assert sa != pytest.approx(sb, abs=1e-4)
    for report, score, folder in ((ra, sa, alpha), (rb, sb, beta)):
        summary = load_summary(report.results_dir / "summary.json")
        assert summary["settings"]["model_path"] == str(folder.resolve())
        assert [row["main_score"] for row in summary["tasks"]] == [pytest.approx(score, abs=1e-6)]


def test_eval_maps_training_prompt_names_to_mteb_keys_without_warnings(tiny_model_dir, tmp_path, caplog):
    import logging

    from sentence_transformers import SentenceTransformer

    from conan_hf.eval import evaluate, sts_task

    sts_file = tmp_path / "sts.jsonl"
    rows = _write_sts_jsonl(sts_file)
    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    sts_prompt = "Instruct: Retrieve semantically similar text\nQuery: "
    model.prompts = {"retrieval": "Instruct: Given a question, retrieve passages that answer it\nQuery: ",
                     "clr": "Instruct: Given an English sentence, retrieve its Chinese translation\nQuery: ",
                     "classification": "Instruct: Classify the activity described in the sentence\nQuery: ",
                     "sts": sts_prompt}  # the names stage 4 saves
    saved = dict(model.prompts)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        report = evaluate(model, [sts_task(sts_file)])
    prompt_warnings = [str(w.message) for w in caught if "prompt" in str(w.message).lower()]
    prompt_warnings += [r.getMessage() for r in caplog.records if "prompt" in r.getMessage().lower()]
    assert prompt_warnings == []
    assert model.prompts == saved  # the model itself is left as it was
    assert report.settings["prompts"] == {"Retrieval-query": saved["retrieval"], "Classification":
                                          saved["classification"], "STS": sts_prompt}
    # the STS task was encoded with the model's trained sts prompt
    expected = _spearman_of_cosine(model, rows, prompt=sts_prompt)
    assert expected != pytest.approx(_spearman_of_cosine(model, rows), abs=1e-4)
    assert report.main_scores["LocalSTS-sts"] == pytest.approx(expected, abs=1e-6)


# ---- model card ------------------------------------------------------------------------------------------------------
def _stock_llama_sentence_model(tiny_model_dir: Path, folder: Path) -> Path:
    """A SentenceTransformer on a stock transformers architecture (no auto_map, no remote code)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    backbone_dir = folder.parent / f"{folder.name}-backbone"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaModel(config).save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    transformer = Transformer(str(backbone_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(64, "mean"), Normalize()])
    model.save(str(folder))
    shutil.rmtree(backbone_dir)
    return folder


def _run_card_snippets(card: str, cwd: Path, model_name: str, remote_code: bool) -> list[str]:
    """Execute every ```python block of ``card`` in a fresh interpreter (stdin closed, no y/N prompt allowed); checks
    each ``print(...)  # expected`` comment against the output. Returns the blocks."""
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    for block in blocks:
        code = block
        if "AutoModel" in block:  # the transformers recipe must give sentence-transformers' embeddings
            code += ("\nfrom sentence_transformers import SentenceTransformer as _ST\n"
                     f"_ref = _ST({model_name!r}, trust_remote_code={remote_code}).encode(texts, convert_to_tensor=True)\n"
                     "assert torch.allclose(embeddings, _ref, atol=1e-5), (embeddings - _ref).abs().max()\n")
        result = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=cwd,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"snippet failed:\n{block}\n{result.stderr[-3000:]}"
        # transformers asks "Do you wish to run the custom code? [y/N]" (and, with stdin closed, goes on without it)
        assert "[y/N]" not in result.stdout + result.stderr, f"snippet prompts:\n{block}\n{result.stdout[-2000:]}"
        for expected in re.findall(r"^print\(.*\)  # (.+)$", block, re.M):
            assert expected in result.stdout, (block, result.stdout)
    return blocks


@pytest.mark.slow
def test_card_snippets_run_verbatim_with_and_without_remote_code(tiny_model_dir, tmp_path):
    from conan_hf.model_card import generate_model_card

    conan = tmp_path / "conan-tiny"
    shutil.copytree(tiny_model_dir, conan)
    stock = _stock_llama_sentence_model(tiny_model_dir, tmp_path / "llama-tiny")
    for folder, remote_code in ((conan, True), (stock, False)):
        assert bool(json.loads((folder / "config.json").read_text()).get("auto_map")) == remote_code
        card = generate_model_card(folder)
        blocks = _run_card_snippets(card, tmp_path, folder.name, remote_code)
        assert len(blocks) == 3  # no Matryoshka record: no truncation snippet
        assert ("trust_remote_code=True" in card) == remote_code


def test_card_metadata_is_hub_ready_and_filled_from_real_results(tiny_model_dir, tmp_path):
    from conan_hf.eval import evaluate, sts_task
    from conan_hf.model_card import generate_model_card

    folder = tmp_path / "conan-tiny"
    shutil.copytree(tiny_model_dir, folder)
    sts_file = tmp_path / "sts.jsonl"
    _write_sts_jsonl(sts_file)

    def front_matter(card: str) -> dict:
        assert card.startswith("---\n")
        return yaml.safe_load(card.split("---\n")[1])

    # the main job's records: every stage on the demo corpus (stage 4 via the files it writes aside)
    demo_files = str(tmp_path / "runs" / "demo-data" / "sts.jsonl")
    records = [{"stage": "pretrain", "config": {"model": "tiny", "data": ["demo"]}, "summary": {}},
               {"stage": "supervised", "config": {"model": "runs/weak/final", "matryoshka": False,
                                                  "tasks": [{"name": "sts", "type": "sts",
                                                             "data": [{"path": demo_files}]}]}, "summary": {}}]
    meta = front_matter(generate_model_card(folder, run_info=records))
    assert meta["library_name"] == "sentence-transformers" and meta["license"] == "apache-2.0"
    assert {"sentence-transformers", "feature-extraction", "sentence-similarity"} <= set(meta["tags"])
    assert meta["language"] == ["en", "zh"]  # conan_hf.demo's languages
    assert "base_model" not in meta  # pre-trained from scratch
    assert "model-index" not in meta and "mteb" not in meta["tags"]  # no results given: none invented

    # stages 3-4 from a Hub model on the user's own data: base_model recorded, languages not guessed
    own = [{"stage": "weak", "config": {"model": "Qwen/Qwen2.5-0.5B", "data": ["pairs.jsonl"]}, "summary": {}}]
    meta = front_matter(generate_model_card(folder, run_info=own))
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and "language" not in meta
    meta = front_matter(generate_model_card(folder, run_info={"stages": own, "languages": ["de"]}))
    assert meta["language"] == ["de"]

    # the model-index carries the evaluation's own numbers
    report = evaluate(str(folder), [sts_task(sts_file)], instruction_template=None)
    meta = front_matter(generate_model_card(folder, run_info=records, results=report))
    assert "mteb" in meta["tags"]
    [entry] = meta["model-index"][0]["results"]
    assert entry["task"] == {"type": "STS"}
    assert entry["metrics"][0] == {"type": "cosine_spearman",
                                   "value": round(100 * report.main_scores["LocalSTS-sts"], 3)}
