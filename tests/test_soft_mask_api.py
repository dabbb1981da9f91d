"""Soft-mask model-level API and training: apply/remove on stock decoders, set_soft_mask_alpha through wrappers,
saving the alpha, a stock decoder in a SentenceTransformer, and SoftMaskCallback (schedule, resume, bad settings)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from soft_mask_helpers import (
    LENGTH,
    VOCAB,
    batch,
    build,
    close,
    naive_bias,
    run,
)

from conan_hf import ConanConfig, ConanForCausalLM, ConanModel
from conan_hf.modeling_conan import SOFT_FLEX_ATTENTION
from conan_hf.soft_mask import (
    apply_soft_mask,
    get_soft_mask_alpha,
    remove_soft_mask,
    set_soft_mask_alpha,
)

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
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss,
    )

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
