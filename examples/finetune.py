"""Main job (interim, until the training pipeline lands): build the tiny Conan model, save it as ./conan-v2,
reload it with sentence-transformers through its remote code, and encode.

    accelerate launch examples/finetune.py
"""

from __future__ import annotations

import argparse

import numpy as np
from sentence_transformers import SentenceTransformer

from conan_hf import ConanConfig, build_sentence_transformer
from conan_hf.sentence import QUERY_PROMPT_FORMAT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="conan-v2")
    args = parser.parse_args()

    prompts = {"query": QUERY_PROMPT_FORMAT.format(instruction="Given a question, retrieve passages that answer it")}
    model = build_sentence_transformer(ConanConfig.tiny(), prompts=prompts, max_seq_length=128)
    model.save(args.output_dir)

    reloaded = SentenceTransformer(args.output_dir, trust_remote_code=True)
    queries = reloaded.encode(["What do pandas eat?", "熊猫吃什么？"], prompt_name="query")
    docs = reloaded.encode(["Giant pandas eat mostly bamboo.", "大熊猫主要吃竹子。"])
    print(f"saved {args.output_dir}: embedding dim {queries.shape[1]}, norms {np.linalg.norm(queries, axis=1).round(4)}")
    print("query-document cosine:\n", np.round(queries @ docs.T, 4))


if __name__ == "__main__":
    main()
