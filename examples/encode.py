"""Embed texts fast through sentence-transformers and search them (conan_hf.encode.FastEncoder).

    python examples/encode.py --model runs/final
    python examples/encode.py                      # a tiny random Conan model, to show the calls

FastEncoder sorts texts by token length and batches them by a token budget; on a GPU it also runs bf16 and, with
flash-attn installed, un-padded attention. ``dim`` gives Matryoshka embeddings (re-normalised), ``precision``
quantised ones.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SentenceTransformer folder or Hub id (default: a tiny random Conan model)")
    parser.add_argument("--dim", type=int, default=64, help="Matryoshka dimension")
    args = parser.parse_args()

    from conan_hf.encode import FastEncoder

    if args.model:
        encoder = FastEncoder(args.model)
    else:
        from conan_hf import ConanConfig, build_sentence_transformer

        encoder = FastEncoder(build_sentence_transformer(
            ConanConfig.tiny(), max_seq_length=128,
            prompts={"query": "Instruct: Given a question, retrieve passages that answer it\nQuery:\n",
                     "document": ""}))

    documents = [
        "Paris is the capital and most populous city of France.",
        "巴黎是法国的首都和人口最多的城市。",
        "The Nile is a major north-flowing river in northeastern Africa.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "Der Rhein ist einer der längsten Flüsse Europas.",
    ]
    queries = ["What is the capital of France?", "Which river flows through Egypt?"]

    doc_emb = encoder.encode_document(documents, dim=args.dim)
    query_emb = encoder.encode_query(queries, dim=args.dim)
    print(f"documents {doc_emb.shape}, queries {query_emb.shape} (unit norm: {np.linalg.norm(doc_emb, axis=1)[0]:.3f})")
    scores = query_emb @ doc_emb.T
    for query, row in zip(queries, scores):
        best = np.argsort(-row)[:2]
        print(f"\n{query}")
        for i in best:
            print(f"  {row[i]:.3f}  {documents[i]}")

    binary = encoder.encode_document(documents, precision="ubinary")
    int8 = encoder.encode_document(documents, precision="int8")
    print(f"\nubinary {binary.shape} {binary.dtype}, int8 {int8.shape} {int8.dtype}")


if __name__ == "__main__":
    main()
