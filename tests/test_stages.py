"""The training stages (trainers/): packing, SFT label masking, per-task batching, checkpoints and crash-safe resume,
and the whole pipeline (the main job) handing each stage's output to the next."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conan_hf.training.checkpoints import (
    COMMIT_MARKER,
    STAGE_RECORD,
    CheckpointCommitCallback,
    latest_checkpoint,
    resolve_resume,
)
from conan_hf.training.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # DeepSpeed JIT-compiles a communication op on first use (~30 s); keep it across runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return env


# ---- stage 1: packing ------------------------------------------------------------------------------------------------
def test_pack_documents_hand_computed():
    from conan_hf.stages.pretrain import pack_documents

    packed = pack_documents([[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 10, 11, 12, 13, 2]], seq_length=8, pad_token_id=0)
    # The second document crosses the block boundary: its last token opens block 2 as a new segment; the tail of
    # block 2 is a padding segment. Labels are -100 on every segment's first token and on padding.
    assert packed["input_ids"] == [[1, 5, 6, 7, 2, 1, 8, 9], [2, 1, 10, 11, 12, 13, 2, 0]]
    assert packed["position_ids"] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 0]]
    assert packed["labels"] == [[-100, 5, 6, 7, 2, -100, 8, 9], [-100, -100, 10, 11, 12, 13, 2, -100]]
    with pytest.raises(ValueError, match="seq_length"):
        pack_documents([[1, 2]], seq_length=1, pad_token_id=0)


def test_packed_documents_do_not_see_each_other():
    """Packed forward (as the Trainer calls it: ids, position ids, labels, no mask) == each document on its own."""
    from conan_hf.stages.pretrain import new_causal_lm, pack_documents, tokenize_documents
    from conan_hf.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, vocab_size=300,
                                show_progress=False)
    torch.manual_seed(0)
    model = new_causal_lm("tiny", tokenizer)
    docs = tokenize_documents(tokenizer, ["the cat sat", "a dog ran in the park", "the mat"])
    length = sum(map(len, docs)) + 3
    packed = {k: torch.tensor(v) for k, v in pack_documents(docs, length, tokenizer.pad_token_id).items()}
    assert packed["input_ids"].shape == (1, length)
    model.train()  # the training path (dropout is 0 in the config)
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])

    start, token_losses = 0, []
    for doc in docs:
        alone = model(input_ids=torch.tensor([doc])).logits[0]
        torch.testing.assert_close(out.logits[0, start: start + len(doc)], alone, atol=1e-5, rtol=1e-5)
        token_losses.append(torch.nn.functional.cross_entropy(alone[:-1], torch.tensor(doc[1:]), reduction="none"))
        start += len(doc)
    # Naive reference: mean next-token loss within each document, never across a boundary or on padding.
    torch.testing.assert_close(out.loss, torch.cat(token_losses).mean(), atol=1e-5, rtol=1e-5)


# ---- stage 2: SFT label masking --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer with a hand-written vocabulary, so the expected ids can be written down."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|bos|>": 0, "<|endoftext|>": 1, "<|pad|>": 2, "<|unk|>": 3, "<|instruction|>": 4, "<|input|>": 5,
             "<|response|>": 6, "translate": 7, "hello": 8, "world": 9, "bonjour": 10, "monde": 11, "le": 12}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>",
                                   additional_special_tokens=["<|instruction|>", "<|input|>", "<|response|>"])


def test_sft_labels_mask_everything_but_the_response(word_tokenizer):
    from conan_hf.stages.sft import build_sft_example

    ex = build_sft_example(word_tokenizer, "translate", "hello world", "bonjour le monde", max_length=64)
    #                        bos instr translate input hello world response | bonjour le monde eos
    assert ex["input_ids"] == [0, 4, 7, 5, 8, 9, 6, 10, 12, 11, 1]
    assert ex["labels"] == [-100, -100, -100, -100, -100, -100, -100, 10, 12, 11, 1]
    assert ex["attention_mask"] == [1] * 11
    cut = build_sft_example(word_tokenizer, "translate", "hello world", "bonjour le monde", max_length=9)
    assert cut["input_ids"] == [0, 4, 7, 5, 8, 9, 6, 10, 12]
    assert cut["labels"] == [-100] * 7 + [10, 12]


def test_sft_loss_counts_only_response_tokens(word_tokenizer):
    """The model's loss on a padded SFT batch equals a cross-entropy computed by hand over the response tokens."""
    from transformers import DataCollatorForSeq2Seq

    from conan_hf import ConanConfig, ConanForCausalLM
    from conan_hf.stages.sft import build_sft_example

    examples = [build_sft_example(word_tokenizer, "translate", "hello world", "bonjour le monde", 64),
                build_sft_example(word_tokenizer, "translate", "hello", "bonjour", 64)]
    batch = DataCollatorForSeq2Seq(word_tokenizer, padding=True, label_pad_token_id=-100)(examples)
    assert batch["labels"][1].tolist() == [-100] * 6 + [10, 1] + [-100] * 3  # padded with -100
    torch.manual_seed(0)
    model = ConanForCausalLM(ConanConfig.tiny(vocab_size=64, pad_token_id=2, use_cache=False))
    out = model(**batch)
    terms = []
    for ex in examples:
        ids, n_prompt = ex["input_ids"], ex["labels"].count(-100)
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        # token t is predicted from position t-1; only response tokens (t >= n_prompt) count
        for t in range(n_prompt, len(ids)):
            terms.append(torch.nn.functional.cross_entropy(logits[t - 1], torch.tensor(ids[t])))
    assert len(terms) == 4 + 2
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


