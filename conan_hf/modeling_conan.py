"""Conan-Embedding-v2 backbone (arXiv 2509.12892) on transformers' Llama blocks.

`ConanModel` and `ConanForCausalLM` reuse `LlamaModel`'s layers, parameter names and attention interface; what is
Conan-specific is the attention *mode* (causal / bidirectional / soft, paper §3.2), expressed through transformers'
own mechanisms: `config.is_causal` for mask creation and the `is_causal` attention kwarg for kernels that skip a
materialised mask (sdpa, flash attention).

This file travels with saved checkpoints as remote code, so it imports only torch and transformers.
"""

from __future__ import annotations

import inspect

import torch
from transformers.integrations import flex_attention as hf_flex_attention
from transformers.integrations import sdpa_attention as hf_sdpa_attention
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    bidirectional_mask_function,
    flex_attention_mask,
    packed_sequence_mask_function,
)
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.utils import is_torch_npu_available, logging
from transformers.utils.generic import is_flash_attention_requested

from .configuration_conan import SOFT_MASK_BACKENDS, SOFT_MASK_LENGTHS, ConanConfig, check_soft_mask_length

logger = logging.get_logger(__name__)

#: transformers 5.24 renamed the decoder's `past_key_values` argument to `cache` (the old name warns and goes away in
#: 5.40); the cache is passed on under the name the installed `LlamaModel.forward` takes.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def padding_aware_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that start at 0 on each sequence's first real token, so left padding changes nothing.

    Padding positions get 0 (they are masked as keys anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------------
# Soft-mask attention (paper §3.2, eq.4; schedules in App. C live in conan_hf/soft_mask.py).
#
# Conventions: rows i are queries, columns j keys, both 1-based and counted from each sequence's first real token (so
# left padding shifts nothing); l is the sequence's real (unpadded) length by default (`soft_mask_length`: "sequence";
# "max_seq_length" uses the padded length of the batch, an int a fixed l);
#     M_ij(α) = 1                      if i >= j
#             = min(α · l / i, 1)      if i <  j
# and padding keys are always masked. A packed row (position ids restarting inside it) holds several documents: each
# gets its own mask (its own i and l) and never attends to another. M multiplies the unnormalised attention weights,
# i.e. log M is added to the logits (M = 0 -> the dtype's most negative value, as transformers' own masks do, so
# fully padded rows stay finite).
# α = 0 is exactly causal, α >= 1 exactly bidirectional, and row i < l is fully bidirectional exactly when α >= i / l
# (the last row, i = l, has no later key and always sees everything).
#
# This block is the one implementation of the soft mask: `conan_hf.soft_mask` imports it (checkpoints ship this file
# as remote code, so it imports only torch and transformers).
# ---------------------------------------------------------------------------------------------------------------------

#: Name under which the flex score_mod attention is registered in transformers' Attention(Mask)Interface.
SOFT_FLEX_ATTENTION = "conan_soft_flex_attention"

#: Keyword argument that carries the per-batch soft-mask data from the model's forward to the attention function.
SOFT_MASK_KWARG = "conan_soft_mask"

_STATE_ATTRIBUTE = "_conan_soft_mask_state"


def soft_mask_bidirectional_rows(alpha: float, lengths: torch.Tensor) -> torch.Tensor:
    """How many leading rows of each sequence are fully bidirectional: the largest i with i / l <= α (eq.4).

    Computed in float64 with a one-step correction so that the boundary is exact in the sense of Python's
    ``alpha >= i / l``; then M_ij = 1 for every j on those rows, whatever float32 rounding does to α·l/i.
    """
    lengths = lengths.to(torch.float64)
    alpha = float(alpha)
    rows = torch.floor(alpha * lengths)
    rows = rows + ((rows + 1) / lengths <= alpha).to(rows.dtype) - (rows / lengths > alpha).to(rows.dtype)
    return torch.minimum(rows.clamp(min=0), lengths).to(torch.long)


def soft_mask_weights(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    lengths: torch.Tensor,
    alpha: torch.Tensor | float,
    bidirectional_rows: torch.Tensor,
) -> torch.Tensor:
    """M_ij(α) of eq.4 for broadcastable tensors of 1-based query positions i, key positions j and real lengths l.

    `bidirectional_rows` is `soft_mask_bidirectional_rows(alpha, lengths)` (same broadcasting as `lengths`). Works
    element-wise, so the same code builds a dense matrix (broadcast index grids) and runs inside a flex-attention
    `score_mod` (scalar index tensors). Padding is *not* handled here (see `soft_mask_log_weights`).

    Example:

    ```python
    >>> import torch
    >>> i, j, l = torch.arange(1, 5)[:, None], torch.arange(1, 5)[None, :], torch.tensor(4)
    >>> soft_mask_weights(i, j, l, 0.25, soft_mask_bidirectional_rows(0.25, l))[1]  # row 2: min(0.25·4/2, 1) = 0.5
    tensor([1.0000, 1.0000, 0.5000, 0.5000])
    ```
    """
    i = query_positions.clamp(min=1)
    future = torch.clamp(alpha * lengths.to(torch.float32) / i.to(torch.float32), max=1.0)
    sees_all = (key_positions <= query_positions) | (i <= bidirectional_rows)
    return torch.where(sees_all, torch.ones_like(future), future)


def soft_mask_log_weights(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    lengths: torch.Tensor,
    alpha: torch.Tensor | float,
    bidirectional_rows: torch.Tensor,
    key_is_real: torch.Tensor,
    min_value: float,
) -> torch.Tensor:
    """The additive logit bias log M_ij(α) (eq.4), with `min_value` for M = 0 and for padding keys."""
    weights = soft_mask_weights(query_positions, key_positions, lengths, alpha, bidirectional_rows)
    log_m = torch.log(weights).clamp(min=min_value)
    return torch.where(key_is_real, log_m, torch.full_like(log_m, min_value))


def packed_document_ids(position_ids: torch.Tensor, key_is_real: torch.Tensor) -> torch.Tensor | None:
    """Document index of each token when rows are packed (position ids restart inside a row), else None.

    A document starts at every real token whose position id is not the previous real token's plus one (the rule of
    transformers' `find_packed_sequence_indices`, applied to real tokens only so that padding never splits a
    sequence). Real tokens get 1, 2, ... per row; padding before a row's first real token gets 0. Returns None when
    no row holds more than one document (a data-dependent check: one host sync).
    """
    batch_size, length = key_is_real.shape
    position_ids = position_ids.to(key_is_real.device).expand(batch_size, length)
    index = torch.arange(length, device=key_is_real.device).expand(batch_size, length)
    last_real = torch.where(key_is_real, index, -1).cummax(-1).values
    previous_real = torch.cat([last_real.new_full((batch_size, 1), -1), last_real[:, :-1]], dim=-1)
    previous_position = position_ids.gather(1, previous_real.clamp(min=0))
    continues = (previous_real >= 0) & (position_ids == previous_position + 1)
    documents = (key_is_real & ~continues).long().cumsum(-1)
    if not bool((documents[:, -1] > 1).any()):
        return None
    return documents


class SoftMaskInputs:
    """Everything the attention needs to apply eq.4 to one padded batch; O(batch × length) memory, no L×L tensor.

    Attributes:
        alpha: 0-d float32 tensor α (a tensor, so a compiled flex kernel is reused as α changes).
        positions: (batch, length) 1-based rank of each token among its sequence's (or packed document's) real tokens,
            so i and j count from the first real token whatever the padding side.
        lengths: (batch, length) float32 l of eq.4 for each query token (its sequence's or document's real length,
            the padded length, or a fixed int; see `soft_mask_length`).
        bidirectional_rows: (batch, length) `soft_mask_bidirectional_rows(alpha, lengths)`.
        key_is_real: (batch, length) False at padding.
        documents: (batch, length) document index of each token of packed rows (`packed_document_ids`), or None when
            every row is one sequence; a key is visible only from queries of its own document.
    """

    def __init__(
        self,
        alpha: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        bidirectional_rows: torch.Tensor,
        key_is_real: torch.Tensor,
        documents: torch.Tensor | None = None,
    ):
        self.alpha = alpha
        self.positions = positions
        self.lengths = lengths
        self.bidirectional_rows = bidirectional_rows
        self.key_is_real = key_is_real
        self.documents = documents

    @classmethod
    def from_padding_mask(
        cls,
        padding_mask: torch.Tensor | None,
        batch_size: int,
        length: int,
        alpha: float,
        device: torch.device,
        mask_length: int | str = "sequence",
        position_ids: torch.Tensor | None = None,
    ) -> SoftMaskInputs:
        """Build the inputs from the 2D padding mask; `position_ids` that restart inside a row mark packed documents."""
        check_soft_mask_length(mask_length)
        if padding_mask is None:
            key_is_real = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        else:
            if padding_mask.dim() != 2 or tuple(padding_mask.shape) != (batch_size, length):
                raise ValueError(
                    f"The soft mask needs a 2D padding mask of shape (batch, length) = {(batch_size, length)}, got "
                    f"{tuple(padding_mask.shape)}; pass the tokenizer's attention_mask, not a prepared 4D mask."
                )
            key_is_real = padding_mask.to(device=device, dtype=torch.bool)
        documents = packed_document_ids(position_ids, key_is_real) if position_ids is not None else None
        rank = key_is_real.long().cumsum(-1)
        if documents is None:
            positions = rank
            real_lengths = key_is_real.sum(-1, keepdim=True).expand(batch_size, length)
        else:
            # Rank within the document: the row rank minus the rank just before the document's first token.
            first = (documents != torch.cat([documents.new_zeros(batch_size, 1), documents[:, :-1]], dim=-1))
            before_document = torch.where(first & key_is_real, rank - 1, 0).cummax(-1).values
            positions = rank - before_document
            counts = torch.zeros(batch_size, length + 1, dtype=torch.long, device=device)
            counts.scatter_add_(1, documents, key_is_real.long())
            real_lengths = counts.gather(1, documents)
        if mask_length == "sequence":
            lengths = real_lengths
        else:
            fixed = length if mask_length == "max_seq_length" else int(mask_length)
            lengths = torch.full((batch_size, length), fixed, dtype=torch.long, device=device)
        return cls(
            alpha=torch.tensor(float(alpha), dtype=torch.float32, device=device),
            positions=positions,
            lengths=lengths.to(torch.float32),
            bidirectional_rows=soft_mask_bidirectional_rows(alpha, lengths),
            key_is_real=key_is_real,
            documents=documents,
        )

    def visible_keys(self, batch_idx=None, q_idx=None, kv_idx=None) -> torch.Tensor:
        """Which keys a query may see at all: real keys of its own document (dense (b, 1, q, k) grid by default)."""
        if batch_idx is None:
            visible = self.key_is_real[:, None, None, :]
            if self.documents is not None:
                visible = visible & (self.documents[:, None, :, None] == self.documents[:, None, None, :])
            return visible
        visible = self.key_is_real[batch_idx, kv_idx]
        if self.documents is not None:
            visible = visible & (self.documents[batch_idx, q_idx] == self.documents[batch_idx, kv_idx])
        return visible

    def dense_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, length, length) additive bias log M for eager / sdpa attention, in `dtype`."""
        min_value = torch.finfo(dtype).min
        bias = soft_mask_log_weights(
            self.positions[:, None, :, None],
            self.positions[:, None, None, :],
            self.lengths[:, None, :, None],
            self.alpha,
            self.bidirectional_rows[:, None, :, None],
            self.visible_keys(),
            min_value,
        )
        return bias.to(dtype)

    def score_mod(self, min_value: float):
        """A flex-attention `score_mod` adding log M computed from (batch, q_idx, kv_idx) on the fly."""
        positions, lengths, alpha = self.positions, self.lengths, self.alpha
        bidirectional_rows, visible_keys = self.bidirectional_rows, self.visible_keys

        def soft_mask_score_mod(score, batch_idx, head_idx, q_idx, kv_idx):
            bias = soft_mask_log_weights(
                positions[batch_idx, q_idx],
                positions[batch_idx, kv_idx],
                lengths[batch_idx, q_idx],
                alpha,
                bidirectional_rows[batch_idx, q_idx],
                visible_keys(batch_idx, q_idx, kv_idx),
                min_value,
            )
            return score + bias.to(score.dtype)

        return soft_mask_score_mod


def soft_mask_flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as `SOFT_FLEX_ATTENTION`: flex attention with the eq.4 `score_mod`.

    `attention_mask` is the padding `BlockMask` (it lets the kernel skip fully padded blocks); the soft weights come
    from the `SOFT_MASK_KWARG` keyword argument. Called without it (a forward that did not go through the soft-mask
    preparation) this is exactly transformers' `flex_attention` implementation.
    """
    soft: SoftMaskInputs | None = kwargs.pop(SOFT_MASK_KWARG, None)
    if soft is None:
        return hf_flex_attention.flex_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout > 0:
        raise ValueError("The flex_attention soft mask does not support attention dropout; set attention_dropout=0.")
    block_mask = attention_mask if isinstance(attention_mask, hf_flex_attention.BlockMask) else None
    output = hf_flex_attention.compile_friendly_flex_attention(
        query,
        key,
        value,
        score_mod=soft.score_mod(torch.finfo(query.dtype).min),
        block_mask=block_mask,
        enable_gqa=query.shape[1] != key.shape[1],
        scale=scaling,
        training=module.training,
    )
    return output.transpose(1, 2).contiguous(), None


