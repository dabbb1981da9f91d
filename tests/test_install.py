"""The environment is the locked one, and the package's model code uses no deprecated transformers API (a checkpoint
written today must keep loading when transformers removes what it deprecates)."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

LOCK = REPO_ROOT / "requirements" / "lock.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for number, line in enumerate(LOCK.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, pinned = line.partition("==")
        assert sep and pinned, f"{LOCK}:{number}: expected NAME==VERSION, got {line!r}"
        pins[name] = pinned
    return pins


def test_installed_versions_equal_the_lock():
    pins = _pins()
    assert {"torch", "transformers", "sentence-transformers", "peft", "accelerate", "datasets"} <= set(pins)
    mismatched = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        # A CUDA or CPU build of the pinned torch release carries a local label (+cpu, +cu128): same release.
        if installed is None or installed.split("+", 1)[0] != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"installed versions differ from {LOCK} (pinned, installed): {mismatched}"


def _own_code_warnings(caught) -> list[str]:
    """Deprecation/Future warnings attributed to this package's files or to checkpoint remote code."""
    own = (str(REPO_ROOT / "conan_hf"), str(REPO_ROOT / "trainers"), "transformers_modules")
    return [f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) and any(o in w.filename for o in own)]


def test_model_code_raises_no_deprecation_warnings(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, Qwen2Config, Qwen2Model

    from conan_hf import ConanConfig, ConanForCausalLM, ConanModel, apply_soft_mask, set_soft_mask_alpha
    from conan_hf.modeling_conan import CACHE_ARGUMENT

    torch.manual_seed(0)
    ids = torch.randint(5, 4000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in ("causal", "bidirectional", "soft"):
            model = ConanModel(ConanConfig.tiny(attention_mode=mode, soft_mask_alpha=0.5))
            model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
        lm = ConanForCausalLM(ConanConfig.tiny()).eval()
        with torch.no_grad():
            prefix = lm(input_ids=ids[:, :-1], use_cache=True)
            lm(input_ids=ids[:, -1:], use_cache=True, **{CACHE_ARGUMENT: prefix.past_key_values})
            lm.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
        lm.save_pretrained(tmp_path / "lm")
        AutoModel.from_pretrained(tmp_path / "lm", trust_remote_code=True)(input_ids=ids)
        AutoModelForCausalLM.from_pretrained(tmp_path / "lm", trust_remote_code=True)(input_ids=ids, labels=ids)
        qwen = Qwen2Model(Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
        handle = apply_soft_mask(qwen)
        set_soft_mask_alpha(qwen, 0.5)
        qwen(input_ids=ids, attention_mask=mask)
        handle.remove()
    found = _own_code_warnings(caught)
    assert not found, "deprecated transformers API used by the package's model code:\n" + "\n".join(found)


def test_the_check_sees_a_deprecated_call():
    """The filter above is not vacuous: the old cache argument name, where transformers deprecates it, is caught."""
    from transformers.models.llama.modeling_llama import LlamaModel

    from conan_hf import ConanConfig, ConanModel
    from conan_hf.modeling_conan import CACHE_ARGUMENT

    if CACHE_ARGUMENT != "cache":
        pytest.skip("this transformers still takes `past_key_values`")
    model = ConanModel(ConanConfig.tiny())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # What the checkpoint code did before: calling the Llama forward with the old name, from our own file.
        exec(compile("LlamaModel.forward(model, input_ids=ids, past_key_values=None)",
                     str(REPO_ROOT / "conan_hf" / "modeling_conan.py"), "exec"),
             {"LlamaModel": LlamaModel, "model": model, "ids": torch.tensor([[1, 2, 3]])})
    assert _own_code_warnings(caught)
