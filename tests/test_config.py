"""Stage configuration: precedence (defaults <- shipped YAML <- preset <- your YAML <- flags), presets never replacing
a key you set, help text from field metadata, flag spellings, and the main job's options."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conan_hf.training.config import StageConfig, default_config_path, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def _tiny(stage: str) -> dict:
    return yaml.safe_load(default_config_path(stage).read_text(encoding="utf-8"))["presets"]["tiny"]


def test_precedence_defaults_shipped_preset_user_yaml_flags(tmp_path):
    from conan_hf.stages.sft import SFTConfig

    tiny = _tiny("sft")
    defaults = SFTConfig()
    # defaults alone (no file): the dataclass
    assert load_config(SFTConfig) == defaults
    # the shipped file: only overrides, so without a preset it is the dataclass
    assert dataclasses.asdict(load_config(SFTConfig, default_config_path("sft"))) == dataclasses.asdict(defaults)
    # + preset: the preset's values, the rest the dataclass's
    cfg = load_config(SFTConfig, default_config_path("sft"), preset="tiny")
    assert (cfg.learning_rate, cfg.max_length, cfg.weight_decay) == (tiny["learning_rate"], tiny["max_length"],
                                                                      defaults.weight_decay)
    # + your YAML: its keys win over the preset
    mine = tmp_path / "mine.yaml"
    mine.write_text("max_length: 77\nseed: 3\n", encoding="utf-8")
    cfg = load_config(SFTConfig, mine, preset="tiny", stage="sft")
    assert (cfg.max_length, cfg.seed, cfg.learning_rate) == (77, 3, tiny["learning_rate"])
    # + flags: win over everything
    cfg = parse_config(SFTConfig, "sft", ["--config", str(mine), "--preset", "tiny", "--max_length", "55"])
    assert (cfg.max_length, cfg.seed) == (55, 3)


def test_a_user_value_equal_to_the_default_survives_the_preset(tmp_path):
    """A key in your YAML is yours even when it equals the shipped default: the preset does not replace it."""
    from conan_hf.stages.pretrain import PretrainConfig

    tiny = _tiny("pretrain")
    default = PretrainConfig().learning_rate
    assert tiny["learning_rate"] != default
    mine = tmp_path / "pretrain.yaml"  # same file name as the shipped one
    mine.write_text(f"learning_rate: {default}\nbf16: true\n", encoding="utf-8")
    cfg = parse_config(PretrainConfig, "pretrain", ["--config", str(mine), "--preset", "tiny"])
    assert (cfg.learning_rate, cfg.bf16) == (default, True)
    assert (cfg.model, cfg.seq_length) == (tiny["model"], tiny["seq_length"])  # the rest of the preset applies
    from conan_hf.stages.run_all import build_configs

    configs = build_configs(["pretrain"], str(tmp_path / "work"), str(tmp_path / "out"), config_dir=str(tmp_path))
    assert (configs["pretrain"].learning_rate, configs["pretrain"].bf16, configs["pretrain"].model) == (
        default, True, "tiny")


def test_shipped_yamls_hold_only_overrides_and_presets():
    """Every top-level key of a shipped YAML differs from its dataclass default (the defaults are defined once)."""
    from conan_hf.stages.run_all import STAGES, _config_class

    for stage in STAGES:
        name, module = _config_class(stage)
        defaults = dataclasses.asdict(getattr(module, name)())
        values = yaml.safe_load(default_config_path(stage).read_text(encoding="utf-8"))
        presets = values.pop("presets")
        assert "tiny" in presets, stage
        assert all(values[key] != defaults[key] for key in values), (stage, values)
        assert set(presets["tiny"]) <= set(defaults), stage


def test_help_text_comes_from_field_metadata(capsys, monkeypatch):
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.training.config import field_help

    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(SupervisedConfig, "supervised", ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    entries: list[str] = []  # one per option: its flag line and the indented help lines after it
    for line in out.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    for field in dataclasses.fields(SupervisedConfig):
        text = field.metadata["help"]
        assert text and field_help(field) == text, field.name
        line = next(entry for entry in entries if entry.startswith(f"--{field.name} "))
        assert text.split(" (")[0].split(";")[0][:40] in line, (field.name, line)
    # one documented spelling: the dashed aliases are accepted but not listed
    assert not [e for e in entries if "-" in e.split()[0][2:]] and "--max_steps MAX_STEPS" in out
    # a subclass's own default keeps the base field's meaning
    base = {f.name: f for f in dataclasses.fields(StageConfig)}
    own = {f.name: f for f in dataclasses.fields(SupervisedConfig)}
    assert own["output_dir"].metadata == base["output_dir"].metadata
    assert own["output_dir"].default != base["output_dir"].default


def test_eq6_thresholds_defined_by_the_dhnm_rule():
    import inspect

    from conan_hf.dhnm import dhnm_should_replace
    from conan_hf.stages.supervised import SupervisedConfig

    rule = inspect.signature(dhnm_should_replace).parameters
    config = SupervisedConfig()
    assert (config.dhnm_s0_min, config.dhnm_drop_ratio, config.dhnm_s_max) == (0.4, 1.2, 0.7) == tuple(
        rule[name].default for name in ("s0_min", "drop_ratio", "s_max"))


def test_stage_flags_accept_both_spellings():
    from conan_hf.stages.weak import WeakConfig

    underscores = parse_config(WeakConfig, "weak", ["--preset", "tiny", "--max_steps", "3",
                                                    "--per_device_train_batch_size", "4"])
    dashes = parse_config(WeakConfig, "weak", ["--preset", "tiny", "--max-steps", "3",
                                               "--per-device-train-batch-size", "4"])
    assert dataclasses.asdict(underscores) == dataclasses.asdict(dashes)
    assert (dashes.max_steps, dashes.per_device_train_batch_size) == (3, 4)


def _main_job_configs(monkeypatch, argv: list[str]) -> dict:
    """The configs the main job's command line builds (its pipeline stopped before any stage runs)."""
    from conan_hf.stages import run_all

    seen = {}

    def pipeline(stages, work_dir, output_dir, preset, config_dir, overrides, demo_eval=True):
        seen.update(run_all.build_configs(stages, work_dir, output_dir, preset, config_dir, overrides))
        seen["work_dir"], seen["output_dir"], seen["demo_eval"] = work_dir, output_dir, demo_eval
        return {"stages": {}, "evaluation": {}, "seconds": {}}

    monkeypatch.setattr(run_all, "run_pipeline", pipeline)
    run_all.main(argv)
    return seen


