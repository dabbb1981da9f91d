"""build_sentence_transformer and the saved SentenceTransformer directory (remote code, prompts, MRL)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from conan_hf import ConanConfig, ConanForCausalLM, build_sentence_transformer
from conan_hf.sentence import ConanSentenceTransformer
from conan_hf.tokenizer import SPECIAL_TOKENS, demo_tokenizer, train_tokenizer

QUERY_PROMPT = "Instruct: Given a question, retrieve passages that answer it\nQuery:\n"


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("st")
    torch.manual_seed(0)
    model = build_sentence_transformer(ConanConfig.tiny(), prompts={"query": QUERY_PROMPT}, max_seq_length=64)
    model.save(str(path))
    return path


def test_saved_directory_loads_and_encodes_unit_vectors(saved_dir):
    model = SentenceTransformer(str(saved_dir), trust_remote_code=True)
    emb = model.encode(["hello", "你好"])
    assert emb.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert model[0].auto_model.config.attention_mode == "bidirectional"
    saved = json.loads((saved_dir / "config_sentence_transformers.json").read_text())
    assert saved["prompts"]["query"] == QUERY_PROMPT


def test_truncate_dim_returns_prefix_of_the_full_embedding(saved_dir):
    full = SentenceTransformer(str(saved_dir), trust_remote_code=True).encode(["a cat sleeps"],
                                                                              normalize_embeddings=False)
    short = SentenceTransformer(str(saved_dir), trust_remote_code=True, truncate_dim=32).encode(
        ["a cat sleeps"], normalize_embeddings=False)
    assert short.shape == (1, 32)
    np.testing.assert_allclose(short, full[:, :32], atol=1e-6)


def test_prompt_changes_embedding_and_prompt_tokens_are_excluded_from_mean(saved_dir):
    model = SentenceTransformer(str(saved_dir), trust_remote_code=True)
    text = "What do pandas eat?"
    plain = model.encode([text])
    prompted = model.encode([text], prompt_name="query")
    assert np.abs(plain - prompted).max() > 1e-3

    # Independent reference: run the backbone on prompt+text, average only the text's tokens, normalise.
    tokenizer = model.tokenizer
    backbone = model[0].auto_model.eval()
    prompt_len = len(tokenizer(QUERY_PROMPT, add_special_tokens=True)["input_ids"])
    ids = tokenizer(QUERY_PROMPT + text, return_tensors="pt")
    with torch.no_grad():
        states = backbone(**ids).last_hidden_state[0]
    pooled = states[prompt_len:].mean(0)
    reference = (pooled / pooled.norm()).numpy()
    np.testing.assert_allclose(prompted[0], reference, atol=1e-5)
    # Including the prompt would give something else.
    with_prompt = states.mean(0)
    assert np.abs((with_prompt / with_prompt.norm()).numpy() - prompted[0]).max() > 1e-3


def test_lasttoken_pooling_uses_the_final_real_token():
    torch.manual_seed(0)
    model = build_sentence_transformer(ConanConfig.tiny(), pooling="lasttoken", max_seq_length=32)
    texts = ["short", "a much longer sentence than the first"]
    emb = model.encode(texts, convert_to_tensor=True)
    backbone = model[0].auto_model.eval()
    for i, text in enumerate(texts):
        ids = model.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            last = backbone(**ids).last_hidden_state[0, -1]
        torch.testing.assert_close(emb[i], last / last.norm(), atol=1e-5, rtol=1e-4)


def test_build_from_causal_lm_instance_uses_its_backbone_weights():
    torch.manual_seed(0)
    lm = ConanForCausalLM(ConanConfig.tiny())
    st = build_sentence_transformer(lm, max_seq_length=16)
    torch.testing.assert_close(st[0].auto_model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_bad_input_gives_clear_errors(saved_dir):
    model = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=16)
    assert isinstance(model, ConanSentenceTransformer)
    with pytest.raises(ValueError, match="empty list"):
        model.encode([])
    with pytest.raises(TypeError, match="item 1 is int"):
        model.encode(["ok", 3])
    with pytest.raises(TypeError, match="expects a string or a list"):
        model.encode(42)
    # The plain sentence-transformers loader also refuses non-strings with a message naming the type.
    plain = SentenceTransformer(str(saved_dir), trust_remote_code=True)
    with pytest.raises(ValueError, match="NoneType"):
        plain.encode(["ok", None])
    with pytest.raises(ValueError, match="pooling must be"):
        build_sentence_transformer(ConanConfig.tiny(), pooling="max")
    with pytest.raises(ValueError, match="max_seq_length"):
        build_sentence_transformer(ConanConfig.tiny(), max_seq_length=0)
    with pytest.raises(TypeError, match="model_or_path must be"):
        build_sentence_transformer(12345)
    with pytest.raises(ValueError, match="vocab_size"):
        build_sentence_transformer(ConanConfig.tiny(vocab_size=300), tokenizer=demo_tokenizer())


def test_tokenizer_training_round_trips_multilingual_text(tmp_path):
    tok = train_tokenizer(["hello world", "你好，世界", "Grüße aus Köln"] * 30, vocab_size=400, show_progress=False)
    for text in ["hello world", "你好，世界", "Grüße aus Köln", "unseen text 🙂"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token == SPECIAL_TOKENS["pad_token"] and tok.eos_token == SPECIAL_TOKENS["eos_token"]
    assert len(tok) <= 400
    with pytest.raises(TypeError, match="item 1 is int"):
        train_tokenizer(["fine", 3], vocab_size=400, show_progress=False)


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, json
    sys.modules["conan_hf"] = None
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sys.argv[1], trust_remote_code=True)
    emb = model.encode(["hello", "你好"], prompt_name="query")
    print(json.dumps({"shape": list(emb.shape), "emb": emb.tolist()}))
    """
)


def test_saved_directory_works_in_a_process_without_conan_hf(saved_dir, tmp_path):
    script = tmp_path / "encode.py"
    script.write_text(SUBPROCESS_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(saved_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    here = SentenceTransformer(str(saved_dir), trust_remote_code=True).encode(["hello", "你好"], prompt_name="query")
    assert result["shape"] == [2, 128]
    np.testing.assert_allclose(np.array(result["emb"]), here, atol=1e-5)
