"""Soft-mask attention (paper §3.2, eq.4; App. C schedules): the matrix, the backends, stock decoders, the callback.

References are computed naively in the tests: M from the formula with Python loops, and a "naive model" run that
feeds log M as a prepared 4D float mask to an unpatched eager model (transformers passes 4D masks through as-is).
Flex attention compiles per new shape on CPU, so every model test uses the same (batch, length) and head layout.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model
from transformers.integrations import sdpa_attention

from conan_hf import ConanConfig, ConanForCausalLM, ConanModel
from conan_hf.modeling_conan import SOFT_FLEX_ATTENTION, padding_aware_position_ids
from conan_hf.soft_mask import (
    SOFT_MASK_SCHEDULES,
    SoftMaskInputs,
    apply_soft_mask,
    get_soft_mask_alpha,
    plot_soft_mask,
    remove_soft_mask,
    resolve_soft_mask_backend,
    set_soft_mask_alpha,
    soft_mask_alpha,
    soft_mask_matrix,
)

BATCH, LENGTH, VOCAB = 3, 12, 512
# One head layout for every model kind (4 query heads, 1 key/value head, head_dim 32), so flex compiles once.
STOCK = dict(hidden_size=128, intermediate_size=288, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             vocab_size=VOCAB, max_position_embeddings=64)
KINDS = ("conan", "qwen2", "llama")
IMPLS = ("eager", "sdpa", "flex_attention")
LOGGER = "conan_hf.modeling_conan"


# ----------------------------------------------------------------------------------------------------------- helpers


def naive_m(length: int, alpha: float, l: int | None = None) -> list[list[float]]:
    """Eq.4 straight from the definition: rows i (queries), columns j (keys), 1-based; l defaults to `length`."""
    l = length if l is None else l
    return [[1.0 if i >= j else min(alpha * l / i, 1.0) for j in range(1, length + 1)]
            for i in range(1, length + 1)]


def naive_l(option, real_length: int, padded_length: int) -> int:
    """l of eq.4 for a `soft_mask_length` option, spelled out."""
    return {"sequence": real_length, "max_seq_length": padded_length}.get(option, option)


def naive_bias(mask2d: torch.Tensor, alpha: float, dtype=torch.float32, option="sequence") -> torch.Tensor:
    """(B, 1, L, L) log M for a padded batch: ranks count from each sequence's first real token; padding keys masked."""
    lowest = torch.finfo(dtype).min
    batch, length = mask2d.shape
    bias = torch.full((batch, 1, length, length), lowest, dtype=dtype)
    for b in range(batch):
        real = [p for p in range(length) if mask2d[b, p]]
        m = naive_m(len(real), alpha, naive_l(option, len(real), length)) if real else []
        for q in range(length):
            for rk, k in enumerate(real):
                if q in real:
                    value = m[real.index(q)][rk]
                    bias[b, 0, q, k] = math.log(value) if value > 0 else lowest
                else:  # padding query rows are never read; give them something finite
                    bias[b, 0, q, k] = 0.0
    return bias


def batch(side: str):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if side == "right":
        mask[1, 9:] = 0
        mask[2, 4:] = 0
    elif side == "left":
        mask[1, :3] = 0
        mask[2, :8] = 0
    elif side == "empty":  # a fully padded sequence next to a left- and a right-padded one
        mask[0, :5] = 0
        mask[1, :] = 0
        mask[2, 7:] = 0
    return ids, mask


def build(kind: str, impl: str = "sdpa", patched: bool = True):
    """Same seed -> same weights for every implementation of one kind."""
    torch.manual_seed(0)
    if kind == "conan":
        model = ConanModel(ConanConfig.tiny(attention_mode="soft" if patched else "causal", vocab_size=VOCAB))
    elif kind == "qwen2":
        model = Qwen2Model(Qwen2Config(**STOCK))
    else:
        model = LlamaModel(LlamaConfig(**STOCK))
    if patched and kind != "conan":
        apply_soft_mask(model)
    model.set_attn_implementation(impl)
    return model.eval()


