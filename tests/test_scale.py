"""Issue 11 (scale) pieces: batched SFT preprocessing and FastEncoder's memory-mapped output.

The DHNM state format and its per-step update are tested in tests/test_dhnm_state.py and tests/test_dhnm_pool.py; the
figures at 100k-10M examples are measured by benchmarks/scale.py, not here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

IGNORE = -100


# ---- SFT preprocessing -----------------------------------------------------------------------------------------------
def naive_sft_example(tokenizer, instruction, input, output, max_length):
    """The per-row construction as stage 2 did it before batching (markers looked up in the vocabulary per row)."""
    vocab = tokenizer.get_vocab()
    instruction_marker = "<|instruction|>" if "<|instruction|>" in vocab else "Instruction: "
    input_marker = "<|input|>" if "<|input|>" in vocab else "\nInput: "
    response_marker = "<|response|>" if "<|response|>" in vocab else "\nResponse: "
    prompt = f"{tokenizer.bos_token or ''}{instruction_marker}{instruction}{input_marker}{input}{response_marker}"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    return ids, ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]


ROWS = [
    ("Translate into Chinese.", "Good morning", "早上好"),
    ("Summarise the text.", "", "A cat sat on a mat, then it slept."),
    ("Answer the question", "What is 2 + 2?", "4"),
    ("写一首诗", "关于秋天", "秋风起兮白云飞，草木黄落兮雁南归。"),
    ("Count on", "0", " ".join(str(j) for j in range(1, 100))),  # cut by max_length inside the response
    ("Count", " ".join(str(j) for j in range(100, 200)), "200"),  # cut inside the prompt: no response token
    ("Empty output", "input", ""),
]


@pytest.fixture(scope="module")
def trained_tokenizer():
    """A stage-0 byte-level BPE tokenizer (it has the <|instruction|>/<|input|>/<|response|> special tokens)."""
    from conan_hf.tokenizer import train_tokenizer

    corpus = [" ".join(row) for row in ROWS] * 20
    return train_tokenizer(corpus, vocab_size=600, show_progress=False)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A tokenizer without the SFT special tokens: the plain-text markers are used."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(byte_fallback=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import trainers

    raw.train_from_iterator([" ".join(row) for row in ROWS] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def truncating_tokenizer(trained_tokenizer):
    """The stage-0 tokenizer with truncation configured on its Rust backend (as a saved tokenizer.json may have it):
    the batched path must not apply it (``tokenizer(...)`` without ``truncation=True`` does not)."""
    import copy

    tokenizer = copy.deepcopy(trained_tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(8)
    return tokenizer


@pytest.mark.parametrize("which", ["trained_tokenizer", "plain_tokenizer", "truncating_tokenizer"])
@pytest.mark.parametrize("batch_size", [1, 3, 1024])
def test_batched_sft_preprocessing_equals_per_row(request, which, batch_size):
    from conan_hf.stages.sft import build_sft_example, build_sft_examples, sft_markers

    tokenizer = request.getfixturevalue(which)
    specials = which != "plain_tokenizer"
    assert sft_markers(tokenizer) == (("<|instruction|>", "<|input|>", "<|response|>") if specials else
                                      ("Instruction: ", "\nInput: ", "\nResponse: "))
    max_length = 48
    columns = build_sft_examples(tokenizer, [r[0] for r in ROWS], [r[1] for r in ROWS], [r[2] for r in ROWS],
                                 max_length, batch_size=batch_size)
    assert len(columns["input_ids"]) == len(ROWS)
    for i, row in enumerate(ROWS):
        ids, labels = naive_sft_example(tokenizer, *row, max_length)
        assert columns["input_ids"][i] == ids
        assert columns["labels"][i] == labels
        assert columns["attention_mask"][i] == [1] * len(ids)
        single = build_sft_example(tokenizer, *row, max_length)
        assert (single["input_ids"], single["labels"]) == (ids, labels)
    # The cases the rows were written for really occur: a truncated response and a row with no response token.
    assert len(columns["input_ids"][4]) == max_length and columns["labels"][4][-1] != IGNORE
    assert all(label == IGNORE for label in columns["labels"][5])


def test_batched_sft_preprocessing_checks_column_lengths(trained_tokenizer):
    from conan_hf.stages.sft import build_sft_examples

    with pytest.raises(ValueError, match="2 instructions, 1 inputs and 2 outputs"):
        build_sft_examples(trained_tokenizer, ["a", "b"], [""], ["x", "y"], 16)


# ---- FastEncoder output_path -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")


ENCODE_TEXTS = [f"text number {i} " + "word " * (i % 13) for i in range(57)] + ["", "一只猫在睡觉"]


@pytest.mark.parametrize("dim", [None, 16])
def test_encode_to_memmap_equals_in_memory(st_model, tmp_path, dim):
    from conan_hf.encode import FastEncoder

    encoder = FastEncoder(st_model, dtype="float32", token_budget=96, max_batch_size=8)
    expected = encoder.encode(ENCODE_TEXTS, dim=dim)
    path = tmp_path / "embeddings.npy"
    written = encoder.encode(ENCODE_TEXTS, dim=dim, output_path=path)
    assert isinstance(written, np.memmap) and not written.flags.writeable
    assert written.shape == expected.shape and written.dtype == np.float32
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(written[:-2], axis=1), 1.0, atol=1e-5)  # normalised in the file
    np.testing.assert_allclose(np.load(path), expected, rtol=0, atol=1e-6)  # a plain .npy file
    unnormalised = encoder.encode(ENCODE_TEXTS, dim=dim, normalize=False, output_path=tmp_path / "raw.npy")
    np.testing.assert_allclose(unnormalised, encoder.encode(ENCODE_TEXTS, dim=dim, normalize=False), rtol=0,
                               atol=1e-6)


def test_encode_to_memmap_rejects_quantised_output(st_model, tmp_path):
    from conan_hf.encode import FastEncoder

    encoder = FastEncoder(st_model, dtype="float32")
    with pytest.raises(ValueError, match="precision='int8'"):
        encoder.encode(["a"], precision="int8", output_path=tmp_path / "e.npy")
    empty = encoder.encode([], output_path=tmp_path / "empty.npy")
    assert empty.shape == (0, st_model.get_embedding_dimension())
    assert np.load(tmp_path / "empty.npy").shape == empty.shape
    assert torch.is_tensor(encoder.encode(["a"], convert_to_tensor=True))
