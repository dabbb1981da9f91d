"""conan_hf.encode: FastEncoder returns what SentenceTransformer.encode returns (order, prompts, MRL, quantisation,
truncation), with its own batching. Speed is measured in benchmarks/encode.py, not here."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer, quantize_embeddings

from conan_hf.encode import (
    FastEncoder,
    TruncationWarning,
    cpu_has_native_bf16,
    encode,
    plan_batches,
)
from conan_hf.eval.tasks import read_sts

QUERY_PROMPT = "Instruct: Given a question, retrieve passages that answer it\nQuery:\n"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    model.prompts = {"query": QUERY_PROMPT, "document": ""}
    return model


@pytest.fixture(scope="module")
def texts(shared_data_dir):
    en = read_sts(shared_data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv", limit=150)
    zh = read_sts(shared_data_dir / "sts/stsb-multi-mt/stsb-zh-dev.csv", limit=50)
    return en.sentence1 + en.sentence2 + zh.sentence1


def test_matches_sentence_transformer_encode_in_input_order(model, texts):
    reference = model.encode(texts)
    ours = FastEncoder(model, dtype=torch.float32).encode(texts)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    # a single string gives a vector, like SentenceTransformer.encode
    np.testing.assert_allclose(FastEncoder(model, dtype=torch.float32).encode(texts[3]), reference[3], atol=2e-5)


@pytest.mark.filterwarnings("ignore::conan_hf.encode.TruncationWarning")  # the long query prompt exceeds 64 tokens
def test_prompts_follow_the_model(model, texts):
    encoder = FastEncoder(model, dtype=torch.float32)
    np.testing.assert_allclose(encoder.encode_query(texts[:40]), model.encode_query(texts[:40]), atol=2e-5)
    np.testing.assert_allclose(encoder.encode_document(texts[:40]), model.encode_document(texts[:40]), atol=2e-5)
    np.testing.assert_allclose(encoder.encode(texts[:40], prompt="Retrieve:\n"),
                               model.encode(texts[:40], prompt="Retrieve:\n"), atol=2e-5)
    # A space-ended prompt merges into the texts' first words under byte-level BPE (conan_hf.sentence): refused.
    with pytest.raises(ValueError, match="'Retrieve: ' does not end on a token boundary"):
        encoder.encode(texts[:40], prompt="Retrieve: ")
    with pytest.raises(ValueError, match="'nope' is not one of the model's prompts"):
        encoder.encode(texts[:2], prompt_name="nope")


def test_matryoshka_truncation_renormalises(model, texts):
    full = model.encode(texts[:60], normalize_embeddings=False)
    short = FastEncoder(model, dtype=torch.float32).encode(texts[:60], dim=32)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    assert short.shape == (60, 32)
    np.testing.assert_allclose(short, expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="dim must be in 1..128"):
        FastEncoder(model, dtype=torch.float32).encode(texts[:2], dim=129)


def test_quantised_output_equals_quantize_embeddings(model, texts):
    reference = model.encode(texts[:80])
    encoder = FastEncoder(model, dtype=torch.float32)
    ubinary = encoder.encode(texts[:80], precision="ubinary")
    assert ubinary.dtype == np.uint8 and ubinary.shape == (80, 128 // 8)
    np.testing.assert_array_equal(ubinary, quantize_embeddings(reference, precision="ubinary"))
    int8 = encoder.encode(texts[:80], precision="int8", calibration_embeddings=reference)
    expected = quantize_embeddings(reference, precision="int8", calibration_embeddings=reference)
    assert int8.dtype == np.int8
    assert np.abs(int8.astype(int) - expected.astype(int)).max() <= 1  # bucket edges may differ by float rounding
    assert (int8 == expected).mean() > 0.99


def test_truncation_policy_warns_once_with_the_count(model, texts):
    sample = texts[:30]
    old = model.max_seq_length
    model.max_seq_length = 12
    try:
        lengths = [len(ids) for ids in model.tokenizer(sample)["input_ids"]]
        too_long = sum(length > 12 for length in lengths)
        assert 0 < too_long < len(sample)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = FastEncoder(model, dtype=torch.float32).encode(sample)
        messages = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
        assert messages == [(f"{too_long} of {len(sample)} inputs are longer than max_seq_length=12 tokens "
                            f"(longest: {max(lengths)}); each is truncated to its first 12 tokens. Raise "
                            "`model.max_seq_length` or split long texts to embed all of them.")]
        np.testing.assert_allclose(ours, model.encode(sample), atol=2e-5)  # the same cut SentenceTransformer makes
        with pytest.raises(ValueError, match=f"{too_long} of {len(sample)} inputs are longer"):
            FastEncoder(model, dtype=torch.float32, truncation="error").encode(sample)
        with warnings.catch_warnings():
            warnings.simplefilter("error", TruncationWarning)
            FastEncoder(model, dtype=torch.float32, truncation="ignore").encode(sample)
    finally:
        model.max_seq_length = old


def test_plan_batches_respects_budget_and_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, size=500).tolist()
    batches = plan_batches(lengths, token_budget=600, max_batch_size=64, padding_tolerance=0.1)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(500))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 600
        assert len(batch) <= 64
        assert sum(longest - lengths[i] for i in batch) <= 0.1 * len(batch) * longest
    unpadded = plan_batches(lengths, token_budget=600, unpadded=True)
    assert all(len(b) == 1 or sum(lengths[i] for i in b) <= 600 for b in unpadded)
    assert len(unpadded) < len(batches)  # no padding constraint: fewer, fuller batches


def test_inputs_are_checked_and_helpers_work(model, texts):
    encoder = FastEncoder(model, dtype=torch.float32)
    assert encoder.encode([]).shape == (0, 128)
    with pytest.raises(TypeError, match="item 1 is int"):
        encoder.encode(["ok", 3])
    tensor = encode(model, texts[:5], dim=16, convert_to_tensor=True, token_budget=64, dtype="float32")
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (5, 16)
    assert encoder.unpadded is False  # no flash attention on CPU
    assert next(model.parameters()).dtype == torch.float32


def test_auto_dtype_on_cpu_is_bf16_only_with_native_support(model, texts):
    own = copy.deepcopy(model)  # FastEncoder casts in place
    encoder = FastEncoder(own)  # dtype="auto"
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert next(own.parameters()).dtype == expected
    reference = model.encode(texts[:100])
    ours = encoder.encode(texts[:100])
    assert ours.dtype == np.float32
    assert np.sum(ours * reference, axis=1).min() > 0.999  # bf16 rounding keeps the direction


def test_empty_strings_encode_as_sentence_transformers_does(model):
    """An empty string has no token with this tokenizer (no special tokens): SentenceTransformer.encode embeds it as an
    all-padding row of a batch (the zero vector under mean pooling) and crashes on a batch of empty strings alone;
    FastEncoder used to crash whenever one formed its own batch."""
    assert model.tokenizer("")["input_ids"] == []
    encoder = FastEncoder(model, dtype="float32")
    texts = ["ok", "", "a somewhat longer sentence", ""]
    expected = model.encode(texts, convert_to_tensor=True)  # one batch: the empty rows are padding only
    torch.testing.assert_close(encoder.encode(texts, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(expected[1], torch.zeros_like(expected[1]))
    alone = encoder.encode(["", ""], convert_to_tensor=True)
    torch.testing.assert_close(alone, expected[[1, 3]], atol=1e-6, rtol=0)
    assert encoder.encode("", dim=16).shape == (16,)
