"""The finished embedder exported with stock transformers classes (conan_hf.export): it loads with plain
`SentenceTransformer(path)` / `AutoModel.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)` in a process
where conan_hf cannot be imported, bidirectional, with the embeddings it had in training."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conan_hf import ConanConfig, build_sentence_transformer
from conan_hf.export import export_embedder

QUERY_PROMPT = "Instruct: Given a question, retrieve passages that answer it\nQuery:\n"
# Mixed lengths, so every batch below is padded.
TEXTS = ["hi", "What do pandas eat? Giant pandas eat mostly bamboo.", "大熊猫主要吃竹子。", "a b c d e f g h i j k"]


def _tiny_llama_config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, **kwargs)


def test_transformers_reads_is_causal_false_from_config_json(tmp_path):
    """The mechanism the export relies on (transformers 5.24): a stock LlamaConfig saved with "is_causal": false
    loads as a bidirectional LlamaModel, the same as calling the causal model with is_causal=False."""
    from transformers import AutoModel, LlamaModel

    torch.manual_seed(0)
    causal = LlamaModel(_tiny_llama_config()).eval()
    causal.config.is_causal = False
    causal.save_pretrained(tmp_path)
    causal.config.is_causal = True
    assert json.loads((tmp_path / "config.json").read_text())["is_causal"] is False
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaModel and loaded.config.is_causal is False
    ids, changed_end = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 9]])
    with torch.no_grad():
        states = loaded(input_ids=ids).last_hidden_state
        torch.testing.assert_close(states, causal(input_ids=ids, is_causal=False).last_hidden_state, atol=1e-6, rtol=0)
        assert (states[0, 0] - loaded(input_ids=changed_end).last_hidden_state[0, 0]).abs().max() > 1e-3
        causal_states = causal(input_ids=ids).last_hidden_state
        assert (causal_states[0, 0] - causal(input_ids=changed_end).last_hidden_state[0, 0]).abs().max() == 0
        assert (states - causal_states).abs().max() > 1e-3


LOAD_WITHOUT_CONAN = textwrap.dedent(
    """
    import json, sys
    sys.modules["conan_hf"] = None  # `import conan_hf` fails: only stock classes can be used
    try:
        import conan_hf  # noqa: F401
        raise SystemExit("conan_hf was importable")
    except ImportError:
        pass
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    st = SentenceTransformer(path)                      # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path)     # stdin is closed: a y/N prompt would fail here
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        # Bidirectional: the first token's state depends on the last token.
        a = model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state[0, 0]
        b = model(input_ids=torch.tensor([[5, 6, 7, 9]])).last_hidden_state[0, 0]
        # Mean pooling by hand over AutoModel's states of a right-padded batch (the tokenizer's saved side).
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        manual = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.save({
        "plain": st.encode(texts, convert_to_tensor=True),
        "query": st.encode(texts, prompt_name="query", convert_to_tensor=True),
        "one_by_one": torch.stack([st.encode(t, convert_to_tensor=True) for t in texts]),
        "manual": manual,
        "first_token_change": (a - b).abs().max().item(),
        "class": type(model).__module__ + "." + type(model).__name__,
        "padding_side": tokenizer.padding_side,
        "modules": sorted(m for m, module in sys.modules.items()
                          if module is not None and m.startswith(("conan_hf", "transformers_modules"))),
    }, out)
    """
)


def _load_in_clean_process(tmp_path: Path, model_dir: Path) -> dict:
    script = tmp_path / "load_without_conan.py"
    script.write_text(LOAD_WITHOUT_CONAN)
    out = tmp_path / "loaded.pt"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(TEXTS), str(out)], cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    return torch.load(out)


def test_export_loads_without_conan_hf_and_reproduces_training_embeddings(tmp_path):
    torch.manual_seed(0)
    trained = build_sentence_transformer(ConanConfig.tiny(), prompts={"query": QUERY_PROMPT}, max_seq_length=64)
    # ConanModel restarts RoPE positions at each sequence's first real token, so training may pad on the left; the
    # export pads on the right, where stock Llama's positions are the same.
    trained.tokenizer.padding_side = "left"
    with torch.no_grad():
        expected = {"plain": trained.encode(TEXTS, convert_to_tensor=True),
                    "query": trained.encode(TEXTS, prompt_name="query", convert_to_tensor=True)}
    result = export_embedder(trained, tmp_path / "conan-v2")
    assert (result.backbone, result.model_type, result.is_causal) == ("LlamaModel", "llama", False)
    assert result.max_abs_difference <= 1e-5
    # The trained model is left as it was.
    assert type(trained[0].auto_model).__name__ == "ConanModel" and trained.tokenizer.padding_side == "left"

    folder = tmp_path / "conan-v2"
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["is_causal"]) == ("llama", ["LlamaModel"], False)
    assert "auto_map" not in config and not [k for k in config if k.startswith(("attention_mode", "soft_mask"))]
    assert not list(folder.glob("*.py"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "right" and "auto_map" not in tokenizer_config

    loaded = _load_in_clean_process(tmp_path, folder)
    assert loaded["class"] == "transformers.models.llama.modeling_llama.LlamaModel"
    assert loaded["modules"] == [] and loaded["padding_side"] == "right"
    assert loaded["first_token_change"] > 1e-4  # bidirectional
    for name in ("plain", "query"):
        torch.testing.assert_close(loaded[name], expected[name], atol=1e-5, rtol=0)
    assert (expected["query"] - expected["plain"]).abs().max() > 1e-3  # the prompt is really applied
    torch.testing.assert_close(loaded["one_by_one"], expected["plain"], atol=1e-5, rtol=0)  # unpadded == padded
    torch.testing.assert_close(loaded["manual"], expected["plain"], atol=1e-5, rtol=0)


def test_causal_conan_embedder_exports_causal_with_last_token_pooling(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    torch.manual_seed(0)
    trained = build_sentence_transformer(ConanConfig.tiny(), pooling="lasttoken", attention_mode="causal",
                                         max_seq_length=64)
    expected = trained.encode(TEXTS, convert_to_tensor=True)
    result = export_embedder(trained, tmp_path / "out")
    assert (result.model_type, result.is_causal) == ("llama", True)
    loaded = SentenceTransformer(str(tmp_path / "out"))
    torch.testing.assert_close(loaded.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=0)
    # Reference: the last real token's state of each text, run alone through the stock causal model.
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        for text, embedding in zip(TEXTS, expected):
            ids = loaded.tokenizer(text, return_tensors="pt")
            last = model(**ids).last_hidden_state[0, -1]
            torch.testing.assert_close(embedding, torch.nn.functional.normalize(last, dim=-1), atol=1e-5, rtol=0)


def test_export_refuses_soft_mask_and_unmerged_lora_and_unknown_format(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    soft = build_sentence_transformer(ConanConfig.tiny(), attention_mode="soft", max_seq_length=32)
    with pytest.raises(ValueError, match=r"soft attention \(alpha=0.0\).* Switch it to 'bidirectional'"):
        export_embedder(soft, tmp_path / "soft")
    with pytest.raises(ValueError, match="export_format must be one of"):
        export_embedder(soft, tmp_path / "x", export_format="onnx")
    adapted = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=32)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), adapted[0].auto_model)
    with pytest.raises(ValueError, match="LoRA adapters; merge them"):
        export_embedder(adapted, tmp_path / "lora")


def test_remote_code_format_keeps_conan_code(tmp_path):
    torch.manual_seed(0)
    model = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=32)
    result = export_embedder(model, tmp_path / "rc", export_format="remote_code")
    assert result.model_type == "conan" and result.max_abs_difference is None
    assert {"modeling_conan.py", "configuration_conan.py"} <= {p.name for p in (tmp_path / "rc").iterdir()}
    assert json.loads((tmp_path / "rc" / "config.json").read_text())["auto_map"]
