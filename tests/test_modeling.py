"""ConanConfig / ConanModel / ConanForCausalLM: architecture, Auto classes, attention modes, remote code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaModel

from conan_hf import ConanConfig, ConanForCausalLM, ConanModel

RELEASED_BACKBONE_PARAMETERS = 1_499_205_120


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_released_architecture_parameter_count():
    with torch.device("meta"):
        backbone = ConanModel(ConanConfig())
        lm = ConanForCausalLM(ConanConfig())
    assert _count(backbone) == RELEASED_BACKBONE_PARAMETERS
    # The LM head is untied: one more vocab x hidden matrix.
    assert _count(lm) == RELEASED_BACKBONE_PARAMETERS + 150_000 * 3584


def test_released_defaults_and_hand_count():
    c = ConanConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        150_000, 3584, 8, 32, 8)
    assert (c.intermediate_size, c.max_position_embeddings, c.hidden_act) == (8192, 32_768, "silu")
    assert not c.attention_bias and not c.mlp_bias and not c.tie_word_embeddings
    # Independent count from the architecture: embeddings + 8 x (q, k, v, o, gate, up, down, 2 norms) + final norm.
    h, kv, ffn, v = 3584, 8 * (3584 // 32), 8192, 150_000
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * ffn + 2 * h
    assert v * h + 8 * per_layer + h == RELEASED_BACKBONE_PARAMETERS


def test_tiny_preset_is_a_few_million_parameters():
    n = _count(ConanModel(ConanConfig.tiny()))
    assert 500_000 < n < 10_000_000


def test_auto_classes_resolve_conan():
    tiny = {k: v for k, v in ConanConfig.tiny().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("conan", **tiny)
    assert isinstance(config, ConanConfig) and config.hidden_size == 128
    assert type(AutoModel.from_config(config)) is ConanModel
    assert type(AutoModelForCausalLM.from_config(config)) is ConanForCausalLM


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"hidden_size": 130, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"attention_mode": "sideways"}, "attention_mode must be one of"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"soft_mask_alpha": -0.1}, "soft_mask_alpha must be >= 0"),
    ],
)
def test_bad_config_values_raise_clear_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ConanConfig.tiny(**kwargs)


def test_llama_weights_load_with_a_config_change_only():
    conan_config = ConanConfig.tiny()
    llama_config = LlamaConfig(**{k: v for k, v in conan_config.to_dict().items()
                                  if k not in ("model_type", "auto_map", "attention_mode", "soft_mask_alpha",
                                               "transformers_version", "architectures")})
    torch.manual_seed(0)
    llama = LlamaModel(llama_config).eval()
    conan = ConanModel(conan_config).eval()
    missing, unexpected = conan.load_state_dict(llama.state_dict(), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, conan_config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(conan(input_ids=ids).last_hidden_state, llama(input_ids=ids).last_hidden_state)
    # The backbone of a causal-LM checkpoint is the same set of tensors under the "model." prefix.
    lm = ConanForCausalLM(conan_config)
    assert {f"model.{k}" for k in conan.state_dict()} | {"lm_head.weight"} == set(lm.state_dict())


def _shared_weights(mode: str, impl: str, state_dict: dict) -> ConanModel:
    model = ConanModel(ConanConfig.tiny(attention_mode=mode)).eval()
    model.load_state_dict(state_dict)
    model.set_attn_implementation(impl)
    return model


def _padded_batch(side: str):
    torch.manual_seed(1)
    ids = torch.randint(0, 4096, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    if side == "right":
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :7] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference_weights():
    torch.manual_seed(0)
    return ConanModel(ConanConfig.tiny()).state_dict()


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_implementations_agree_and_padding_is_invisible(mode, side, reference_weights):
    ids, mask = _padded_batch(side)
    outputs = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        with torch.no_grad():
            outputs[impl] = _shared_weights(mode, impl, reference_weights)(
                input_ids=ids, attention_mask=mask).last_hidden_state
        assert not torch.isnan(outputs[impl]).any()
    real = mask.bool()
    for impl in ("sdpa", "flex_attention"):
        torch.testing.assert_close(outputs[impl][real], outputs["eager"][real], atol=1e-5, rtol=1e-4)
    # Each padded row equals the same sequence run alone without padding (positions restart at the first real token).
    model = _shared_weights(mode, "sdpa", reference_weights)
    for row in range(3):
        with torch.no_grad():
            alone = model(input_ids=ids[row : row + 1, real[row]]).last_hidden_state[0]
        torch.testing.assert_close(outputs["sdpa"][row][real[row]], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causal_ignores_later_tokens_bidirectional_does_not(impl, reference_weights):
    ids = torch.randint(0, 4096, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 4096
    results = {}
    for mode in ("causal", "bidirectional"):
        model = _shared_weights(mode, impl, reference_weights)
        with torch.no_grad():
            a = model(input_ids=ids).last_hidden_state
            b = model(input_ids=changed).last_hidden_state
        results[mode] = (a, b)
    a, b = results["causal"]
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)
    a, b = results["bidirectional"]
    assert (a[:, :-1] - b[:, :-1]).abs().max() > 1e-4
    # ... and the two modes give different states for the same input.
    assert (results["causal"][0] - results["bidirectional"][0]).abs().max() > 1e-4


def test_causal_lm_trains_and_kv_cache_matches_full_forward():
    from conan_hf.modeling_conan import CACHE_ARGUMENT

    torch.manual_seed(0)
    lm = ConanForCausalLM(ConanConfig.tiny())
    ids = torch.randint(0, 4096, (2, 12))
    out = lm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert lm.model.embed_tokens.weight.grad is not None and torch.isfinite(out.loss)
    lm.eval()
    with torch.no_grad():
        full = lm(input_ids=ids).logits[:, -1]
        prefix = lm(input_ids=ids[:, :-1], use_cache=True)
        step = lm(input_ids=ids[:, -1:], use_cache=True, **{CACHE_ARGUMENT: prefix.past_key_values}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_bidirectional_mode_refuses_a_kv_cache():
    model = ConanModel(ConanConfig.tiny(attention_mode="bidirectional"))
    with pytest.raises(ValueError, match="KV cache only makes sense for causal"):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, json
    sys.modules["conan_hf"] = None  # make `import conan_hf` fail: only the checkpoint's own code may be used
    try:
        import conan_hf  # noqa: F401
        raise SystemExit("conan_hf was importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    path, out = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.tensor([[11, 42, 7, 99, 5, 3]])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
        logits = lm(input_ids=ids).logits
    torch.save({"hidden": hidden, "logits": logits, "model_class": type(model).__module__ + "." + type(model).__name__,
                "mode": model.config.attention_mode}, out)
    """
)