# ---- stage 4: per-task batches ---------------------------------------------------------------------------------------
def test_supervised_batches_have_per_task_sizes_and_negatives(tiny_model_dir, tmp_path, restore_threads):
    """Every batch comes from one task, with that task's batch size; InfoNCE tasks carry 7 negatives from the pool."""
    from conan_hf.stages import supervised
    from conan_hf.training.config import config_from_dict

    config = config_from_dict(supervised.SupervisedConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path), "max_seq_length": 32, "num_threads": 1,
        "bf16": False,
        # DHNM's re-queued rows enlarge batches (tests/test_dhnm_requeue.py); here the sampler's own sizes are checked.
        "dhnm_requeue": False,
        "tasks": [{"name": "qa", "type": "retrieval", "batch_size": 3, "prompt": "find the answer"},
                  {"name": "cls", "type": "classification", "batch_size": 5},
                  {"name": "sim", "type": "sts", "batch_size": 16}],
    })
    too_short = config_from_dict(supervised.SupervisedConfig, {**dataclasses.asdict(config), "max_seq_length": 4})
    with pytest.raises(ValueError, match="prompt of task 'qa' is .* tokens, which leaves no room"):
        supervised.run(too_short)  # mean pooling excludes the prompt: nothing would be left to pool
    seen = {}
    original = supervised.MultiTaskCollator.__call__

    def spy(self, features):
        batch = original(self, features)
        name = features[0]["dataset_name"]
        first = "sentence1" if name == "sim" else "anchor"
        seen.setdefault(name, set()).add(batch[f"{first}_input_ids"].shape[0])
        if name != "sim":
            assert sum(k.startswith("negative_") and k.endswith("_input_ids") for k in batch) == 7
            assert batch["label"].shape == (len(features), 8)
        return batch

    supervised.MultiTaskCollator.__call__ = spy
    try:
        config.max_steps = 12
        config.save_steps = 100
        config.logging_steps = 100
        config.disable_tqdm = True
        summary = supervised.run(config)
    finally:
        supervised.MultiTaskCollator.__call__ = original
    assert seen == {"qa": {3}, "cls": {5}, "sim": {16}}
    assert summary["tasks"]["qa"]["batch_size"] == 3
    assert summary["matryoshka_dims"] == [16, 32, 64, 128]
    # The saved model has the task prompt under mteb's key for its type, and `query` points at it.
    record = json.loads((Path(summary["final_dir"]) / STAGE_RECORD).read_text())
    assert record["summary"]["prompts"]["Retrieval-query"] == "Instruct: find the answer\nQuery:\n"
    assert record["summary"]["prompts"]["query"] == record["summary"]["prompts"]["Retrieval-query"]
    assert record["summary"]["tasks"]["qa"]["prompt"] == "Instruct: find the answer\nQuery:\n"