def test_main_job_accepts_both_spellings_and_resume(monkeypatch, tmp_path):
    dashed = _main_job_configs(monkeypatch, ["--work-dir", str(tmp_path / "w"), "--output-dir", str(tmp_path / "o"),
                                             "--max-steps", "5", "--no-eval", "--resume", "no"])
    underscored = _main_job_configs(monkeypatch, ["--work_dir", str(tmp_path / "w"), "--output_dir",
                                                  str(tmp_path / "o"), "--max_steps", "5", "--no_eval",
                                                  "--resume", "no"])
    for seen in (dashed, underscored):
        assert (seen["work_dir"], seen["output_dir"], seen["demo_eval"]) == (str(tmp_path / "w"), str(tmp_path / "o"),
                                                                            False)
        for stage in ("pretrain", "sft", "weak", "supervised"):
            assert (seen[stage].max_steps, seen[stage].resume) == (5, "no"), stage
    assert {s: dataclasses.asdict(c) for s, c in dashed.items() if s in ("pretrain", "supervised")} == {
        s: dataclasses.asdict(c) for s, c in underscored.items() if s in ("pretrain", "supervised")}


def test_main_job_command_line_accepts_resume_no():
    """``examples/finetune.py --resume no``, the option the stages' messages name, is accepted (shown in --help)."""
    result = subprocess.run([sys.executable, str(REPO / "examples" / "finetune.py"), "--resume", "no", "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--resume RESUME" in result.stdout and "--max_steps MAX_STEPS" in result.stdout
    assert "  --max-steps" not in result.stdout and "[--max-steps" not in result.stdout
    bad = subprocess.run([sys.executable, str(REPO / "examples" / "finetune.py"), "--resum", "x", "--bogus"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_training_arguments_kwargs_has_no_side_effects(monkeypatch):
    """Making the Trainer's arguments leaves accelerate's process state alone; the runner's runtime set-up is the
    step that configures it."""
    from accelerate import PartialState

    from conan_hf.stages.sft import SFTConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    from conan_hf.training import distributed

    monkeypatch.setattr(distributed, "_has_accelerator", lambda: False)
    before = dict(PartialState._shared_state)
    kwargs = SFTConfig().training_arguments_kwargs()
    assert kwargs["accelerator_config"] == {"use_configured_state": True}
    assert dict(PartialState._shared_state) == before


def test_main_job_names_its_own_options_for_a_missing_stage_input(tmp_path, capsys):
    """A stage input the main job did not make: the message names the main job's options (--stages, --set), not the
    stage's own --model."""
    from conan_hf.stages import run_all

    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--stages", "3", "--work_dir", str(tmp_path / "work"), "--no_eval", "--max_steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("finetune: error: "), err
    assert f"{tmp_path / 'work' / 'sft' / 'final'} not found" in err
    assert "--stages 2-3" in err and "--set weak.model=PATH" in err and "--model" not in err, err
