"""Shared helpers of the soft-mask tests (tests/test_soft_mask_*.py): the naive references of eq. 4 (M from the
formula with Python loops, and a "naive model" run that feeds log M as a prepared 4D float mask to an unpatched eager
model), the test batch and the model builders.

Flex attention compiles per new shape on CPU, so every model test uses the same (batch, length) and head layout.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from conan_hf import ConanConfig, ConanModel
from conan_hf.modeling_conan import padding_aware_position_ids
from conan_hf.soft_mask import (
    apply_soft_mask,
)

BATCH, LENGTH, VOCAB = 3, 12, 512
# One head layout for every model kind (4 query heads, 1 key/value head, head_dim 32), so flex compiles once.
STOCK = dict(hidden_size=128, intermediate_size=288, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             vocab_size=VOCAB, max_position_embeddings=64)
KINDS = ("conan", "qwen2", "llama")
IMPLS = ("eager", "sdpa", "flex_attention")
LOGGER = "conan_hf.modeling_conan"


# ----------------------------------------------------------------------------------------------------------- helpers


def naive_m(length: int, alpha: float, span: int | None = None) -> list[list[float]]:
    """Eq.4 straight from the definition: rows i (queries), columns j (keys), 1-based; Eq.4's l is `span`, which
    defaults to `length`."""
    span = length if span is None else span
    return [[1.0 if i >= j else min(alpha * span / i, 1.0) for j in range(1, length + 1)]
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
