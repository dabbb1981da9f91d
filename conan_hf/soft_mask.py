"""Soft-mask attention (paper §3.2, eq.4; schedules from App. C).

During weakly-supervised training the attention mask moves gradually from causal to bidirectional. With rows i as
queries and columns j as keys (1-based, counted from each sequence's first real token) and l the length:

    M_ij(t) = 1                        if i >= j
            = min(α(t) · l / i, 1)     if i <  j

M multiplies the unnormalised attention weights (an additive bias log M on the logits), so α = 0 is exactly causal
and α >= 1 exactly bidirectional; padding keys are always masked.

l ("the training sequence length" in the paper) is chosen by `soft_mask_length`: ``"sequence"`` (default, each
sequence's real length), ``"max_seq_length"`` (the padded length of the batch) or a fixed int. Packed rows (position
ids restarting inside a row, no ``cu_seq_lens``) get one mask per document, with its own i and l, and no attention
across documents. The schedules α(t) are those of App. C (`soft_mask_alpha`). Why these choices, the backends'
costs and the measurements: ``docs/soft_mask.md``.

This module is the user-facing API. The attention machinery itself lives in `conan_hf.modeling_conan` (one place),
because checkpoints ship that file as remote code:

- `soft_mask_matrix` / `soft_mask_alpha` / `plot_soft_mask`: the matrix, the schedules and a picture of both.
- `apply_soft_mask` / `remove_soft_mask`: the soft mode on stock transformers decoders (Llama, Qwen2, Mistral, ...)
  through a forward wrapper and transformers' attention interfaces — their code is not edited or copied.
- `set_soft_mask_alpha` / `get_soft_mask_alpha`: α on a `ConanModel`, a patched stock decoder, or anything
  containing them (a `SentenceTransformer`, a `*ForCausalLM`).

Example:

```python
>>> from conan_hf import ConanConfig, ConanModel, set_soft_mask_alpha, soft_mask_alpha
>>> model = ConanModel(ConanConfig.tiny(attention_mode="soft"))
>>> for step in range(1, 101):  # step t of tau = 100 trains at alpha(t / tau): the last one at alpha = 1
...     set_soft_mask_alpha(model, soft_mask_alpha(step, total_steps=100))  # SoftMaskCallback does this in a Trainer
...     ...
```
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterable

import torch
from transformers import PreTrainedModel

from .configuration_conan import SOFT_MASK_LENGTHS, check_soft_mask_length
from .modeling_conan import (
    SOFT_FLEX_ATTENTION,
    SOFT_MASK_BACKENDS,
    SOFT_MASK_KWARG,
    ConanModel,
    SoftMaskInputs,
    prepare_soft_attention,
    resolve_soft_mask_backend,
    restore_attention_implementation,
    set_conan_soft_mask_alpha,
    soft_mask_bidirectional_rows,
    soft_mask_flex_attention_forward,
    soft_mask_log_weights,
    soft_mask_state,
    soft_mask_weights,
)

#: α(t) schedules of App. C, with x = clip(t / τ, 0, 1): linear x, accelerating x², decelerating 1 − (1 − x)².
SOFT_MASK_SCHEDULES = ("linear", "accelerating", "decelerating")


def soft_mask_alpha(step: float, total_steps: float, schedule: str = "linear") -> float:
    """α(t) of App. C at training step `step` of `total_steps` (τ), clipped to [0, 1].

    With x = min(t / τ, 1): linear α = x (eq. 3), accelerating α = x², decelerating α = 1 − (1 − x)².

    Args:
        step: the training step t (>= 0; `SoftMaskCallback` passes the 1-based step being taken).
        total_steps: τ (> 0), the number of steps over which α goes from 0 to 1.
        schedule: one of `SOFT_MASK_SCHEDULES`.

    Returns:
        α in [0, 1].

    Example:

    ```python
    >>> soft_mask_alpha(50, 100), soft_mask_alpha(50, 100, "accelerating"), soft_mask_alpha(50, 100, "decelerating")
    (0.5, 0.25, 0.75)
    ```
    """
    if schedule not in SOFT_MASK_SCHEDULES:
        raise ValueError(f"schedule must be one of {SOFT_MASK_SCHEDULES}, got {schedule!r}.")
    if not total_steps > 0:
        raise ValueError(f"total_steps (tau) must be > 0, got {total_steps!r}.")
    if not step >= 0:
        raise ValueError(f"step must be >= 0, got {step!r}.")
    x = min(float(step) / float(total_steps), 1.0)
    if schedule == "linear":
        return x
    if schedule == "accelerating":
        return x * x
    return 1.0 - (1.0 - x) ** 2


def soft_mask_matrix(length: int, alpha: float, mask_length: int | None = None) -> torch.Tensor:
    """The `length` × `length` soft mask M(α) of eq.4 for one unpadded sequence (float32; rows are queries).

    Args:
        length: the number of tokens L.
        alpha: α (>= 0); α = 0 gives the causal (lower-triangular) mask, α >= 1 all ones.
        mask_length: l of eq.4, a positive int (default: `length`, the sequence's own length).

    Returns:
        An L × L float32 tensor: 1 on and below the diagonal, min(α·l/i, 1) above it (i the 1-based row).

    Example:

    ```python
    >>> soft_mask_matrix(4, 0.25)
    tensor([[1.0000, 1.0000, 1.0000, 1.0000],
            [1.0000, 1.0000, 0.5000, 0.5000],
            [1.0000, 1.0000, 1.0000, 0.3333],
            [1.0000, 1.0000, 1.0000, 1.0000]])
    ```
    """
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise ValueError(f"length must be a positive integer, got {length!r}.")
    if not float(alpha) >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}.")
    if mask_length is not None:
        check_soft_mask_length(mask_length)
        if isinstance(mask_length, str):
            raise ValueError(f"mask_length must be a positive integer here, got {mask_length!r}.")
    positions = torch.arange(1, length + 1)
    lengths = torch.tensor(length if mask_length is None else mask_length)
    rows = soft_mask_bidirectional_rows(float(alpha), lengths)
    return soft_mask_weights(positions[:, None], positions[None, :], lengths, float(alpha), rows)


def plot_soft_mask(
    length: int = 16,
    alphas: Iterable[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
    path: str | os.PathLike = "soft_mask.png",
    dpi: int = 120,
) -> str:
    """Write a PNG grid of heatmaps of M(α) (eq.4) for a sequence of `length` tokens at each α (needs matplotlib).

    Args:
        length: tokens per sequence (l = `length`).
        alphas: one heatmap per α, at most three per row.
        path: the PNG file to write (its folder is created).
        dpi: resolution of the PNG.

    Returns:
        `path`, as a string.

    Example:

    ```python
    >>> plot_soft_mask(16, [0.0, 0.25, 0.5, 1.0], "docs/soft_mask.png")
    'docs/soft_mask.png'
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas must contain at least one value.")
    columns = min(len(alphas), 3)
    rows = (len(alphas) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.0 * columns + 1.2, 3.0 * rows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= len(alphas):
            ax.axis("off")
            continue
        alpha = alphas[index]
        image = ax.imshow(soft_mask_matrix(length, alpha).numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"α = {alpha:g}")
        if index // columns == rows - 1 or index + columns >= len(alphas):
            ax.set_xlabel("key j")
        if index % columns == 0:
            ax.set_ylabel("query i")
        ticks = list(range(0, length, max(1, length // 4)))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    figure.suptitle(f"Soft mask M(α), l = {length} (eq.4: M_ij = min(α·l/i, 1) for j > i)")
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="M_ij (multiplies attention weights)")
    path = str(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Stock transformers decoders


def _decoders(model: torch.nn.Module) -> list[PreTrainedModel]:
    """The base transformers models inside `model` (e.g. the `LlamaModel` of a `LlamaForCausalLM`)."""
    return [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.base_model is m]


def _is_soft_forward(forward) -> bool:
    return getattr(forward, "_conan_soft_mask", False)


def _soft_mask_forward(module: PreTrainedModel, *args, **kwargs):
    """The patched decoder forward: prepare the soft-mask inputs, then run the decoder's own forward.

    Installed as an instance attribute (``module.forward = partial(_soft_mask_forward, module)``) rather than a forward
    hook, because sentence-transformers calls ``model.forward(...)`` directly, which bypasses module hooks. Module-level
    (not a closure) and reading its state from `module`, so patched models deep-copy and pickle.
    """
    state = soft_mask_state(module, create=False)
    inner = state.inner_forward if state is not None and state.inner_forward is not None else None
    if inner is None:
        inner = type(module).forward.__get__(module)
    if state is None:
        return inner(*args, **kwargs)
    arguments = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
    arguments = dict(arguments)
    arguments.pop("self", None)
    for name, parameter in inspect.signature(type(module).forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    extra = {k: v for k, v in arguments.items() if k not in ("attention_mask", "input_ids", "inputs_embeds")}
    attention_mask, extra = prepare_soft_attention(
        module,
        alpha=state.alpha,
        backend=state.backend,
        attention_mask=arguments.get("attention_mask"),
        input_ids=arguments.get("input_ids"),
        inputs_embeds=arguments.get("inputs_embeds"),
        kwargs=extra,
        past_key_values=arguments.get("cache", arguments.get("past_key_values")),  # 5.24 renamed it `cache`
        mask_length=state.mask_length,
        position_ids=arguments.get("position_ids"),
    )
    return inner(
        input_ids=arguments.get("input_ids"),
        inputs_embeds=arguments.get("inputs_embeds"),
        attention_mask=attention_mask,
        **extra,
    )


class SoftMaskHandle:
    """Returned by `apply_soft_mask`; `remove()` restores the model's original behaviour (also a context manager)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def remove(self) -> None:
        remove_soft_mask(self.model)

    def __enter__(self) -> SoftMaskHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_soft_mask(
    model: torch.nn.Module, alpha: float | None = None, backend: str = "auto", length: int | str | None = None
) -> SoftMaskHandle:
    """Enable the eq.4 soft mask on every transformers decoder inside `model`, without editing the decoder's code.

    Stock decoders (Llama, Qwen2, Mistral, ... — any model using transformers' mask and attention interfaces) get a
    forward wrapper (an instance attribute, like accelerate's hooks) that prepares the soft-mask inputs; a `ConanModel`
    switches to `attention_mode="soft"`. A patched model with no α set runs causally (α = 0). `remove_soft_mask(model)`
    (or the returned handle) undoes everything.

    Args:
        model: a transformers model, or any module containing one (e.g. a `SentenceTransformer`).
        alpha: initial α (default: keep the current one, 0 for a fresh patch).
        backend: one of `SOFT_MASK_BACKENDS`; "auto" follows the model's `attn_implementation`.
        length: l of eq.4, one of `SOFT_MASK_LENGTHS` ("sequence": each sequence's real length; "max_seq_length": the
            padded length of the batch) or a fixed positive int (default: keep the current one, "sequence" for a
            fresh patch).

    Example:

    ```python
    >>> from transformers import Qwen2Config, Qwen2Model
    >>> model = Qwen2Model(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> handle = apply_soft_mask(model)
    >>> set_soft_mask_alpha(model, 0.5)
    >>> handle.remove()  # back to the original causal Qwen2
    ```
    """
    if backend not in SOFT_MASK_BACKENDS:
        raise ValueError(f"backend must be one of {SOFT_MASK_BACKENDS}, got {backend!r}.")
    if alpha is not None and not float(alpha) >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}.")
    if length is not None:
        check_soft_mask_length(length)
    decoders = _decoders(model)
    if not decoders:
        raise ValueError(f"apply_soft_mask found no transformers model inside {type(model).__name__}.")
    for decoder in decoders:
        if isinstance(decoder, ConanModel):
            state = soft_mask_state(decoder)
            if state.restore_config is None:
                config = decoder.config
                state.restore_config = {
                    "attention_mode": config.attention_mode,
                    "soft_mask_alpha": config.soft_mask_alpha,
                    "soft_mask_backend": config.soft_mask_backend,
                    "soft_mask_length": config.soft_mask_length,
                }
            decoder.config.attention_mode = "soft"
            decoder.config.soft_mask_backend = backend
            decoder.config.soft_mask_alpha = float(alpha) if alpha is not None else 0.0
            if length is not None:
                decoder.config.soft_mask_length = length
            continue
        if not getattr(decoder, "_supports_attention_backend", False):
            raise ValueError(
                f"{type(decoder).__name__} does not route attention through transformers' AttentionInterface, so "
                "the soft mask cannot be applied to it."
            )
        state = soft_mask_state(decoder)
        state.backend = backend
        if alpha is not None:
            state.alpha = float(alpha)
        if length is not None:
            state.mask_length = length
        if not _is_soft_forward(decoder.__dict__.get("forward")):
            # Keep an existing instance-level forward (e.g. accelerate's device hooks) inside ours.
            state.inner_forward = decoder.__dict__.get("forward")
            forward = functools.partial(_soft_mask_forward, decoder)
            forward.__signature__ = inspect.signature(decoder.forward)  # sentence-transformers reads it
            forward._conan_soft_mask = True
            decoder.forward = forward
    return SoftMaskHandle(model)


def remove_soft_mask(model: torch.nn.Module) -> None:
    """Undo `apply_soft_mask`: drop the forward wrapper, restore the attention implementation and Conan settings."""
    for decoder in _decoders(model):
        state = soft_mask_state(decoder, create=False)
        if state is None:
            continue
        current = decoder.__dict__.get("forward")
        if current is not None and not _is_soft_forward(current):
            raise RuntimeError(
                f"{type(decoder).__name__}.forward was wrapped again after apply_soft_mask; remove that wrapper first."
            )
        restore_attention_implementation(decoder)
        if current is not None:
            if state.inner_forward is not None:
                decoder.forward = state.inner_forward
            else:
                del decoder.forward
        if isinstance(decoder, ConanModel) and state.restore_config is not None:
            for name, value in state.restore_config.items():
                setattr(decoder.config, name, value)
        del decoder.__dict__["_conan_soft_mask_state"]


def _soft_targets(model: torch.nn.Module) -> list[PreTrainedModel]:
    """The soft-masked decoders inside `model`; raises a `ValueError` if there are none."""
    targets = [decoder for decoder in _decoders(model)
               if isinstance(decoder, ConanModel) or _is_soft_forward(decoder.__dict__.get("forward"))]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no soft-masked decoder: use a ConanModel with attention_mode='soft' or call "
            "conan_hf.apply_soft_mask(model) first."
        )
    return targets


def set_soft_mask_alpha(model: torch.nn.Module, alpha: float) -> int:
    """Set α on every soft-masked decoder inside `model`; returns how many were updated.

    Raises a `ValueError` for α < 0 or a model without a soft-masked decoder. Works on a `ConanModel` in
    `attention_mode="soft"` (α is stored in its config and saved with it), on a stock
    decoder patched by `apply_soft_mask`, and on anything containing them (SentenceTransformer, *ForCausalLM).
    """
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}.")
    targets = _soft_targets(model)
    for decoder in targets:
        if isinstance(decoder, ConanModel):
            set_conan_soft_mask_alpha(decoder, alpha)
        else:
            soft_mask_state(decoder).alpha = alpha
    return len(targets)


def set_soft_mask_length(model: torch.nn.Module, length: int | str) -> int:
    """Set l of eq.4 on every soft-masked decoder inside `model` (see `apply_soft_mask`); returns how many.

    On a `ConanModel` it is stored in the config (`soft_mask_length`) and saved with the model.
    """
    check_soft_mask_length(length)
    targets = _soft_targets(model)
    for decoder in targets:
        if isinstance(decoder, ConanModel):
            decoder.config.soft_mask_length = length
        else:
            soft_mask_state(decoder).mask_length = length
    return len(targets)


def get_soft_mask_alpha(model: torch.nn.Module) -> float:
    """The α in effect on the (first) soft-masked decoder inside `model` (0.0 for a patched model with none set)."""
    decoder = _soft_targets(model)[0]
    if isinstance(decoder, ConanModel):
        return float(decoder.config.soft_mask_alpha)
    return float(soft_mask_state(decoder).alpha or 0.0)


__all__ = [
    "SOFT_MASK_SCHEDULES",
    "SOFT_MASK_BACKENDS",
    "SOFT_FLEX_ATTENTION",
    "SOFT_MASK_KWARG",
    "SOFT_MASK_LENGTHS",
    "SoftMaskHandle",
    "SoftMaskInputs",
    "apply_soft_mask",
    "get_soft_mask_alpha",
    "plot_soft_mask",
    "remove_soft_mask",
    "resolve_soft_mask_backend",
    "set_soft_mask_alpha",
    "set_soft_mask_length",
    "soft_mask_alpha",
    "soft_mask_bidirectional_rows",
    "soft_mask_flex_attention_forward",
    "soft_mask_log_weights",
    "soft_mask_matrix",
    "soft_mask_weights",
]
