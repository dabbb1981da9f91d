"""Soft-mask attention inside models (Conan, Qwen2, Llama): eager, sdpa and flex against the naive reference,
alpha 0 causal and 1 bidirectional, padding, gradients, simulated NPU, packed documents.

References are computed naively: a "naive model" run feeds log M as a prepared 4D float mask to an unpatched eager
model (transformers passes 4D masks through as-is). Flex attention compiles per new shape on CPU, so every model test
uses the same (batch, length) and head layout (tests/soft_mask_helpers.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from soft_mask_helpers import (
    BATCH,
    IMPLS,
    KINDS,
    LENGTH,
    LOGGER,
    VOCAB,
    batch,
    build,
    close,
    naive_bias,
    naive_reference,
    plain,
    run,
)
from transformers.integrations import sdpa_attention

from conan_hf.modeling_conan import SOFT_FLEX_ATTENTION
from conan_hf.soft_mask import (
    set_soft_mask_alpha,
)

# ------------------------------------------------------------------------------------------------- model behaviour


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_is_causal_and_alpha_one_is_bidirectional(kind):
    for side in ("left", "right"):
        ids, mask = batch(side)
        causal, bidirectional = plain(kind, ids, mask, False), plain(kind, ids, mask, True)
        assert (causal - bidirectional)[mask.bool()].abs().max() > 1e-3  # the two ends really differ
        model = build(kind, "sdpa")
        with torch.no_grad():
            if kind != "conan":  # a patched model with no alpha set is causal
                close(run(model, ids, mask), causal, mask)
            for alpha, expected in ((0.0, causal), (1.0, bidirectional)):
                set_soft_mask_alpha(model, alpha)
                close(run(model, ids, mask), expected, mask)
            # Through the soft path itself (not a fast path): alpha = 0.999 makes every row of every
            # sequence (l <= 12) fully bidirectional, a vanishing alpha leaves it causal.
            set_soft_mask_alpha(model, 0.999)
            close(run(model, ids, mask), bidirectional, mask)
            set_soft_mask_alpha(model, 1e-12)
            close(run(model, ids, mask), causal, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_eager_sdpa_and_flex_agree_with_the_naive_reference(kind, caplog):
    models = {impl: build(kind, impl) for impl in IMPLS}
    for side in ("left", "right"):
        ids, mask = batch(side)
        causal = plain(kind, ids, mask, False)
        for alpha in (0.1, 0.5, 0.9):
            reference = naive_reference(kind, ids, mask, alpha)
            assert (reference - causal)[mask.bool()].abs().max() > 1e-3
            for model in models.values():
                set_soft_mask_alpha(model, alpha)
                with torch.no_grad(), caplog.at_level(logging.INFO, logger=LOGGER):
                    out = run(model, ids, mask)
                assert torch.isfinite(out).all()
                close(out, reference, mask)
    # The flex path ran the registered score_mod function, and said so.
    assert models["flex_attention"].config._attn_implementation == SOFT_FLEX_ATTENTION
    assert "flex_attention score_mod (no L x L tensor)" in caplog.text
    assert "sdpa with a dense log-M bias" in caplog.text


def test_no_nan_with_fully_padded_rows_forward_and_backward():
    ids, mask = batch("empty")
    for kind in ("conan", "qwen2"):
        for impl in IMPLS:
            model = build(kind, impl)
            set_soft_mask_alpha(model, 0.5)
            with torch.no_grad():
                out = run(model, ids, mask)
            assert torch.isfinite(out).all(), (kind, impl)
            close(out, naive_reference(kind, ids, mask, 0.5), mask)
        model = build(kind, "sdpa").train()
        set_soft_mask_alpha(model, 0.5)
        out = run(model, ids, mask)
        out.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gradients_flow_to_later_tokens_only_when_alpha_is_positive(impl):
    ids, mask = batch("left")
    model = build("qwen2", impl).train()
    embeds = model.get_input_embeddings()(ids).detach()
    grads = {}
    for alpha in (0.0, 0.5):
        set_soft_mask_alpha(model, alpha)
        x = embeds.clone().requires_grad_(True)
        out = model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        out[0, 0].sum().backward()  # the first token of an unpadded sequence
        grads[alpha] = x.grad[0, 1:].abs().sum().item()
        assert model.layers[0].self_attn.q_proj.weight.grad is not None
        model.zero_grad()
    assert grads[0.0] == 0.0  # causal: token 1 cannot see later tokens
    assert grads[0.5] > 1e-6  # soft: M_1j = min(0.5 * 12 / 1, 1) = 1, so it sees all of them


def test_npu_simulated_soft_values_survive(monkeypatch, caplog):
    ids, mask = batch("left")
    reference = naive_reference("conan", ids, mask, 0.5)
    causal = plain("conan", ids, mask, False)
    # What the hazard is: on NPU transformers' sdpa turns a float mask into a boolean one.
    torch.manual_seed(0)
    q, k, v = torch.randn(BATCH, 4, LENGTH, 32), torch.randn(BATCH, 1, LENGTH, 32), torch.randn(BATCH, 1, LENGTH, 32)
    bias = naive_bias(mask, 0.5)
    module = build("conan").layers[0].self_attn
    stock_gpu, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, bias)
    monkeypatch.setattr(sdpa_attention, "_is_torch_npu_available", True)
    stock_npu, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, bias)
    assert (stock_npu - stock_gpu)[mask.bool()].abs().max() > 1e-3

    model = build("conan", "sdpa")
    set_soft_mask_alpha(model, 0.5)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger=LOGGER):
        out = run(model, ids, mask)
    close(out, reference, mask)
    assert (out - causal)[mask.bool()].abs().max() > 1e-3
    assert "eager attention with a dense log-M bias" in caplog.text
    # Back to a fast path: the model's own sdpa again.
    set_soft_mask_alpha(model, 1.0)
    with torch.no_grad():
        run(model, ids, mask)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------ packed rows (documents)

# Three rows of LENGTH tokens: two packed documents; three documents and right padding; one plain sequence.
PACKED_DOCUMENTS = [[5, 7], [3, 4, 2], [12]]
PACKED_PADDING = [0, 3, 0]


def packed_batch():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    position_ids = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    for row, (documents, padding) in enumerate(zip(PACKED_DOCUMENTS, PACKED_PADDING)):
        position_ids[row, : LENGTH - padding] = torch.cat([torch.arange(n) for n in documents])
        mask[row, LENGTH - padding:] = 0
    return ids, mask, position_ids


def document_spans():
    for row, documents in enumerate(PACKED_DOCUMENTS):
        start = 0
        for n in documents:
            yield row, start, n
            start += n


@pytest.mark.parametrize("kind", ["conan", "qwen2"])
def test_packed_documents_each_equal_the_document_alone(kind):
    """Position ids restarting inside a row (no cu_seq_lens) = separate documents, each with its own eq.4 mask."""
    from conan_hf.soft_mask import set_soft_mask_length

    ids, mask, position_ids = packed_batch()
    for impl in ("sdpa", "eager"):
        model = build(kind, impl)
        for option, alpha in (("sequence", 0.5), ("sequence", 0.0), ("sequence", 1.0), (6, 0.3)):
            set_soft_mask_alpha(model, alpha)
            set_soft_mask_length(model, option)
            with torch.no_grad():
                packed = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
                for row, start, n in document_spans():
                    alone = run(model, ids[row: row + 1, start: start + n], torch.ones(1, n, dtype=torch.long))
                    torch.testing.assert_close(packed[row, start: start + n], alone[0], atol=1e-5, rtol=1e-5,
                                               msg=lambda m, where=f"{impl} {option} alpha={alpha} row {row}":
                                               f"{where}: {m}")
            assert torch.isfinite(packed).all()


@pytest.mark.slow  # flex compiles its score_mod with the document test on CPU (~30 s)
def test_packed_documents_through_flex_match_the_dense_path():
    ids, mask, position_ids = packed_batch()
    references = {}
    for impl in ("sdpa", "flex_attention"):
        model = build("conan", impl)
        set_soft_mask_alpha(model, 0.5)
        with torch.no_grad():
            references[impl] = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    close(references["flex_attention"], references["sdpa"], mask)


def test_packed_documents_are_refused_by_flash_attention():
    ids, mask, position_ids = packed_batch()
    model = build("conan", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    for alpha in (0.0, 0.5, 1.0):
        set_soft_mask_alpha(model, alpha)
        with pytest.raises(ValueError, match="packed rows"):
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
