"""Loading the embedding model a stage trains (a Conan checkpoint, a stock decoder, an encoder, or a saved
SentenceTransformer) and switching its attention between causal, bidirectional and the soft mask."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from conan_hf.errors import DataError, DataFileNotFoundError

logger = logging.getLogger(__name__)
# ---- embedding models -----------------------------------------------------------------------------------------------
def load_sentence_model(
    path: str,
    attention_mode: str | None = "bidirectional",
    pooling: str | None = None,
    max_seq_length: int | None = 512,
    prompts: dict[str, str] | None = None,
    *,
    device: str | None = None,
    trust_remote_code: bool = False,
    option: str = "model",
):
    """The one loader of embedding models: the model a stage trains, and the model an evaluation encodes with.

    ``path`` (a local folder or a Hub id) is either

    - a SentenceTransformer folder (a stage 3/4 output, or any sentence-transformers model such as all-MiniLM-L6-v2):
      loaded as saved, with its pooling (``pooling``, if given, must agree with it); or
    - a transformers model folder: a Conan decoder (stage 2 output), a stock decoder (Llama, Qwen2, Qwen3, Mistral,
      ... — its ``*ForCausalLM`` checkpoint works, the LM head is dropped) or an encoder (BERT-like). Its backbone is
      wrapped as Transformer → Pooling → Normalize with ``pooling`` (``None``: ``lasttoken`` for causal attention,
      else ``mean``).

    The backbone is put in ``attention_mode`` (see `conan_hf.backbones.set_attention_mode`: ``soft`` applies the soft
    mask to a stock decoder; encoders are bidirectional only) and stock backbones get right padding, the side on which
    their position numbering matches the unpadded sequence. ``attention_mode=None`` loads a SentenceTransformer folder
    exactly as saved (evaluation of a finished model) and makes a bare model folder bidirectional.
    ``max_seq_length`` (``None``: the saved one) and ``prompts`` (added to any saved ones) are applied.

    Args:
        device: where the model is put (sentence-transformers' default: the accelerator if there is one).
        trust_remote_code: run a SentenceTransformer folder's own model code. ``False`` (the stages) loads Conan
            checkpoints with the installed conan_hf classes (registered with the Auto classes on import), so
            isinstance checks (soft-mask helpers) and fixes in the package apply.
        option: the option that named ``path``, for messages: a path that is not a model (a file, a folder without
            ``config.json`` / ``modules.json``, a missing path or unknown Hub id) or a backbone the attention mode
            does not apply to raises a `~conan_hf.errors.DataError` saying ``--<option> <path>: ...``.

    Example:
        >>> model = load_sentence_model("runs/weak/final", attention_mode=None)   # a finished model, as saved
    """
    where = f"--{option} {path}"
    check_model_path(path, where)
    if attention_mode in ("causal", "soft"):
        _check_decoder(path, attention_mode, where)
    try:
        return _load_sentence_model(path, attention_mode, pooling, max_seq_length, prompts, device=device,
                                    trust_remote_code=trust_remote_code, where=where)
    except OSError as error:  # transformers' "not found / not a valid JSON file / no Hub access" for a bad path
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot load a model from it ({first})", where=where,
                        hint="pass a model folder or a Hub id (with network access or a cached copy)") from error


def check_model_path(path: str, where: str) -> None:
    """Raise a `~conan_hf.errors.DataError` (at ``where``) when a local ``path`` cannot be a model: a file, or a
    folder with neither ``config.json`` nor ``modules.json``."""
    from conan_hf.training.checkpoints import looks_local

    local = Path(path)
    if not local.exists() and looks_local(path):
        raise DataFileNotFoundError("not found", where=where, hint="pass an existing model folder or a Hub id")
    if local.is_file():
        raise DataError("is a file, not a model folder", where=where,
                        hint="pass a model folder (with config.json or modules.json) or a Hub id")
    if local.is_dir() and not ((local / "config.json").is_file() or (local / "modules.json").is_file()):
        what = "an empty folder" if not any(local.iterdir()) else "a folder with neither config.json nor modules.json"
        raise DataError(f"{what}, not a model", where=where,
                        hint="pass a model folder (a stage output, or a transformers / sentence-transformers model)")


def _check_decoder(path: str, attention_mode: str, where: str) -> None:
    """Before any weight is read: refuse causal / soft attention for a local model whose backbone is an encoder (the
    backbone built from its ``config.json`` on the meta device, see `conan_hf.backbones.backbone_kind`). Anything
    that cannot be decided this way (remote code, a Hub id) is left to the check after loading."""
    if not (Path(path) / "config.json").is_file():
        return
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        from conan_hf.backbones import backbone_kind

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            kind = backbone_kind(AutoModel.from_config(config))
    except Exception:  # noqa: BLE001 -- undecidable here: set_attention_mode says it after loading
        return
    if kind == "encoder":
        raise DataError(f"{type(config).__name__.removesuffix('Config')} (model_type={config.model_type!r}) is an "
                        f"encoder: its attention is bidirectional only, so attention_mode={attention_mode!r} (and the "
                        "soft mask of stage 3) does not apply", where=where,
                        hint="fine-tune encoders with stage 4 and attention_mode: bidirectional")


def _load_sentence_model(path, attention_mode, pooling, max_seq_length, prompts, *, device, trust_remote_code, where):
    """`load_sentence_model` without the checks of its path."""
    from sentence_transformers import SentenceTransformer

    from conan_hf.backbones import padding_side_for
    from conan_hf.sentence import build_sentence_transformer

    as_saved = _is_sentence_transformer_folder(path)
    if as_saved:
        model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
        saved = pooling_mode(model)
        if pooling is not None and saved is not None and saved != pooling:
            raise DataError(f"a SentenceTransformer with {saved!r} pooling, but pooling={pooling!r} was asked for",
                            where=where, hint=f"set pooling: {saved} (or null) to keep the saved one")
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        if prompts:
            model.prompts = {**model.prompts, **prompts}
    else:
        attention_mode = attention_mode or "bidirectional"
        if pooling is None:
            pooling = "lasttoken" if attention_mode == "causal" else "mean"
        # attention_mode=None: a stock config must not receive Conan's `attention_mode` key (it would be saved).
        model = build_sentence_transformer(path, pooling=pooling, prompts=prompts, attention_mode=None, device=device,
                                           **({"max_seq_length": max_seq_length} if max_seq_length else {}))
    if attention_mode is None and as_saved:
        return model
    if attention_mode is not None:
        try:
            set_attention_mode(model, attention_mode)
        except ValueError as error:  # e.g. the soft mask asked of an encoder
            raise DataError(str(error), where=where) from error
    decoder = backbone(model)
    side = padding_side_for(decoder)
    if side is not None and model.tokenizer is not None and model.tokenizer.padding_side != side:
        logger.info("%s: padding side %s -> %s (stock position numbering)", path, model.tokenizer.padding_side, side)
        model.tokenizer.padding_side = side
    logger.info("%s: %s", path, describe_attention(model)["line"])
    return model


def _is_sentence_transformer_folder(path: str) -> bool:
    """A local folder with ``modules.json``, or a Hub repository that has one."""
    if Path(path).is_dir():
        return (Path(path) / "modules.json").is_file()
    if Path(path).exists():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers.utils import cached_file

        if isinstance(try_to_load_from_cache(path, "modules.json"), str):
            return True
        return cached_file(path, "modules.json", _raise_exceptions_for_missing_entries=False) is not None
    except Exception:  # not a Hub id, or offline without a cached copy: treat it as a transformers model
        return False


def pooling_mode(model) -> str | None:
    """The pooling mode of a SentenceTransformer's Pooling module (None without one)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    for module in model:
        if isinstance(module, Pooling):
            mode = module.pooling_mode
            return mode if isinstance(mode, str) else "+".join(mode)
    return None


def describe_attention(model) -> dict[str, Any]:
    """The backbone, its attention mode (and how it is set), pooling and padding side, with a one-line summary."""
    from conan_hf.backbones import backbone_kind, get_attention_mode

    decoder = backbone(model)
    kind, mode = backbone_kind(decoder), get_attention_mode(decoder)
    how = {"conan": f"ConanConfig.attention_mode={mode!r}",
           "decoder": f"transformers' config.is_causal={mode == 'causal'}",
           "encoder": "encoder, always bidirectional"}[kind]
    if mode == "soft":
        how = (f"eq.4 soft mask through {'ConanConfig' if kind == 'conan' else 'conan_hf.apply_soft_mask'}, "
               "α from 0 = causal to 1 = bidirectional")
    info = {"backbone": type(decoder).__name__, "kind": kind, "model_type": getattr(decoder.config, "model_type", None),
            "attention_mode": mode, "pooling": pooling_mode(model),
            "padding_side": model.tokenizer.padding_side if model.tokenizer is not None else None}
    info["line"] = (f"backbone {info['backbone']} ({kind}, model_type={info['model_type']!r}): {mode} attention "
                    f"({how}), {info['pooling']} pooling, padding {info['padding_side']}")
    return info


def backbone(model):
    """The transformers model inside a SentenceTransformer (its first module's ``auto_model``)."""
    return model[0].auto_model


def set_attention_mode(model, mode: str) -> None:
    """Switch the backbone of a SentenceTransformer between causal / bidirectional / soft attention: a Conan backbone
    through its ``attention_mode``, a stock decoder through transformers' ``config.is_causal`` (and the soft-mask
    wrapper for ``soft``); an encoder is bidirectional only (see `conan_hf.backbones.set_attention_mode`)."""
    from conan_hf.backbones import set_attention_mode as set_backbone_attention_mode

    set_backbone_attention_mode(backbone(model), mode)
