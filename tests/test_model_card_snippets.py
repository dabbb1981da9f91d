"""A Hub-ready model card: its code snippets run as written (with and without remote code) and its metadata is filled
from real evaluation results."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import _env, _write_sts_jsonl


def _stock_llama_sentence_model(tiny_model_dir: Path, folder: Path) -> Path:
    """A SentenceTransformer on a stock transformers architecture (no auto_map, no remote code)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    backbone_dir = folder.parent / f"{folder.name}-backbone"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaModel(config).save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    transformer = Transformer(str(backbone_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(64, "mean"), Normalize()])
    model.save(str(folder))
    shutil.rmtree(backbone_dir)
    return folder


def _run_card_snippets(card: str, cwd: Path, model_name: str, remote_code: bool) -> list[str]:
    """Execute every ```python block of ``card`` in a fresh interpreter (stdin closed, no y/N prompt allowed); checks
    each ``print(...)  # expected`` comment against the output. Returns the blocks."""
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    for block in blocks:
        code = block
        if "AutoModel" in block:  # the transformers recipe must give sentence-transformers' embeddings
            code += ("\nfrom sentence_transformers import SentenceTransformer as _ST\n"
                     f"_ref = _ST({model_name!r}, trust_remote_code={remote_code})"
                     ".encode(texts, convert_to_tensor=True)\n"
                     "assert torch.allclose(embeddings, _ref, atol=1e-5), (embeddings - _ref).abs().max()\n")
        result = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=cwd,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"snippet failed:\n{block}\n{result.stderr[-3000:]}"
        # transformers asks "Do you wish to run the custom code? [y/N]" (and, with stdin closed, goes on without it)
        assert "[y/N]" not in result.stdout + result.stderr, f"snippet prompts:\n{block}\n{result.stdout[-2000:]}"
        for expected in re.findall(r"^print\(.*\)  # (.+)$", block, re.M):
            assert expected in result.stdout, (block, result.stdout)
    return blocks


@pytest.mark.slow
def test_card_snippets_run_verbatim_with_and_without_remote_code(tiny_model_dir, tmp_path):
    from conan_hf.model_card import generate_model_card

    conan = tmp_path / "conan-tiny"
    shutil.copytree(tiny_model_dir, conan)
    stock = _stock_llama_sentence_model(tiny_model_dir, tmp_path / "llama-tiny")
    for folder, remote_code in ((conan, True), (stock, False)):
        assert bool(json.loads((folder / "config.json").read_text()).get("auto_map")) == remote_code
        card = generate_model_card(folder)
        blocks = _run_card_snippets(card, tmp_path, folder.name, remote_code)
        assert len(blocks) == 3  # no Matryoshka record: no truncation snippet
        assert ("trust_remote_code=True" in card) == remote_code


def test_card_metadata_is_hub_ready_and_filled_from_real_results(tiny_model_dir, tmp_path):
    from conan_hf.eval import evaluate, sts_task
    from conan_hf.model_card import generate_model_card

    folder = tmp_path / "conan-tiny"
    shutil.copytree(tiny_model_dir, folder)
    sts_file = tmp_path / "sts.jsonl"
    _write_sts_jsonl(sts_file)

    def front_matter(card: str) -> dict:
        assert card.startswith("---\n")
        return yaml.safe_load(card.split("---\n")[1])

    # the main job's records: every stage on the demo corpus (stage 4 via the files it writes aside)
    demo_files = str(tmp_path / "runs" / "demo-data" / "sts.jsonl")
    records = [{"stage": "pretrain", "config": {"model": "tiny", "data": ["demo"]}, "summary": {}},
               {"stage": "supervised", "config": {"model": "runs/weak/final", "matryoshka": False,
                                                  "tasks": [{"name": "sts", "type": "sts",
                                                             "data": [{"path": demo_files}]}]}, "summary": {}}]
    meta = front_matter(generate_model_card(folder, run_info=records))
    assert meta["library_name"] == "sentence-transformers" and meta["license"] == "apache-2.0"
    assert {"sentence-transformers", "feature-extraction", "sentence-similarity"} <= set(meta["tags"])
    assert meta["language"] == ["en", "zh"]  # conan_hf.demo's languages
    assert "base_model" not in meta  # pre-trained from scratch
    assert "model-index" not in meta and "mteb" not in meta["tags"]  # no results given: none invented

    # stages 3-4 from a Hub model on the user's own data: base_model recorded, languages not guessed
    own = [{"stage": "weak", "config": {"model": "Qwen/Qwen2.5-0.5B", "data": ["pairs.jsonl"]}, "summary": {}}]
    meta = front_matter(generate_model_card(folder, run_info=own))
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and "language" not in meta
    meta = front_matter(generate_model_card(folder, run_info={"stages": own, "languages": ["de"]}))
    assert meta["language"] == ["de"]

    # the model-index carries the evaluation's own numbers
    report = evaluate(str(folder), [sts_task(sts_file)], instruction_template=None)
    meta = front_matter(generate_model_card(folder, run_info=records, results=report))
    assert "mteb" in meta["tags"]
    [entry] = meta["model-index"][0]["results"]
    assert entry["task"] == {"type": "STS"}
    assert entry["metrics"][0] == {"type": "cosine_spearman",
                                   "value": round(100 * report.main_scores["LocalSTS-sts"], 3)}
