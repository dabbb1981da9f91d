"""Soft-mask attention (paper §3.2, eq. 4; App. C schedules): the matrix M against the formula, the schedules,
the length options, the dense bias, the plot, bad arguments and the choice of attention backend."""

from __future__ import annotations

import pytest
import torch
from soft_mask_helpers import (
    BATCH,
    LENGTH,
    batch,
    build,
    close,
    naive_bias,
    naive_m,
    naive_reference,
    run,
)

from conan_hf import ConanConfig
from conan_hf.soft_mask import (
    SOFT_MASK_SCHEDULES,
    SoftMaskInputs,
    apply_soft_mask,
    plot_soft_mask,
    resolve_soft_mask_backend,
    set_soft_mask_alpha,
    soft_mask_alpha,
    soft_mask_matrix,
)

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