# Registering is global but changes nothing else: the name is only used while a soft mask selects it, and its mask
# function is transformers' flex one, so a forward that bypasses the soft-mask preparation still gets correct masks.
AttentionInterface.register(SOFT_FLEX_ATTENTION, soft_mask_flex_attention_forward)
AttentionMaskInterface.register(SOFT_FLEX_ATTENTION, flex_attention_mask)


def npu_sdpa_drops_float_masks() -> bool:
    """Whether transformers' sdpa attention will turn float masks into boolean ones (its Ascend NPU branch).

    Reads the same module-level flag that branch reads, so the soft mask avoids exactly the case it would break.
    """
    return bool(getattr(hf_sdpa_attention, "_is_torch_npu_available", is_torch_npu_available()))


def resolve_soft_mask_backend(
    attn_implementation: str | None,
    alpha: float,
    requested: str = "auto",
    *,
    device_type: str = "cpu",
    training: bool = False,
    npu: bool | None = None,
    packed: bool = False,
) -> str:
    """Which attention path a forward pass at `alpha` takes.

    Returns `"causal"` (α <= 0) or `"bidirectional"` (α >= 1) — the model's own implementation with a plain mask, so
    flash attention and un-padded (`cu_seq_lens`) batches work there — or, for 0 < α < 1, the soft-mask backend:
    `"eager"` / `"sdpa"` (materialised float bias log M) or `"flex_attention"` (score_mod, no L×L tensor).
    `packed=True` (rows holding several documents, told apart by restarting position ids only) always takes the
    soft-mask backend: transformers' own bidirectional mask would let the documents see each other, and the
    per-document mask (exactly causal at α = 0, exactly bidirectional at α >= 1) keeps them apart.

    `"auto"` follows `attn_implementation`, except that flex falls back to sdpa for CPU training (flex attention has no
    CPU backward) and sdpa becomes eager on Ascend NPU (transformers' sdpa turns float masks into booleans there).

    Raises:
        ValueError: for an unknown `requested` backend, or an implementation that cannot express 0 < M < 1 (flash
            attention, kernels) when α is strictly between 0 and 1.
    """
    if requested not in SOFT_MASK_BACKENDS:
        raise ValueError(f"soft_mask_backend must be one of {SOFT_MASK_BACKENDS}, got {requested!r}.")
    if alpha != alpha:
        raise ValueError("The soft-mask alpha is NaN.")
    if not packed:
        if alpha <= 0:
            return "causal"
        if alpha >= 1:
            return "bidirectional"
    implementation = attn_implementation or "sdpa"
    if requested != "auto":
        backend = requested
    elif implementation in ("eager", "sdpa", "flex_attention", SOFT_FLEX_ATTENTION):
        backend = "flex_attention" if implementation == SOFT_FLEX_ATTENTION else implementation
    elif is_flash_attention_requested(requested_attention_implementation=implementation):
        if packed:
            raise ValueError(
                f"attn_implementation={implementation!r} cannot express the soft mask of packed rows (position ids "
                "restarting inside a row, no cu_seq_lens): each document needs its own mask. Set "
                "soft_mask_backend='flex_attention' (or 'sdpa' / 'eager'), pass cu_seq_lens_q/k for the causal and "
                "bidirectional phases, or use padded batches."
            )
        raise ValueError(
            f"attn_implementation={implementation!r} cannot express the soft mask's partial weights (0 < M < 1) at "
            f"alpha={alpha:.4g}. Set soft_mask_backend='flex_attention' (or 'sdpa' / 'eager') to keep "
            f"{implementation} for the causal (alpha=0) and bidirectional (alpha>=1) phases, or load the model with "
            "attn_implementation='sdpa'."
        )
    else:
        raise ValueError(
            f"attn_implementation={implementation!r} has no known way to add the soft mask's float bias; use "
            "'sdpa', 'eager' or 'flex_attention', or set soft_mask_backend explicitly."
        )
    if backend == "flex_attention" and device_type == "cpu" and training:
        if requested == "flex_attention":
            raise ValueError(
                "soft_mask_backend='flex_attention' cannot train on CPU: torch's flex attention has no CPU backward. "
                "Use soft_mask_backend='auto' (dense sdpa bias on CPU) or train on a GPU."
            )
        backend = "sdpa"
    if backend == "sdpa" and (npu_sdpa_drops_float_masks() if npu is None else npu):
        backend = "eager"
    return backend