def test_lora_trains_only_adapters_and_merges_exactly(tiny_model_dir, tmp_path, restore_threads):
    """Table 6's LoRA variant: adapters merged into the weights give the same embeddings as the adapted model, and a
    LoRA run of stage 4 changes only the adapted linear layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from conan_hf.stages import supervised
    from conan_hf.training.config import config_from_dict
    from conan_hf.training.models import load_sentence_model

    model = load_sentence_model(str(tiny_model_dir), max_seq_length=32)
    supervised.add_lora(model, {"r": 4, "lora_alpha": 8})
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter); make it do something
            parameter.data.normal_(std=0.05)
    texts = ["What do pandas eat?", "大熊猫主要吃竹子。"]
    adapted = model.encode(texts, convert_to_tensor=True)
    assert supervised.merge_lora(model) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    torch.testing.assert_close(model.encode(texts, convert_to_tensor=True), adapted, atol=1e-5, rtol=1e-5)

    config = config_from_dict(supervised.SupervisedConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "lora"), "max_seq_length": 64, "bf16": False,
        "num_threads": 1, "max_steps": 3, "logging_steps": 1, "disable_tqdm": True, "learning_rate": 1e-3,
        "lora": {"r": 4, "lora_alpha": 8},
        "tasks": [{"name": "qa", "type": "retrieval"}, {"name": "sim", "type": "sts"}]})
    final = Path(supervised.run(config)["final_dir"])
    assert not (final / "adapter_config.json").exists()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed


def test_weak_stage_teacher_filter_drops_low_scored_pairs(tiny_model_dir, tmp_path, restore_threads):
    """Stage 3's optional teacher filter keeps exactly the pairs the teacher scores >= the threshold."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from conan_hf.demo import demo_instructions
    from conan_hf.stages import weak
    from conan_hf.training.config import config_from_dict

    torch.set_num_threads(1)
    pairs = weak.to_pairs(demo_instructions())
    teacher = SentenceTransformer(str(tiny_model_dir))
    # The teacher sees each query with its row's instruction as its prompt (one instruction, as the student).
    queries = np.stack([teacher.encode(p["anchor"], normalize_embeddings=True,
                                       prompt=weak.WeakConfig.prompt_format.format(instruction=p["instruction"]))
                        for p in pairs])
    scores = np.sum(queries * teacher.encode([p["positive"] for p in pairs], normalize_embeddings=True), axis=1)
    threshold = float(np.quantile(scores, 0.3))
    config = config_from_dict(weak.WeakConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "weak"), "teacher": str(tiny_model_dir),
        "teacher_threshold": threshold, "max_steps": 2, "per_device_train_batch_size": 8, "max_seq_length": 48,
        "bf16": False, "num_threads": 1, "disable_tqdm": True, "soft_mask_length": "max_seq_length"})
    summary = weak.run(config)
    expected = int((scores >= threshold).sum())
    assert 0 < expected < len(pairs)
    assert summary["num_pairs"] == summary["teacher_filter"]["kept"] == expected
    assert summary["final_alpha"] == 1.0  # tau defaults to the run's steps
    # soft_mask_length: max_seq_length -> eq.4's l is the stage's max_seq_length, saved with the backbone.
    assert json.loads((tmp_path / "weak" / "final" / "config.json").read_text())["soft_mask_length"] == 48
    config.teacher_threshold = 2.0  # no cosine reaches it
    with pytest.raises(ValueError, match="dropped every pair"):
        weak.run(config)


