"""Paper App. A defaults of stages 3 and 4, and the stage-3 teacher filter's single instruction (issue 10 §4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conan_hf.training.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_stages_3_and_4_default_to_the_pretraining_optimizer_settings():
    """App. A: stages 3 and 4 use "the same optimizer parameters and learning rate as in the pre-training phase"."""
    from conan_hf.stages.pretrain import PretrainConfig
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.stages.weak import WeakConfig

    def optimizer(config):
        return config.learning_rate, config.warmup_ratio, config.weight_decay

    pretrain = load_config(PretrainConfig, REPO / "trainers/configs/pretrain.yaml")
    assert optimizer(pretrain) == optimizer(PretrainConfig()) == (1e-4, 0.05, 0.001)
    for cls, stage in ((WeakConfig, "weak"), (SupervisedConfig, "supervised")):
        assert optimizer(cls()) == optimizer(pretrain), stage
        assert optimizer(load_config(cls, REPO / f"trainers/configs/{stage}.yaml")) == optimizer(pretrain), stage


def test_weak_stage_soft_mask_length_is_a_config_option(tmp_path):
    from conan_hf.stages.weak import WeakConfig

    yaml_file = tmp_path / "weak.yaml"
    yaml_file.write_text("soft_mask_length: max_seq_length\nmax_seq_length: 48\n")
    assert load_config(WeakConfig, yaml_file).soft_mask_length == "max_seq_length"
    assert load_config(WeakConfig, REPO / "trainers/configs/weak.yaml").soft_mask_length == "sequence"
    assert load_config(WeakConfig, None, overrides={"soft_mask_length": "256"}).soft_mask_length == 256  # CLI string


def test_teacher_sees_one_instruction_per_stage3_query(tiny_model_dir):
    """Stage 3's queries carry their row's instruction as a prompt; a teacher with its own query prompt must see that
    one instruction, not two."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from conan_hf.demo import demo_instructions
    from conan_hf.stages import weak

    torch.set_num_threads(1)
    teacher = SentenceTransformer(str(tiny_model_dir),
                                  prompts={"query": "Instruct: Given a web search query, retrieve passages\nQuery: "})
    encoded: list[str] = []

    def record(module, args):  # the token ids the teacher actually embeds, decoded back to text
        for ids in args[0]:
            encoded.append(teacher.tokenizer.decode(ids, skip_special_tokens=True))

    teacher[0].auto_model.embed_tokens.register_forward_pre_hook(record)
    rows = [r for r in demo_instructions() if r.get("instruction")][:6]
    pairs = weak.to_pairs(rows)
    dataset = Dataset.from_list(pairs)
    kept, report = weak.filter_pairs_by_teacher(dataset, teacher, threshold=-1.0,
                                                prompt_format=weak.WeakConfig.prompt_format)
    assert report.total == len(pairs) == len(kept)
    anchors = {weak.WeakConfig.prompt_format.format(instruction=p["instruction"]) + p["anchor"] for p in pairs}
    queries = [text for text in encoded if "Query:" in text]
    assert len(queries) == len(anchors) > 0
    for text in queries:
        assert text.count("Instruct:") == 1, text
        assert text.strip() in {a.strip() for a in anchors}  # exactly the anchor the student trains on
    documents = [text for text in encoded if "Query:" not in text]
    assert documents and not any("Instruct:" in text for text in documents)
    # What the stage must avoid, and what it did: the teacher's own query prompt on top of the anchor's instruction.
    from conan_hf.data.teacher import filter_by_teacher

    encoded.clear()
    inline = dataset.map(lambda r: {"anchor": weak.WeakConfig.prompt_format.format(instruction=r["instruction"])
                                    + r["anchor"]})
    filter_by_teacher(inline, teacher, threshold=-1.0, query_column="anchor", show_progress_bar=False, verbose=False)
    assert {text.count("Instruct:") for text in encoded if "Query:" in text} == {2}


def test_teacher_scores_take_one_prompt_per_row(tiny_model_dir):
    """Rows whose instruction is a prompt (not in the text) give the teacher that prompt, once, instead of its own."""
    import torch
    from sentence_transformers import SentenceTransformer

    from conan_hf.data.teacher import teacher_scores

    torch.set_num_threads(1)
    own = "Instruct: Given a web search query, retrieve passages\nQuery: "
    teacher = SentenceTransformer(str(tiny_model_dir), prompts={"query": own})
    queries = ["capital of france", "boiling point of water", "largest planet", "capital of france"]
    positives = ["paris is the capital", "water boils at 100 degrees", "jupiter", "paris is the capital"]
    answer = "Instruct: Answer the question\nQuery: "
    prompts = [answer, None, answer, "Instruct: Find a definition\nQuery: "]
    scores = teacher_scores(teacher, queries, positives, query_prompt=prompts, show_progress_bar=False)
    # Independent reference: each pair encoded on its own with exactly the prompt it should get.
    for query, positive, prompt, score in zip(queries, positives, prompts, scores):
        q = teacher.encode([query], prompt=prompt if prompt is not None else own, convert_to_tensor=True)
        p = teacher.encode([positive], convert_to_tensor=True)
        assert score == pytest.approx(float(teacher.similarity(q, p)[0, 0]), abs=1e-5)
    assert abs(scores[0] - scores[3]) > 1e-6  # same query text, different instructions: both were encoded
    with pytest.raises(ValueError, match="4 queries but 2 query prompts"):
        teacher_scores(teacher, queries, positives, query_prompt=prompts[:2], show_progress_bar=False)