class SoftMaskState:
    """Per-model runtime state of the soft mask (kept on the decoder module, never saved).

    `alpha` / `backend` / `mask_length` / `inner_forward` are used for patched stock decoders only (a `ConanModel`
    keeps α, the backend and l in its config);
    `base_attn_implementation` is the model's own implementation, restored whenever a soft forward does not need a
    different one (α = 0, α >= 1, or after `remove_soft_mask`).
    """

    def __init__(self, alpha: float | None = None, backend: str = "auto"):
        self.alpha = alpha
        self.backend = backend
        self.mask_length: int | str = "sequence"
        self.base_attn_implementation: str | None = None
        self.active_attn_implementation: str | None = None
        self.backend_in_use: str | None = None
        self.restore_config: dict | None = None
        self.inner_forward = None


def soft_mask_state(model: torch.nn.Module, create: bool = True) -> SoftMaskState | None:
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None and create:
        state = SoftMaskState()
        model.__dict__[_STATE_ATTRIBUTE] = state
    return state


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def _switch_attention_implementation(model: torch.nn.Module, state: SoftMaskState, implementation: str) -> None:
    # The switch is "sticky" (not undone at the end of forward) so that gradient-checkpointing recomputation during
    # backward runs the same attention function as the forward pass did; every soft forward re-applies it, which makes
    # it idempotent across data-parallel threads sharing one config.
    if model.config._attn_implementation != implementation:
        model.config._attn_implementation = implementation
    state.active_attn_implementation = implementation