# ---- configs and checkpoints -----------------------------------------------------------------------------------------
def test_config_files_and_errors(tmp_path):
    from conan_hf.stages.pretrain import PretrainConfig

    paper = load_config(PretrainConfig, REPO / "trainers/configs/pretrain.yaml")
    assert (paper.learning_rate, paper.warmup_ratio, paper.weight_decay) == (1e-4, 0.05, 0.001)
    tiny = parse_config(PretrainConfig, "pretrain", ["--preset", "tiny", "--max_steps", "7", "--bf16", "false"])
    assert (tiny.model, tiny.max_steps, tiny.bf16, tiny.learning_rate) == ("tiny", 7, False, 3e-3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['learning_rat'\]"):
        load_config(PretrainConfig, bad)
    with pytest.raises(ValueError, match="no preset 'huge'"):
        load_config(PretrainConfig, REPO / "trainers/configs/pretrain.yaml", preset="huge")
    with pytest.raises(ValueError, match="max_steps"):
        parse_config(PretrainConfig, "pretrain", ["--max_steps", "many"])
    for stage in ("tokenizer", "pretrain", "sft", "weak", "supervised"):  # every shipped config has a tiny preset
        from conan_hf.stages.run_all import build_configs

        assert build_configs([stage], str(tmp_path), str(tmp_path / "out"))[stage] is not None


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    from types import SimpleNamespace

    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    args, control = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace()
    for step in (10, 20):  # committed the way the Trainer does it: on_save after the folder is written
        CheckpointCommitCallback().on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=True),
                                           control)
    assert json.loads((tmp_path / "checkpoint-20" / COMMIT_MARKER).read_text())["global_step"] == 20
    # checkpoint-30 was being written when the process died: no marker, so it is skipped.
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    config = SimpleNamespace(resume="auto", output_dir=str(tmp_path))
    assert resolve_resume(config) == str(tmp_path / "checkpoint-20")
    config.resume = str(tmp_path / "checkpoint-30")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(config)
    assert latest_checkpoint(tmp_path / "missing") is None

    # A checkpoint of a run with other options is not continued by resume="auto".
    from conan_hf.stages.sft import SFTConfig

    (tmp_path / "checkpoint-40").mkdir()
    run_a = SFTConfig(output_dir=str(tmp_path), max_steps=4)
    CheckpointCommitCallback(run_a.fingerprint()).on_save(
        args, SimpleNamespace(global_step=40, is_world_process_zero=True), control)
    same_run = SFTConfig(output_dir=str(tmp_path), max_steps=4, logging_steps=1)  # logging does not change the run
    assert resolve_resume(same_run) == str(tmp_path / "checkpoint-40")
    with pytest.raises(ValueError, match="different options"):
        resolve_resume(SFTConfig(output_dir=str(tmp_path), max_steps=100))


@pytest.mark.slow
def test_kill_9_mid_stage_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, restore_threads):
    """Stage 4 (DHNM pools, optimizer, multi-task sampler) killed with SIGKILL after its first checkpoint and
    restarted gives exactly the uninterrupted run's losses and weights; every checkpoint left behind is complete or
    ignored."""
    import numpy as np
    from safetensors.torch import load_file

    from conan_hf.dhnm import DHNM_STATE_NAME
    from conan_hf.stages.supervised import SupervisedConfig, run

    options = {"preset": "tiny", "model": str(tiny_model_dir), "max_steps": "24", "save_steps": "4",
               "logging_steps": "1", "disable_tqdm": "true"}
    argv = [a for k, v in options.items() for a in (f"--{k}", v)]

    # Uninterrupted reference (in this process).
    reference = run(parse_config(SupervisedConfig, "supervised", argv + ["--output_dir", str(tmp_path / "ref")]))

    out = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "conan_hf.stages.supervised", *argv, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint-4" / COMMIT_MARKER).exists():
        assert proc.poll() is None, f"stage exited early:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it could be killed; the test proves nothing"
    survivors = sorted(out.glob("checkpoint-*"))
    assert survivors
    for folder in survivors:  # complete checkpoints load; an incomplete one (killed mid-save) has no marker
        if (folder / COMMIT_MARKER).exists():
            json.loads((folder / "trainer_state.json").read_text())
            load_file(folder / "model.safetensors")
            with np.load(folder / DHNM_STATE_NAME) as state:  # the DHNM pools, binary
                assert state.files
    resumed_from = latest_checkpoint(out)
    assert resumed_from is not None

    result = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {resumed_from}" in result.stderr
    resumed = json.loads((out / "final" / STAGE_RECORD).read_text())["summary"]
    assert resumed["global_step"] == reference["global_step"] == 24
    ref_losses = dict(reference["losses"])
    for step, loss in resumed["losses"]:  # the resumed process logs the steps after the checkpoint
        assert loss == pytest.approx(ref_losses[step], abs=1e-6), step
    assert resumed["losses"][-1] == pytest.approx(reference["losses"][-1], abs=1e-6)
    assert resumed["dhnm"] == reference["dhnm"]
    assert resumed["false_negatives_masked"] == reference["false_negatives_masked"]  # restored from the checkpoint
    ref_weights = load_file(Path(reference["final_dir"]) / "model.safetensors")
    new_weights = load_file(out / "final" / "model.safetensors")
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(new_weights[name], tensor, atol=1e-6, rtol=0)


