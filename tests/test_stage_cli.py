"""The stage command lines as a new user meets them: --help lists every option, presets never override a value the
user set, a missing input says which command makes it, a finished stage says "already done", and an interrupted
one names the checkpoint to resume from."""

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
from pathlib import Path

import pytest
import yaml

from helpers import REPO, _env

STAGES = {"tokenizer": ("conan_hf.stages.tokenizer", "TokenizerConfig"),
          "pretrain": ("conan_hf.stages.pretrain", "PretrainConfig"),
          "sft": ("conan_hf.stages.sft", "SFTConfig"), "weak": ("conan_hf.stages.weak", "WeakConfig"),
          "supervised": ("conan_hf.stages.supervised", "SupervisedConfig")}


def _config_class(stage: str):
    import importlib

    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


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
        shipped = yaml.safe_load((REPO / "conan_hf" / "stages" / "configs" / f"{stage}.yaml")
                                 .read_text(encoding="utf-8"))
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


def test_user_values_win_over_the_preset_and_the_preset_shrinks_shipped_values(tmp_path):
    from conan_hf.stages.pretrain import PretrainConfig
    from conan_hf.training.config import load_config, parse_config

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


def test_missing_stage_inputs_say_how_to_make_them(tmp_path, monkeypatch):
    from conan_hf.training.checkpoints import StageInputError, check_stage_input

    cwd = tmp_path / "fresh"
    cwd.mkdir()
    # the README's one-stage commands in a fresh folder: one line each, exit code 2, no Hub lookup
    pretrain = subprocess.run([sys.executable, "-m", "conan_hf.stages.pretrain", "--preset", "tiny",
                               "--max_steps", "20"],
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
    from conan_hf.stages.tokenizer import TokenizerConfig, run
    from conan_hf.training.checkpoints import STAGE_RECORD
    from conan_hf.training.config import config_from_dict

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