def restore_attention_implementation(model: torch.nn.Module) -> None:
    """Give the model back its own attention implementation if a soft forward switched it."""
    state = soft_mask_state(model, create=False)
    if state is None or state.base_attn_implementation is None:
        return
    if model.config._attn_implementation == state.active_attn_implementation:
        model.config._attn_implementation = state.base_attn_implementation
    state.active_attn_implementation = state.base_attn_implementation


def prepare_soft_attention(
    model: torch.nn.Module,
    alpha: float | None,
    backend: str,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    kwargs: dict,
    past_key_values=None,
    mask_length: int | str = "sequence",
    position_ids: torch.Tensor | None = None,
) -> tuple:
    """Turn a decoder forward's inputs into soft-mask inputs (eq.4) for the transformers decoder `model`.

    Used by `ConanModel` (attention_mode="soft") and by the forward wrapper of `conan_hf.apply_soft_mask`. Returns the
    `(attention_mask, kwargs)` to call the decoder's own forward with:

    - α <= 0 (or unset): unchanged inputs — plain causal attention.
    - α >= 1: `is_causal=False`, which transformers' `merge_with_config_defaults` turns into its bidirectional mask and
      non-causal kernels.
    - eager / sdpa: a prepared 4D float mask log M, which transformers' mask creation passes through as-is.
    - flex_attention: the padding `BlockMask` plus a `SoftMaskInputs` keyword argument read by the registered
      `SOFT_FLEX_ATTENTION` function, whose score_mod computes log M on the fly.

    `mask_length` is l of eq.4 (see `ConanConfig.soft_mask_length`). `position_ids` given by the caller that restart
    inside a row (packed documents, no `cu_seq_lens`) give every document its own mask at every α (the fast paths
    above would let documents see each other).

    The backend in use is logged whenever it changes.
    """
    state = soft_mask_state(model)
    config = model.config
    current = config._attn_implementation
    if state.base_attn_implementation is None or current != state.active_attn_implementation:
        # First soft forward, or the user changed the implementation since: that is the model's own one.
        state.base_attn_implementation = current
    alpha = float(alpha or 0.0)
    reference = input_ids if input_ids is not None else inputs_embeds
    if reference is None:
        raise ValueError("The soft mask needs `input_ids` or `inputs_embeds`.")
    device = reference.device
    requires_grad = torch.is_grad_enabled() and model.training
    batch_size, length = reference.shape[:2]
    documents = None
    flattened = "cu_seq_lens_q" in kwargs or "cu_seq_lens_k" in kwargs
    cached = past_key_values is not None and past_key_values.get_seq_length() > 0
    padding_2d = attention_mask is None or (
        isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) == (batch_size, length)
    )
    if position_ids is not None and position_ids.dim() == 2 and padding_2d and not flattened and not cached:
        padding = attention_mask if attention_mask is not None else torch.ones(batch_size, length, device=device)
        documents = packed_document_ids(position_ids, padding.to(device=device, dtype=torch.bool))
    choice = resolve_soft_mask_backend(
        state.base_attn_implementation, alpha, backend, device_type=device.type, training=requires_grad,
        packed=documents is not None,
    )
    kwargs = dict(kwargs)
    if choice in ("causal", "bidirectional"):
        restore_attention_implementation(model)
        if choice == "bidirectional":
            kwargs["is_causal"] = False
    else:
        _check_soft_inputs(config, attention_mask, length, kwargs, past_key_values)
        soft = SoftMaskInputs.from_padding_mask(
            attention_mask, batch_size, length, alpha, device, mask_length=mask_length,
            position_ids=position_ids if documents is not None else None,
        )
        if choice == "flex_attention":
            mask_function = bidirectional_mask_function
            if soft.documents is not None:  # lets the kernel skip blocks across documents too
                mask_function = and_masks(mask_function, packed_sequence_mask_function(soft.documents))
            attention_mask = flex_attention_mask(
                batch_size=batch_size,
                q_length=length,
                kv_length=length,
                mask_function=mask_function,
                attention_mask=soft.key_is_real,
                device=device,
            )
            kwargs[SOFT_MASK_KWARG] = soft
            _switch_attention_implementation(model, state, SOFT_FLEX_ATTENTION)
        else:
            if inputs_embeds is not None:
                dtype = inputs_embeds.dtype
            else:
                dtype = model.get_input_embeddings().weight.dtype
            attention_mask = soft.dense_bias(dtype)
            _switch_attention_implementation(model, state, choice)
    if choice != state.backend_in_use:
        detail = {
            "causal": "causal fast path",
            "bidirectional": "bidirectional fast path",
            "eager": "eager attention with a dense log-M bias",
            "sdpa": "sdpa with a dense log-M bias",
            "flex_attention": "flex_attention score_mod (no L x L tensor)",
        }[choice]
        if documents is not None:
            detail += ", one mask per packed document"
        logger.info(
            f"Soft mask (alpha={alpha:.4g}) on {type(model).__name__}: {detail} "
            f"[model attn_implementation={state.base_attn_implementation!r}]."
        )
        state.backend_in_use = choice
    return attention_mask, kwargs