def test_remote_code_checkpoint_loads_without_conan_hf(tmp_path):
    torch.manual_seed(0)
    lm = ConanForCausalLM(ConanConfig.tiny(attention_mode="bidirectional")).eval()
    ckpt = tmp_path / "ckpt"
    lm.save_pretrained(ckpt)
    files = {p.name for p in ckpt.iterdir()}
    assert {"configuration_conan.py", "modeling_conan.py", "model.safetensors", "config.json"} <= files
    auto_map = json.loads((ckpt / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_conan.ConanModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_conan.ConanForCausalLM"
    # The shipped code imports only the standard library, torch, transformers (and its own sibling file).
    for name in ("configuration_conan.py", "modeling_conan.py"):
        tree = ast.parse((ckpt / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            third_party = roots - set(sys.stdlib_module_names)
            assert third_party <= {"torch", "transformers", "huggingface_hub", "."}, (name, roots)

    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    out = tmp_path / "out.pt"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(out)
    assert remote["model_class"].startswith("transformers_modules.") and remote["mode"] == "bidirectional"
    ids = torch.tensor([[11, 42, 7, 99, 5, 3]])
    with torch.no_grad():
        torch.testing.assert_close(remote["hidden"], lm.model(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(remote["logits"], lm(input_ids=ids).logits, atol=1e-5, rtol=0)