def run(model, ids, mask, **kwargs):
    return model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state


def naive_reference(kind: str, ids, mask, alpha: float, option="sequence"):
    """Unpatched eager model fed the naive log-M bias as a prepared 4D mask."""
    model = build(kind, "eager", patched=False)
    kwargs = {"position_ids": padding_aware_position_ids(mask)} if kind == "conan" else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=naive_bias(mask, alpha, option=option), **kwargs).last_hidden_state


def plain(kind: str, ids, mask, bidirectional: bool):
    """Causal / bidirectional outputs of the same weights, without any soft-mask code involved."""
    if kind == "conan":
        torch.manual_seed(0)
        mode = "bidirectional" if bidirectional else "causal"
        model = ConanModel(ConanConfig.tiny(attention_mode=mode, vocab_size=VOCAB)).eval()
        kwargs = {}
    else:
        model = build(kind, "sdpa", patched=False)
        kwargs = {"is_causal": False} if bidirectional else {}  # transformers' own bidirectional switch
    with torch.no_grad():
        return run(model, ids, mask, **kwargs)


def close(a, b, mask, atol=1e-5):
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=atol, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- eq.4 and App. C


def test_soft_mask_matrix_matches_the_issue_examples_and_the_formula():
    issue = {
        0.5: [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 2 / 3], [1, 1, 1, 1]],
        0.25: [[1, 1, 1, 1], [1, 1, 0.5, 0.5], [1, 1, 1, 1 / 3], [1, 1, 1, 1]],
    }
    for alpha, expected in issue.items():
        expected = torch.tensor(expected, dtype=torch.float32)
        torch.testing.assert_close(soft_mask_matrix(4, alpha), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(naive_m(4, alpha)), expected, atol=1e-6, rtol=0)
    for length in (1, 2, 5, 9):
        for alpha in (0.0, 0.05, 0.3, 0.61, 0.999, 1.0, 2.5):
            torch.testing.assert_close(soft_mask_matrix(length, alpha), torch.tensor(naive_m(length, alpha)),
                                       atol=1e-6, rtol=0)
    # The two ends are exactly causal and exactly bidirectional.
    assert torch.equal(soft_mask_matrix(6, 0.0), torch.tril(torch.ones(6, 6)))
    assert torch.equal(soft_mask_matrix(6, 1.0), torch.ones(6, 6))


def test_row_is_fully_bidirectional_exactly_when_alpha_reaches_i_over_l():
    for length in range(1, 11):
        for i in range(1, length + 1):
            boundary = i / length
            for alpha in (boundary, boundary - 1e-6, boundary + 1e-6, boundary * 0.5, 0.0, 1.0):
                if alpha < 0:
                    continue
                row = soft_mask_matrix(length, alpha)[i - 1]
                # The last row has no later key, so it is trivially "fully bidirectional" at any alpha.
                assert bool((row == 1).all()) == (alpha >= i / length or i == length), (length, i, alpha, row)