def _check_soft_inputs(config, attention_mask, length: int, kwargs: dict, past_key_values) -> None:
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        got = f"a {attention_mask.dim()}D tensor" if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"The soft mask needs the 2D padding mask (batch, length) as attention_mask, got {got}.")
    if "cu_seq_lens_q" in kwargs or "cu_seq_lens_k" in kwargs:
        raise ValueError(
            "Packed (flattened) sequences cannot carry a soft mask with 0 < alpha < 1: eq.4 needs each sequence's "
            "length. Use padded batches (e.g. attn_implementation='sdpa' in sentence-transformers)."
        )
    if past_key_values is not None and past_key_values.get_seq_length() > 0:
        raise ValueError("A soft mask with 0 < alpha < 1 is for full-sequence encoding, not cached decoding.")
    window = _sliding_window(config)
    if window is not None and length > window:
        raise ValueError(
            f"The soft mask is defined for full attention, but this model uses a sliding window of {window} tokens "
            f"and the batch has {length}; shorten the inputs or disable the sliding window."
        )


def set_conan_soft_mask_alpha(model: ConanModel, alpha: float) -> None:
    """Set α on a `ConanModel` (in its config, so it is saved with the model)."""
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"The soft-mask alpha must be >= 0, got {alpha!r}.")
    if model.config.attention_mode != "soft":
        raise ValueError(
            f"This ConanModel has attention_mode={model.config.attention_mode!r}; alpha only acts in 'soft' mode. "
            "Build it with attention_mode='soft' or call conan_hf.apply_soft_mask(model) first."
        )
    model.config.soft_mask_alpha = alpha


