"""Prompts are checked wherever they enter: `encode(prompt=...)`, `prompt_name`, `encode_query` / `encode_document`,
the training collator, `FastEncoder` (also over a plain `SentenceTransformer`), and saved prompts at build and export.
A prompt after which sentence-transformers would not pool exactly the text's tokens is a one-line error naming the
prompt and the fix; a prompt on a token boundary pools exactly the text's tokens (checked against a hand-pooled
reference), also for texts that start with whitespace. Vocabularies that merge whitespace runs (GPT-2-style ``ĊĠ``,
Qwen2-style ``:ĊĊ``) make such texts join the prompt: they are refused with the fix (strip the whitespace)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

from conan_hf import ConanConfig, build_sentence_transformer
from conan_hf.encode import FastEncoder
from conan_hf.export import export_embedder
from conan_hf.sentence import (
    LEADING_WHITESPACE_PROBES,
    check_prompt_boundary,
    check_saved_prompts,
    format_query_prompt,
)
from tests.test_prompt_boundary import _reference

GOOD = format_query_prompt("x")
BAD = "Instruct: x\nQuery: "  # ends in a space: byte-level BPE merges it into the text's first word ("Ġpandas")
TEXTS = ["pandas", "the", "3", "Paris is big", "  x", "\tx", "\nx", "大熊猫吃竹子。"]


@pytest.fixture(scope="module")
def conan():
    """A byte-level-BPE Conan model (the demo tokenizer), mean pooling without the prompt."""
    torch.manual_seed(0)
    return build_sentence_transformer(ConanConfig.tiny(), prompts={"query": GOOD}, max_seq_length=64).eval()


@pytest.fixture(scope="module")
def plain(conan, tmp_path_factory):
    """The same model saved and loaded as a plain SentenceTransformer (no check of its own)."""
    path = tmp_path_factory.mktemp("plain")
    conan.save(str(path))
    return SentenceTransformer(str(path), trust_remote_code=True, device="cpu")


def _whitespace_tokenizer():
    """A byte-level BPE trained by the project on text with indentation and blank lines, so it merges line breaks
    with spaces (ĊĠ) and with each other (ĊĊ)."""
    from conan_hf.demo import demo_texts
    from conan_hf.tokenizer import train_tokenizer

    indented = ["def f(x):\n    if x:\n        return 1\n  y = 2\n\n"] * 200
    return train_tokenizer(list(demo_texts()) + indented, vocab_size=4096, show_progress=False)


def _as_qwen2(tokenizer):
    """The same vocabulary and merges behind Qwen2's pre-tokenizer (which keeps line breaks with the punctuation
    before them)."""
    from transformers import Qwen2Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return Qwen2Tokenizer(vocab=state["vocab"], merges=merges)


def _one_line_error(call, *fragments: str) -> str:
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_every_entry_point_refuses_a_prompt_that_merges_into_the_text(conan, plain):
    # What the plain path does (no check there): the one-word text pools nothing, a zero vector.
    assert np.linalg.norm(plain.encode(["pandas"], prompt=BAD)) == 0
    fix = "end the prompt with a line break"
    _one_line_error(lambda: conan.encode(["pandas"], prompt=BAD), repr(BAD), "'pandas'", fix)
    conan.prompts.update(bad=BAD)
    try:
        _one_line_error(lambda: conan.encode(["the", "Paris"], prompt_name="bad"), "prompt 'bad'", fix)
        for task in ("query", "document"):
            saved = conan.prompts.get(task)
            conan.prompts[task] = BAD
            try:
                method = conan.encode_query if task == "query" else conan.encode_document
                _one_line_error(lambda method=method: method(["3"]), repr(BAD), fix)
            finally:
                conan.prompts.pop(task) if saved is None else conan.prompts.update({task: saved})
    finally:
        del conan.prompts["bad"]
    collator = SentenceTransformerDataCollator(preprocess_fn=conan.preprocess, prompts={"anchor": BAD})
    _one_line_error(lambda: collator([{"anchor": "pandas", "positive": "bamboo"}]), repr(BAD), fix)
    for model in (conan, plain):  # FastEncoder: through the Conan model's own check, and its own for a plain one
        encoder = FastEncoder(model, dtype="float32")
        _one_line_error(lambda encoder=encoder: encoder.encode(["a", "pandas"], prompt=BAD), repr(BAD), fix)
    plain.prompts["query"] = BAD
    try:
        _one_line_error(lambda: FastEncoder(plain, dtype="float32").encode_query(["pandas"]), "prompt 'query'", fix)
    finally:
        plain.prompts["query"] = GOOD
    # A prompt that fills max_seq_length leaves nothing to pool.
    _one_line_error(lambda: conan.encode(["x"], prompt="Instruct: " + "pandas " * 80 + "\n"), "max_seq_length=64")


def test_a_prompt_on_a_token_boundary_pools_exactly_the_texts_tokens(conan, plain):
    # The demo vocabulary has no whitespace merges, so texts starting with spaces, a tab or a line break are fine.
    check_prompt_boundary(conan.tokenizer, GOOD, LEADING_WHITESPACE_PROBES)
    expected = np.stack([_reference(conan, GOOD, text) for text in TEXTS])
    for got in (conan.encode(TEXTS, prompt_name="query", batch_size=len(TEXTS)),
                conan.encode_query(TEXTS),
                FastEncoder(plain, dtype="float32").encode(TEXTS, prompt=GOOD),
                FastEncoder(conan, dtype="float32").encode_query(TEXTS)):
        np.testing.assert_allclose(got, expected, atol=2e-5)
    # The empty text pools nothing after the prompt, as without one (the zero vector), and is not refused.
    assert np.linalg.norm(conan.encode([""], prompt_name="query")) == 0


def test_leading_whitespace_that_joins_the_prompt_is_refused(caplog):
    tokenizer = _whitespace_tokenizer()
    assert {"ĊĠ", "ĊĊ"} <= set(tokenizer.get_vocab())
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="conan_hf.sentence"):
        model = build_sentence_transformer(ConanConfig.tiny(), tokenizer=tokenizer, prompts={"query": GOOD},
                                           max_seq_length=64).eval()
    assert any("prompt 'query'" in r.message and "'  '" in r.message and "strip" in r.message
               for r in caplog.records), caplog.text
    strip = "strip the leading whitespace of the texts"
    message = _one_line_error(lambda: model.encode_query(["fine", "  x"]), "'  x'", strip)
    assert "end the prompt" not in message  # the prompt already ends with a line break
    # Texts without leading whitespace (and those this vocabulary does not join) still pool exactly their tokens.
    for text in ("pandas", "\tx", "\nx"):
        np.testing.assert_allclose(model.encode_query([text])[0], _reference(model, GOOD, text), atol=2e-5)
    # Qwen2's pre-tokenizer keeps line breaks with the punctuation before them (":\n\n"): there "\nx" joins.
    qwen = _as_qwen2(tokenizer)
    _one_line_error(lambda: check_prompt_boundary(qwen, GOOD, ["ok", "\nx"]), "'\\nx'", strip)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conan_hf.sentence"):
        check_saved_prompts(qwen, {"query": GOOD})
    assert "'\\n'" in caplog.text


def test_saved_prompts_are_checked_at_export(conan, tmp_path):
    conan.prompts["bad"] = BAD
    try:
        _one_line_error(lambda: export_embedder(conan, tmp_path / "out"), "prompt 'bad'", "line break")
    finally:
        del conan.prompts["bad"]
    assert not (tmp_path / "out").exists()
    # A model that pools its prompt is not held to the boundary.
    torch.manual_seed(0)
    last = build_sentence_transformer(ConanConfig.tiny(), pooling="lasttoken", attention_mode="causal",
                                      prompts={"query": BAD}, max_seq_length=32)
    assert export_embedder(last, tmp_path / "last").is_causal is True
