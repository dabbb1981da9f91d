"""Export a finished embedder so that it loads with stock transformers classes: no ``trust_remote_code``, no conan_hf.

    >>> from conan_hf.export import export_embedder
    >>> export_embedder(model, "conan-v2")          # model: the trained SentenceTransformer
    >>> SentenceTransformer("conan-v2")             # anywhere: plain sentence-transformers / transformers

What the folder holds:

- A Conan backbone becomes a stock ``LlamaModel`` (``model_type: "llama"``): `ConanModel` *is* LlamaModel's layers with
  LlamaModel's parameter names, so the weights are copied unchanged. Bidirectional attention is transformers' own
  switch, ``"is_causal": false`` in ``config.json`` (transformers >= 5.2 builds a bidirectional mask and runs the
  kernels non-causally; sentence-transformers then also defaults to mean pooling). A causal embedder (last-token
  pooling) keeps ``"is_causal": true``.
- A stock decoder backbone (Qwen2, Qwen3, Mistral, Llama, ...) keeps its own ``model_type`` with its ``is_causal``.
- An encoder (BERT-like) is saved as it is.
- The tokenizer is saved with ``padding_side: "right"`` and no custom class, so ``AutoTokenizer.from_pretrained``
  needs no remote code either.

What differs from `ConanModel` (and why the results are still identical):

- RoPE positions. `ConanModel` restarts positions at each sequence's first real token, so left and right padding
  give the same states. Stock Llama numbers the columns 0, 1, ..., padding included. With right padding (what the
  export saves) every sequence's real tokens get positions 0..n-1 in both models, and unpadded or flattened (flash
  attention varlen) batches are identical too; only left padding would shift the positions of the shorter sequences.
  `export_embedder` checks the equality on a padded probe batch before it returns.
- No ``attention_mode`` / soft mask / ``soft_mask_*`` keys: the export is the finished embedder (the soft mask ends
  bidirectional, §3.2). Keep the remote-code format (``export_format="remote_code"``, `ConanModel`'s own save) for the
  causal and soft checkpoints of stages 1-3.
- Saved prompts are checked before the export (`conan_hf.sentence.check_saved_prompts`): a prompt after which
  sentence-transformers would not pool exactly a probe text's tokens is an error, since stock loading runs no check.
- The empty text. A byte-level BPE tokenizer adds no special token, so ``""`` is zero tokens. Stock
  sentence-transformers embeds it as an all-padding row of a batch with other texts: with mean pooling over no
  token, the zero vector (cosine 0 to every text; ``encode(["", "hello"])`` works, with or without a prompt), and
  `FastEncoder` and `ConanSentenceTransformer` give that same zero vector also for ``""`` alone. A batch of only
  empty texts (``encode([""])``, or empty texts left over for the last batch) still fails in stock
  sentence-transformers (a tensor of 0 tokens reaches the model). No stock setting avoids that without changing the
  other texts' embeddings: the tokenizer's normalizer and pre-tokenizer never run on an empty string, padding never
  widens a batch of width 0, and a post-processor that appends a token (EOS) appends it to *every* text, which
  changes every embedding of a model trained without it (bidirectional attention and mean pooling both see it;
  measured on the demo model: cosine 0.988-0.998 to the embeddings without it, retrieval scores shifted by up to
  0.04). The export therefore saves the tokenizer as trained.
- `ConanModel` refuses a KV cache in bidirectional mode; the stock model does not check (sentence-transformers never
  asks for one). There is no LM head: ``AutoModel`` is the embedding backbone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaModel, PreTrainedModel

from .backbones import backbone_kind, get_attention_mode
from .modeling_conan import ConanModel
from .sentence import check_saved_prompts, excludes_prompt

EXPORT_FORMATS = ("stock", "remote_code")

#: Keys of a saved config that describe the checkpoint rather than the architecture; the export writes its own.
CHECKPOINT_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "_name_or_path", "is_causal")

#: Texts of mixed lengths (so the probe batch is padded) used to check an export against the trained model.
PROBE_TEXTS = ("a", "What do pandas eat? Giant pandas eat mostly bamboo shoots and leaves.", "大熊猫主要吃竹子。",
               "export check")


def conan_to_llama(model: ConanModel) -> LlamaModel:
    """A stock `LlamaModel` sharing `model`'s weights (no copy), with ``config.is_causal`` from its attention mode.

    Raises:
        ValueError: for ``attention_mode="soft"``, which has no stock equivalent.
    """
    mode = model.config.attention_mode
    if mode == "soft":
        raise ValueError(
            f"This ConanModel is in soft attention (alpha={model.config.soft_mask_alpha}); a stock model can only be "
            "causal or bidirectional. Switch it to 'bidirectional' (the end of the soft mask, alpha >= 1) first, or "
            "save it with export_format='remote_code'."
        )
    # Every LlamaConfig key is carried over; Conan's own keys (attention_mode, soft_mask_*) are left out, since
    # LlamaModel does not read them and is_causal carries the attention.
    llama_keys = set(LlamaConfig().to_dict()) - set(CHECKPOINT_KEYS)
    config = LlamaConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k in llama_keys})
    config.is_causal = mode == "causal"
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        llama = LlamaModel(config)
    # assign=True takes `model`'s tensors themselves; the rotary embedding holds non-persistent buffers (not in the
    # state dict), and ConanModel's is LlamaModel's class built from the same values, so it is shared as a module.
    llama.load_state_dict(model.state_dict(), strict=True, assign=True)
    llama.rotary_emb = model.rotary_emb
    left_on_meta = [name for name, t in [*llama.named_parameters(), *llama.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"conan_to_llama left tensors without values: {left_on_meta}")
    llama.train(model.training)
    return llama


def stock_backbone(model: PreTrainedModel) -> PreTrainedModel:
    """The backbone as stock transformers classes: a Conan backbone becomes a `LlamaModel` (see `conan_to_llama`);
    stock decoders get ``config.is_causal`` written explicitly; encoders are returned unchanged.

    Raises:
        ValueError: for a backbone in soft attention or with unmerged LoRA adapters.
    """
    _refuse_adapters(model)
    kind = backbone_kind(model)
    if kind == "conan":
        return conan_to_llama(model)
    if kind == "decoder":
        mode = get_attention_mode(model)
        if mode == "soft":
            raise ValueError(
                f"{type(model).__name__} still has the soft mask applied; a stock model can only be causal or "
                "bidirectional. Call conan_hf.backbones.set_attention_mode(model, 'bidirectional') first."
            )
        model.config.is_causal = mode == "causal"
    return model


def _refuse_adapters(model: torch.nn.Module) -> None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("The backbone still has LoRA adapters; merge them into the weights before exporting.")


@dataclasses.dataclass
class ExportResult:
    """What `export_embedder` wrote: the folder, its format and backbone, and the probe check.

    ``probe`` holds the trained model's embeddings of `PROBE_TEXTS` (``"plain"``, and ``"query"`` with the query
    prompt), so a process without conan_hf can compare what it loads with what training produced.
    """

    path: str
    export_format: str
    backbone: str
    model_type: str | None
    is_causal: bool | None
    padding_side: str | None
    max_abs_difference: float | None
    probe: dict[str, list[list[float]]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def export_embedder(
    model,
    path: str | os.PathLike,
    export_format: str = "stock",
    verify: bool = True,
    atol: float | None = None,
) -> ExportResult:
    """Save the SentenceTransformer `model` into `path` so that it loads without custom code.

    ``export_format="stock"`` (default) writes stock classes (see the module docstring); ``"remote_code"`` is
    sentence-transformers' plain save, which for a Conan backbone ships ``modeling_conan.py`` /
    ``configuration_conan.py`` (loads with ``trust_remote_code=True``). `model` itself is left as it was.

    With ``verify`` (default) the saved model's embeddings of a padded probe batch (with the ``query`` prompt when the
    model has one) are compared with `model`'s before saving; ``atol`` defaults to 1e-5 in float32 and 2e-2 in half
    precision.

    Raises:
        ValueError: an unknown format, a soft-mask or LoRA backbone, a saved prompt that does not end on a token
            boundary (`conan_hf.sentence.check_saved_prompts`).
        RuntimeError: the stock model does not reproduce `model`'s embeddings.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    path = Path(path)
    transformer = model[0]
    original = transformer.auto_model
    tokenizer = transformer.tokenizer
    original_side = tokenizer.padding_side if tokenizer is not None else None
    saved = original if export_format == "remote_code" else stock_backbone(original)
    if tokenizer is not None and excludes_prompt(model):
        check_saved_prompts(tokenizer, model.prompts, model.max_seq_length)
    reference = _probe_embeddings(model)
    difference = None
    if export_format == "remote_code":
        model.save(str(path))
    else:
        try:
            if tokenizer is not None:
                tokenizer.padding_side = "right"
            transformer.model = saved
            if verify:
                difference = _check_close(reference, _probe_embeddings(model), original, atol)
            model.save(str(path))
        finally:
            transformer.model = original
            if tokenizer is not None:
                tokenizer.padding_side = original_side
        _write_padding_side(path, "right")
        _check_no_remote_code(path)
    return ExportResult(
        path=str(path), export_format=export_format, backbone=type(saved).__name__,
        model_type=getattr(saved.config, "model_type", None), is_causal=getattr(saved.config, "is_causal", None),
        padding_side="right" if export_format == "stock" else original_side, max_abs_difference=difference,
        probe={name: values.tolist() for name, values in reference.items()},
    )