class ConanPreTrainedModel(LlamaPreTrainedModel):
    config_class = ConanConfig
    config: ConanConfig
    base_model_prefix = "model"


class ConanModel(ConanPreTrainedModel, LlamaModel):
    """The Conan decoder backbone: token ids → `last_hidden_state`.

    Example:

    ```python
    >>> import torch
    >>> from conan_hf import ConanConfig, ConanModel
    >>> model = ConanModel(ConanConfig.tiny(attention_mode="bidirectional"))
    >>> out = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 1]]))
    >>> out.last_hidden_state.shape
    torch.Size([1, 3, 128])
    ```
    """

    def __init__(self, config: ConanConfig):
        LlamaModel.__init__(self, config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        # Either name of the KV cache is accepted (callers of both transformers generations); it is passed on as one.
        cache = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy_cache
        mode = self.config.attention_mode
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ConanModel needs exactly one of `input_ids` or `inputs_embeds`.")
        if mode != "causal":
            if cache is not None or use_cache:
                raise ValueError(f"A KV cache only makes sense for causal attention, not attention_mode={mode!r}.")
            use_cache = False
        given_position_ids = position_ids  # ours below never restart inside a row: no packed-document check for them
        if position_ids is None and cache is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = padding_aware_position_ids(attention_mask)
        if mode == "soft":
            attention_mask, kwargs = self._soft_attention_inputs(
                attention_mask, input_ids, inputs_embeds, kwargs, position_ids=given_position_ids
            )
        if cache is not None:
            kwargs[CACHE_ARGUMENT] = cache
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    def _soft_attention_inputs(self, attention_mask, input_ids, inputs_embeds, kwargs, position_ids=None):
        """Eq.4 soft mask for this forward: α, the backend and l come from the config (see `prepare_soft_attention`)."""
        return prepare_soft_attention(
            self,
            alpha=self.config.soft_mask_alpha,
            backend=getattr(self.config, "soft_mask_backend", "auto"),
            attention_mask=attention_mask,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            kwargs=kwargs,
            mask_length=getattr(self.config, "soft_mask_length", "sequence"),
            position_ids=position_ids,
        )


class ConanForCausalLM(ConanPreTrainedModel, LlamaForCausalLM):
    """`ConanModel` with an (untied by default) LM head, for the pre-training and SFT stages (paper §3.1)."""

    def __init__(self, config: ConanConfig):
        ConanPreTrainedModel.__init__(self, config)
        self.model = ConanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# `save_pretrained` copies this file and configuration_conan.py next to the weights.
ConanConfig.register_for_auto_class()
ConanModel.register_for_auto_class("AutoModel")
ConanForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ConanPreTrainedModel",
    "ConanModel",
    "ConanForCausalLM",
    "padding_aware_position_ids",
    "SOFT_MASK_BACKENDS",
    "SOFT_MASK_LENGTHS",
    "SoftMaskInputs",
    "packed_document_ids",
    "prepare_soft_attention",
    "resolve_soft_mask_backend",
    "soft_mask_flex_attention_forward",
    "soft_mask_bidirectional_rows",
    "soft_mask_log_weights",
    "soft_mask_weights",
]