# ---- the whole pipeline: hand-off between stages ---------------------------------------------------------------------
@pytest.mark.slow
def test_main_job_runs_every_stage_and_hands_off(tmp_path):
    """`accelerate launch examples/finetune.py` (few steps): each stage's output loads as the next stage's input, α
    reaches 1 at the end of stage 3, and the result loads with sentence-transformers through its remote code."""
    work, output = tmp_path / "runs", tmp_path / "conan-v2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           str(REPO / "examples" / "finetune.py"),
           "--work-dir", str(work), "--output-dir", str(output), "--max-steps", "4", "--set", "*.logging_steps=1"]
    result = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "=== summary ===" in result.stdout and "sts_spearman" in result.stdout

    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from conan_hf import ConanForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")  # stage 0 → stage 1
    for stage in ("pretrain", "sft"):  # stage 1 → 2 → 3: decoders with the stage-0 tokenizer
        lm = ConanForCausalLM.from_pretrained(work / stage / "final")
        assert lm.config.attention_mode == "causal" and lm.config.vocab_size >= len(tokenizer)
        assert AutoTokenizer.from_pretrained(work / stage / "final").get_vocab() == tokenizer.get_vocab()
        assert json.loads((work / stage / "final" / STAGE_RECORD).read_text())["summary"]["global_step"] == 4

    weak = json.loads((work / "weak" / "final" / STAGE_RECORD).read_text())["summary"]
    tau = weak["soft_mask_total_steps"]
    assert tau == weak["global_step"] == 4
    # α(t) = t/τ with t the step being taken: the step logged as s trained at s/τ, the last one at α = 1.
    assert weak["soft_mask_alphas"] == [[s, pytest.approx(s / tau)] for s in range(1, 5)]
    assert weak["final_alpha"] == 1.0 and weak["attention_mode"] == "bidirectional"
    weak_config = json.loads((work / "weak" / "final" / "config.json").read_text())
    assert weak_config["attention_mode"] == "bidirectional"

    supervised = json.loads((output / STAGE_RECORD).read_text())
    assert supervised["config"]["model"] == str(work / "weak" / "final")  # stage 3 → 4
    assert supervised["summary"]["matryoshka_dims"] == [16, 32, 64, 128]
    # A fresh process where conan_hf cannot be imported loads the exported folder with stock classes and no remote
    # code, and reproduces the embeddings the trained model gave in training (recorded by the export).
    export = supervised["summary"]["export"]
    assert (export["export_format"], export["backbone"], export["is_causal"]) == ("stock", "LlamaModel", False)
    probe = ("import json, sys; sys.modules['conan_hf'] = None\n"
             "from sentence_transformers import SentenceTransformer\n"
             "from transformers import AutoModel, AutoTokenizer\n"
             "m = SentenceTransformer(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])\n"
             "texts = json.loads(sys.argv[2])\n"
             "out = {'plain': m.encode(texts).tolist(), 'query': m.encode(texts, prompt_name='query').tolist(),\n"
             "       'class': type(AutoModel.from_pretrained(sys.argv[1])).__module__}\n"
             "print(json.dumps(out))")
    from conan_hf.export import PROBE_TEXTS

    fresh = subprocess.run([sys.executable, "-c", probe, str(output), json.dumps(list(PROBE_TEXTS))],
                           env={**_env(), "PYTHONPATH": ""}, cwd=tmp_path, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "transformers.models.llama.modeling_llama"
    for name in ("plain", "query"):  # the record keeps the first 16 dimensions of each embedding
        torch.testing.assert_close(torch.tensor(loaded[name])[:, :16], torch.tensor(export["probe"][name]),
                                   atol=1e-5, rtol=0)
    model = SentenceTransformer(str(output))
    assert {"Retrieval-query", "Classification", "STS", "query"} <= set(model.prompts)
    embeddings = model.encode(["What do pandas eat?", "熊猫吃什么？"], prompt_name="Retrieval-query")
    assert embeddings.shape == (2, 128)
    assert abs(float((embeddings**2).sum(axis=1)[0]) - 1.0) < 1e-4
    small = model.encode(["hello"], truncate_dim=32)
    assert small.shape == (1, 32)