def test_schedules_at_start_middle_and_end():
    tau = 10
    expected = {
        "linear": (0.0, 0.5, 1.0),
        "accelerating": (0.0, 0.25, 1.0),
        "decelerating": (0.0, 0.75, 1.0),
    }
    assert set(expected) == set(SOFT_MASK_SCHEDULES)
    for schedule, values in expected.items():
        got = tuple(soft_mask_alpha(t, tau, schedule) for t in (0, tau / 2, tau))
        assert got == pytest.approx(values, abs=1e-12)
        x = 3 / tau
        formula = {"linear": x, "accelerating": x ** 2, "decelerating": 1 - (1 - x) ** 2}[schedule]
        assert soft_mask_alpha(3, tau, schedule) == pytest.approx(formula)
        assert soft_mask_alpha(2 * tau, tau, schedule) == 1.0  # clipped
    with pytest.raises(ValueError, match="schedule must be one of"):
        soft_mask_alpha(1, 10, "cosine")
    with pytest.raises(ValueError, match="total_steps"):
        soft_mask_alpha(1, 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        soft_mask_alpha(-1, 10)


def test_dense_bias_follows_each_sequence_real_tokens():
    for side in ("left", "right", "empty"):
        _, mask = batch(side)
        for alpha in (0.0, 0.1, 0.5, 0.9):
            bias = SoftMaskInputs.from_padding_mask(mask, BATCH, LENGTH, alpha, torch.device("cpu")).dense_bias(
                torch.float32)
            reference = naive_bias(mask, alpha)
            real_rows = mask.bool()[:, None, :, None].expand_as(bias)
            torch.testing.assert_close(bias[real_rows], reference[real_rows], atol=1e-6, rtol=1e-6)
            assert torch.isfinite(bias).all()


LENGTH_OPTIONS = ("sequence", "max_seq_length", 5, 40)


def test_soft_mask_length_options_follow_the_eq4_loop():
    """`soft_mask_length`: l = each sequence's real length, the padded length, or a fixed int (eq.4's l)."""
    for option in LENGTH_OPTIONS:
        for side in ("left", "right", "empty"):
            _, mask = batch(side)
            for alpha in (0.05, 0.3, 0.7):
                bias = SoftMaskInputs.from_padding_mask(mask, BATCH, LENGTH, alpha, torch.device("cpu"),
                                                        mask_length=option).dense_bias(torch.float32)
                reference = naive_bias(mask, alpha, option=option)
                real_rows = mask.bool()[:, None, :, None].expand_as(bias)
                torch.testing.assert_close(bias[real_rows], reference[real_rows], atol=1e-6, rtol=1e-6)
        if isinstance(option, int):
            for alpha in (0.1, 0.5):
                torch.testing.assert_close(soft_mask_matrix(9, alpha, mask_length=option),
                                           torch.tensor(naive_m(9, alpha, option)), atol=1e-6, rtol=0)
    # The options really differ: a 4-token sequence padded to 12 at alpha = 0.1 (row 1: 0.4 vs 1.2 -> 1).
    _, mask = batch("right")
    per_option = {option: SoftMaskInputs.from_padding_mask(mask, BATCH, LENGTH, 0.1, torch.device("cpu"),
                                                           mask_length=option).dense_bias(torch.float32)
                  for option in ("sequence", "max_seq_length")}
    assert per_option["sequence"][2, 0, 0, 1].exp().item() == pytest.approx(0.4)
    assert per_option["max_seq_length"][2, 0, 0, 1].exp().item() == pytest.approx(1.0)
    for bad in ("padded", 0, -3, True):
        with pytest.raises(ValueError, match="soft_mask_length must be one of"):
            ConanConfig.tiny(soft_mask_length=bad)
    with pytest.raises(ValueError, match="soft_mask_length must be one of"):
        SoftMaskInputs.from_padding_mask(mask, BATCH, LENGTH, 0.1, torch.device("cpu"), mask_length=2.5)


@pytest.mark.parametrize("kind", ["conan", "qwen2"])
def test_models_use_the_configured_soft_mask_length(kind):
    """ConanConfig.soft_mask_length / apply_soft_mask(length=...) / set_soft_mask_length reach the attention."""
    from conan_hf.soft_mask import set_soft_mask_length

    model = build(kind, "sdpa")
    ids, mask = batch("right")
    outputs = {}
    for option in LENGTH_OPTIONS:
        if kind == "conan":
            model.config.soft_mask_length = option
        else:
            apply_soft_mask(model, length=option)
        set_soft_mask_alpha(model, 0.2)
        with torch.no_grad():
            outputs[option] = run(model, ids, mask)
        close(outputs[option], naive_reference(kind, ids, mask, 0.2, option), mask)
    assert (outputs["sequence"] - outputs["max_seq_length"])[mask.bool()].abs().max() > 1e-3
    set_soft_mask_length(model, "sequence")
    with torch.no_grad():
        torch.testing.assert_close(run(model, ids, mask), outputs["sequence"])
    with pytest.raises(ValueError, match="soft_mask_length must be one of"):
        set_soft_mask_length(model, "longest")


def test_plot_soft_mask_writes_a_png(tmp_path):
    path = plot_soft_mask(8, [0.0, 0.25, 0.5, 1.0], tmp_path / "figs" / "mask.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="length must be a positive integer"):
        soft_mask_matrix(0, 0.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        soft_mask_matrix(3, -0.1)
    with pytest.raises(ValueError, match="soft_mask_backend must be one of"):
        ConanConfig.tiny(soft_mask_backend="flash")
    with pytest.raises(ValueError, match="soft_mask_backend must be one of"):
        resolve_soft_mask_backend("sdpa", 0.5, "cuda-magic")


# ------------------------------------------------------------------------------------------------ backend selection


def test_backend_resolution_fast_paths_fallbacks_and_refusals():
    for impl in ("sdpa", "eager", "flex_attention", "flash_attention_2"):
        assert resolve_soft_mask_backend(impl, 0.0) == "causal"
        assert resolve_soft_mask_backend(impl, 1.0) == "bidirectional"
        assert resolve_soft_mask_backend(impl, 3.0) == "bidirectional"
    assert resolve_soft_mask_backend("sdpa", 0.5, npu=False) == "sdpa"
    assert resolve_soft_mask_backend("eager", 0.5) == "eager"
    assert resolve_soft_mask_backend("flex_attention", 0.5) == "flex_attention"
    # Flex has no CPU backward: auto falls back to the dense bias, an explicit request is refused.
    assert resolve_soft_mask_backend("flex_attention", 0.5, device_type="cpu", training=True, npu=False) == "sdpa"
    assert resolve_soft_mask_backend("flex_attention", 0.5, device_type="cuda", training=True) == "flex_attention"
    with pytest.raises(ValueError, match="no CPU backward"):
        resolve_soft_mask_backend("sdpa", 0.5, "flex_attention", device_type="cpu", training=True)
    # transformers' sdpa booleanises float masks on Ascend NPU -> eager there.
    assert resolve_soft_mask_backend("sdpa", 0.5, npu=True) == "eager"
    # Flash attention cannot express 0 < M < 1, unless the soft phase is given another backend.
    with pytest.raises(ValueError, match="cannot express the soft mask"):
        resolve_soft_mask_backend("flash_attention_2", 0.5)
    assert resolve_soft_mask_backend("flash_attention_2", 0.5, "flex_attention", device_type="cuda") == "flex_attention"


def test_flash_attention_model_refuses_partial_alpha():
    model = build("conan", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # what from_pretrained(attn_implementation=...) sets
    set_soft_mask_alpha(model, 0.5)
    ids, mask = batch("right")
    with pytest.raises(ValueError, match="soft_mask_backend='flex_attention'"):
        run(model, ids, mask)


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
            for impl, model in models.items():
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
                                               msg=lambda m: f"{impl} {option} alpha={alpha} row {row}: {m}")
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


# ---------------------------------------------------------------------------------------------------- model-level API


def test_apply_and_remove_restore_a_stock_decoder_exactly():
    ids, mask = batch("right")
    model = build("qwen2", "sdpa", patched=False)
    with torch.no_grad():
        original = run(model, ids, mask)
    handle = apply_soft_mask(model)
    assert get_soft_mask_alpha(model) == 0.0
    with torch.no_grad():
        assert torch.equal(run(model, ids, mask), original)
        set_soft_mask_alpha(model, 0.5)
        assert (run(model, ids, mask) - original)[mask.bool()].abs().max() > 1e-3
    apply_soft_mask(model, alpha=0.5)  # idempotent: one wrapper, around the class's own forward
    assert model.forward.func.__name__ == "_soft_mask_forward" and model.forward.args == (model,)
    # A deep copy carries its own state: its alpha moves independently of the original's.
    twin = copy.deepcopy(model)
    assert get_soft_mask_alpha(pickle.loads(pickle.dumps(model))) == 0.5
    set_soft_mask_alpha(twin, 0.0)
    with torch.no_grad():
        assert torch.equal(run(twin, ids, mask), original)
        assert not torch.equal(run(model, ids, mask), original)
    handle.remove()
    assert "forward" not in model.__dict__ and "_conan_soft_mask_state" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(run(model, ids, mask), original)
    with pytest.raises(ValueError, match="apply_soft_mask"):
        set_soft_mask_alpha(model, 0.5)
    # A flex soft forward switches to the registered function; removal gives flex_attention back.
    model.set_attn_implementation("flex_attention")
    with apply_soft_mask(model, alpha=0.5):
        with torch.no_grad():
            run(model, ids, mask)
        assert model.config._attn_implementation == SOFT_FLEX_ATTENTION
    assert model.config._attn_implementation == "flex_attention"


def test_set_alpha_reaches_conan_inside_wrappers_and_refuses_non_soft_modes(tiny_model_dir):
    from conan_hf import build_sentence_transformer

    lm = ConanForCausalLM(ConanConfig.tiny(attention_mode="soft"))
    assert set_soft_mask_alpha(lm, 0.3) == 1 and lm.model.config.soft_mask_alpha == 0.3
    st = build_sentence_transformer(str(tiny_model_dir), attention_mode="soft")
    set_soft_mask_alpha(st, 0.7)
    assert get_soft_mask_alpha(st) == 0.7
    assert st[0].auto_model.config.soft_mask_alpha == 0.7
    bidirectional = build_sentence_transformer(str(tiny_model_dir))
    with pytest.raises(ValueError, match="attention_mode='bidirectional'"):
        set_soft_mask_alpha(bidirectional, 0.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        set_soft_mask_alpha(st, -1)
    # apply_soft_mask on a Conan backbone switches it to soft mode and remove restores its settings.
    handle = apply_soft_mask(bidirectional, alpha=0.25)
    assert bidirectional[0].auto_model.config.attention_mode == "soft" and get_soft_mask_alpha(bidirectional) == 0.25
    handle.remove()
    assert bidirectional[0].auto_model.config.attention_mode == "bidirectional"


def test_stock_decoder_inside_a_sentence_transformer(tmp_path):
    # sentence-transformers calls `model.forward(...)` directly, bypassing module hooks: the patch must still apply.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from conan_hf.tokenizer import demo_tokenizer

    build("qwen2", "sdpa", patched=False).save_pretrained(tmp_path)
    demo_tokenizer(vocab_size=VOCAB).save_pretrained(tmp_path)
    transformer = Transformer(str(tmp_path), max_seq_length=LENGTH)
    st = SentenceTransformer(modules=[transformer, Pooling(128, pooling_mode="mean")])
    apply_soft_mask(st, alpha=0.5)
    features = st.tokenize(["a short one", "a somewhat longer sentence than the first one is"])
    with torch.no_grad():
        tokens = st.forward(dict(features))["token_embeddings"]
    mask = features["attention_mask"]
    reference = build("qwen2", "eager", patched=False)
    with torch.no_grad():
        expected = reference(input_ids=features["input_ids"], attention_mask=naive_bias(mask, 0.5)).last_hidden_state
        causal = reference(input_ids=features["input_ids"], attention_mask=mask).last_hidden_state
    close(tokens, expected, mask)
    assert (tokens - causal)[mask.bool()].abs().max() > 1e-3
    remove_soft_mask(st)
    assert "forward" not in st[0].auto_model.__dict__
    with torch.no_grad():
        close(st.forward(dict(features))["token_embeddings"], causal, mask)


def test_soft_alpha_is_saved_with_a_conan_model(tmp_path):
    model = build("conan", "sdpa")
    set_soft_mask_alpha(model, 0.4)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["soft_mask_alpha"] == 0.4
    loaded = ConanModel.from_pretrained(tmp_path).eval()
    ids, mask = batch("left")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, ids, mask), run(model, ids, mask))


# ------------------------------------------------------------------------------------------------------ the callback


TEXTS = [
    ("what is the capital of france", "paris is the capital of france"),
    ("how many legs does a spider have", "spiders have eight legs"),
    ("boiling point of water", "water boils at 100 degrees celsius at sea level"),
    ("largest planet", "jupiter is the largest planet in the solar system"),
    ("who wrote hamlet", "hamlet was written by william shakespeare"),
    ("speed of light", "light travels at about 300000 km per second"),
    ("tallest mountain", "mount everest is the tallest mountain above sea level"),
    ("primary colours", "red, yellow and blue are the traditional primary colours"),
]


def _trainer(model, output_dir, callbacks, max_steps=4):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    dataset = Dataset.from_dict({"anchor": [a for a, _ in TEXTS], "positive": [p for _, p in TEXTS]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-4,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to="none", seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                      loss=MultipleNegativesRankingLoss(model), callbacks=callbacks)


def _record_forward_alphas(st_model) -> list[float]:
    seen: list[float] = []
    backbone = st_model[0].auto_model
    # sentence-transformers calls backbone.forward directly (no module hooks); its layers go through __call__.
    # Training forwards only (the trainer also encodes model-card widget examples in eval mode).
    def record(module, args):
        if module.training:
            seen.append(backbone.config.soft_mask_alpha)

    backbone.layers[0].register_forward_pre_hook(record)
    return seen


def test_soft_mask_callback_moves_alpha_and_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    from conan_hf import build_sentence_transformer
    from conan_hf.training.callbacks import SoftMaskCallback

    model = build_sentence_transformer(str(tiny_model_dir), attention_mode="soft")
    seen = _record_forward_alphas(model)
    trainer = _trainer(model, tmp_path, [SoftMaskCallback(schedule="accelerating")])
    trainer.train()
    # Two forwards per step (anchors, positives); step t = 1..4 (the step being taken) trains at alpha = (t / 4)^2,
    # so the final step's forwards run at alpha = 1 exactly and the first at 1/16.
    assert seen == pytest.approx([a for t in range(1, 5) for a in [(t / 4) ** 2] * 2])
    assert seen[-2:] == [1.0, 1.0]
    assert get_soft_mask_alpha(model) == 1.0
    logged = [(e["step"], e["soft_mask_alpha"]) for e in trainer.state.log_history if "loss" in e]
    assert logged == [(t, pytest.approx((t / 4) ** 2)) for t in range(1, 5)]
    saved = json.loads((tmp_path / "checkpoint-2" / SoftMaskCallback.STATE_FILE).read_text())
    assert saved["schedule"] == "accelerating" and saved["total_steps"] == 4 and saved["global_step"] == 2

    # Resume from step 2 with a default callback: the checkpoint's schedule and tau continue.
    resumed = build_sentence_transformer(str(tiny_model_dir), attention_mode="soft")
    seen_resumed = _record_forward_alphas(resumed)
    trainer = _trainer(resumed, tmp_path, [SoftMaskCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen_resumed == pytest.approx([(3 / 4) ** 2] * 2 + [1.0] * 2)
    assert seen_resumed[-2:] == [1.0, 1.0]
    assert get_soft_mask_alpha(resumed) == 1.0


def test_soft_mask_callback_rejects_bad_settings_and_corrupt_state(tmp_path):
    from conan_hf.training.callbacks import SoftMaskCallback

    with pytest.raises(ValueError, match="schedule must be one of"):
        SoftMaskCallback(schedule="cosine")
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        SoftMaskCallback(total_steps=0)
    (tmp_path / SoftMaskCallback.STATE_FILE).write_text('{"schedule": "linear",\n "total_steps": }')
    with pytest.raises(ValueError, match=r"soft_mask_callback.json:2: not valid JSON"):
        SoftMaskCallback()._load(str(tmp_path))