def _write_padding_side(path: Path, side: str) -> None:
    """Record the padding side in ``tokenizer_config.json`` (a tokenizer saves only its constructor arguments, so a
    side set afterwards would be lost, and a tokenizer whose config says ``left`` would load left)."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return
    values = json.loads(file.read_text(encoding="utf-8"))
    if values.get("padding_side") != side:
        values["padding_side"] = side
        file.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _probe_embeddings(model) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        out = {"plain": model.encode(list(PROBE_TEXTS), convert_to_tensor=True, normalize_embeddings=False)}
        if (model.prompts or {}).get("query"):
            out["query"] = model.encode(list(PROBE_TEXTS), prompt_name="query", convert_to_tensor=True,
                                        normalize_embeddings=False)
        return {k: v.float().cpu() for k, v in out.items()}
    finally:
        model.train(was_training)


def _check_close(reference: dict, exported: dict, backbone: PreTrainedModel, atol: float | None) -> float:
    if atol is None:
        atol = 1e-5 if next(backbone.parameters()).dtype == torch.float32 else 2e-2
    largest = 0.0
    for name, expected in reference.items():
        difference = (exported[name] - expected).abs().max().item()
        if not difference <= atol:
            raise RuntimeError(f"The stock export does not reproduce the model's {name} embeddings: max |difference| "
                               f"{difference:.3g} > {atol:g}")
        largest = max(largest, difference)
    return largest


def _check_no_remote_code(path: Path) -> None:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    leftovers = [p.name for p in path.glob("*.py")] + (["auto_map"] if "auto_map" in config else [])
    if leftovers:
        raise RuntimeError(f"{path}: the stock export still carries custom code: {leftovers}")


__all__ = ["EXPORT_FORMATS", "PROBE_TEXTS", "ExportResult", "conan_to_llama", "export_embedder", "stock_backbone"]
