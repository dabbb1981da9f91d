"""One-process GPU benchmark suite for conan-hf (issue 14): correctness and cost of the flex-attention soft mask,
encode throughput and supervised-stage training throughput of the full architecture, in one run of <= 7 minutes.

    # on the GPU machine, after `bash benchmarks/gpu/prepare.sh` here (see benchmarks/gpu/README.md):
    python3 benchmarks/gpu/suite.py                       # writes benchmarks/results/gpu_<device>.md (+ .json)
    # anywhere, on CPU, tiny configs (what tests/test_gpu_suite.py runs):
    python benchmarks/gpu/suite.py --smoke --output /tmp/gpu_smoke.md

Sections (each with its own time budget and try/except, so one failure still leaves the others and the report; the
report is rewritten after every section, so even a run killed at its limit leaves what it had measured):

1. correctness: the eq.4 soft mask through flex attention (score_mod, no L x L tensor) against the dense log-M bias
   through sdpa, at alpha in {0.3, 0.7}, fp32 and bf16, on a left- and a right-padded batch: outputs at real tokens and
   every parameter gradient. alpha >= 1 must take the bidirectional fast path (checked by the path the model reports).
2. softmask: forward+backward time of soft (flex) / bidirectional (sdpa) at L = 2048 and 8192 on full-width Conan
   layers (hidden 3584, 32 query / 8 KV heads), and peak memory at L = 32768. Goals <= 1.15x time, <= 1.1x memory.
3. encode: the full ConanConfig() architecture (random weights, bf16) at sequence 512 and at a real-length mix:
   FastEncoder against SentenceTransformer.encode in bf16; tokens/s, MFU. Goals >= 1.5x ST bf16, >= 50% MFU.
4. train: supervised-stage (stage 4, `conan_hf.stages.supervised.run`) steps of the full architecture, bf16 autocast,
   gradient checkpointing, AdamW (DeepSpeed ZeRO-1 only when importable); tokens/s, MFU, peak memory. Goal >= 40% MFU.
5. ablation: `benchmarks/ablation.py --scale gpu` with the time left, when that script exists.

`--smoke` runs the same code on CPU with tiny configs (< 2 minutes). On CPU torch's flex attention has no backward,
so the smoke run compares flex forward outputs only; the report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
for _path in (str(ROOT), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _device import accelerator_name, describe_device, peak_bf16_flops  # noqa: E402

#: Token lengths (demo tokenizer) of a real text mix, written by `--record-lengths` (see `record_real_lengths`).
REAL_LENGTHS_FILE = Path(__file__).resolve().parent / "real_lengths.json"

SECTIONS = ("correctness", "softmask", "encode", "train", "ablation")
TITLES = {
    "correctness": "1. Correctness: flex-attention soft mask against the dense log-M bias",
    "softmask": "2. Soft-mask cost: soft (flex) / bidirectional (sdpa), full-width layers",
    "encode": "3. Encode: FastEncoder against SentenceTransformer.encode in bf16",
    "train": "4. Training: supervised-stage steps",
    "ablation": "5. Ablation (benchmarks/ablation.py --scale gpu)",
}
#: Wall-clock seconds each section may take on the GPU (the whole run defaults to --deadline 400). The smoke run
#: needs about a minute of CPU time; its wall-clock budgets are generous because a shared CI machine can be slow.
GPU_BUDGETS = {"correctness": 75, "softmask": 105, "encode": 95, "train": 105, "ablation": 120}
SMOKE_BUDGETS = {"correctness": 90, "softmask": 60, "encode": 60, "train": 90, "ablation": 5}


class SectionTimeout(Exception):
    """Raised (by SIGALRM) inside a section that outran its budget."""


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise SectionTimeout in this (main) thread after `seconds`; a no-op where SIGALRM is unavailable."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise SectionTimeout(f"section budget of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """Time left in a section (and never past the global deadline)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def package_versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "transformers", "sentence-transformers", "accelerate", "peft", "datasets", "deepspeed",
                 "huggingface-hub", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def measured_matmul_tflops(device: torch.device) -> float | None:
    """bf16 8192^3 matrix product rate on this device (mean of 10 after 3 warm-ups), the practical ceiling."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / 10
    del a, b
    free_memory()
    return 2 * n**3 / seconds / 1e12


# ---------------------------------------------------------------------------------------------------------------------
# 1. Correctness


def padded_batch(lengths: list[int], total: int, side: str, vocab: int, device: torch.device, seed: int = 0):
    """Token ids and the 2D padding mask of sequences of `lengths`, padded to `total` on the `side`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, total - length:] = 1
    ids = ids * mask  # padding id 0
    return ids.to(device), mask.to(device)


def soft_forward(model, ids, mask, alpha: float, backend: str, loss_weights: torch.Tensor | None):
    """One forward (and, when `loss_weights` is given, backward) of a soft-mode ConanModel; returns the real-token
    outputs (float32), the parameter gradients (float32) and the attention path the model reports it took."""
    from conan_hf.modeling_conan import soft_mask_state

    model.config.soft_mask_backend = backend
    model.config.soft_mask_alpha = float(alpha)
    model.zero_grad(set_to_none=True)
    backward = loss_weights is not None
    with torch.set_grad_enabled(backward):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        output = hidden.float()[real].detach().clone()
        if backward:
            # A fixed random projection of every real token's state: gradients reach every parameter and position.
            (hidden.float()[real] * loss_weights).sum().backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters()
             if backward and p.grad is not None}
    state = soft_mask_state(model, create=False)
    return output, grads, (state.backend_in_use if state is not None else None)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def worst_gradient_difference(grads: dict, reference: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, ref in reference.items():
        diff = relative_difference(grads[name], ref)
        if not math.isfinite(diff) or diff > worst:
            worst, where = diff, name
            if not math.isfinite(diff):
                break
    return worst, where


#: fp32: flex and the dense path compute the same sums in a different order, so they agree to float32 rounding
#: amplified through the layers. bf16: both paths round activations to bf16; we require flex to be no further from
#: the dense bf16 result than BF16_FLOOR_FACTOR x the dense bf16 path's own distance from the fp32 result (the noise
#: floor that bf16 itself introduces), and never further than BF16_ABSOLUTE_MAX.
FP32_TOLERANCE = {"output": 1e-4, "grad": 1e-3}
BF16_FLOOR_FACTOR = 2.0
BF16_ABSOLUTE_MAX = {"output": 5e-2, "grad": 1e-1}


def compare_case(model, ids, mask, alpha: float, weights, dtype, side: str, flex_backward: bool,
                 fp32_reference: dict, dense_by_alpha: dict, result: dict) -> dict:
    """One (dtype, padding side, alpha) comparison of the flex soft mask against the dense log-M bias."""
    dense_out, dense_grads, dense_path = soft_forward(model, ids, mask, alpha, "sdpa", weights)
    key = (side, alpha)
    if dtype == torch.float32:
        fp32_reference[key] = (dense_out, dense_grads)
        if side == "left":
            # How far apart the dense outputs of the two alphas are: the size of error a wrong alpha (or a mask
            # that ignores it) would show; the flex-dense differences must be far below it.
            dense_by_alpha[alpha] = dense_out
            if len(dense_by_alpha) == 2:
                result["alpha_sensitivity"] = relative_difference(dense_by_alpha[0.3], dense_by_alpha[0.7])
    if flex_backward:
        flex_out, flex_grads, flex_path = soft_forward(model, ids, mask, alpha, "flex_attention", weights)
    else:  # forward only, without autograd (flex refuses CPU training)
        with torch.no_grad():
            flex_out, flex_grads, flex_path = soft_forward(model, ids, mask, alpha, "flex_attention", None)
    case = {"dtype": str(dtype).replace("torch.", ""), "padding": side, "alpha": alpha,
            "reference_path": dense_path, "soft_path": flex_path,
            "output_rel_diff": relative_difference(flex_out, dense_out)}
    if flex_grads:
        case["grad_rel_diff"], case["grad_worst_param"] = worst_gradient_difference(flex_grads, dense_grads)
    else:
        case["grad_rel_diff"], case["grad_worst_param"] = None, "n/a (flex has no CPU backward)"
    if dtype == torch.float32:
        case["output_tolerance"] = FP32_TOLERANCE["output"]
        case["grad_tolerance"] = FP32_TOLERANCE["grad"] if flex_grads else None
    else:
        ref_out, ref_grads = fp32_reference[key]
        floor_out = relative_difference(dense_out, ref_out)
        floor_grad, _ = worst_gradient_difference(dense_grads, ref_grads)
        case["bf16_floor_output"], case["bf16_floor_grad"] = floor_out, floor_grad
        case["output_tolerance"] = min(BF16_FLOOR_FACTOR * floor_out, BF16_ABSOLUTE_MAX["output"])
        case["grad_tolerance"] = (min(BF16_FLOOR_FACTOR * floor_grad, BF16_ABSOLUTE_MAX["grad"])
                                  if flex_grads else None)
    ok = (case["soft_path"] == "flex_attention" and case["reference_path"] == "sdpa"
          and finite(case["output_rel_diff"]) and case["output_rel_diff"] <= case["output_tolerance"])
    if case["grad_tolerance"] is not None:
        ok = ok and finite(case["grad_rel_diff"]) and case["grad_rel_diff"] <= case["grad_tolerance"]
    case["pass"] = bool(ok)
    return case


def run_correctness(ctx: Context, budget: Budget) -> dict:
    from conan_hf import ConanConfig, ConanModel

    device = ctx.device
    flex_backward = device.type == "cuda"  # torch's flex attention has no CPU backward
    if ctx.smoke:
        config = ConanConfig.tiny(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, attention_mode="soft")
        total, lengths, dtypes = 40, [40, 33, 17, 5], [torch.float32, torch.bfloat16]
    else:
        # head_dim 112 and GQA 4:1 like the released model; L not a multiple of flex's 128-token blocks.
        config = ConanConfig(vocab_size=1024, hidden_size=896, intermediate_size=2048, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                             attention_mode="soft")
        total, lengths, dtypes = 320, [320, 257, 131, 17], [torch.float32, torch.bfloat16]
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        base = ConanModel(config)
    base.train()  # dropout is 0; train mode so that flex compiles once, for training (no recompile per call)
    result = {"config": f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                        f"{config.num_attention_heads}/{config.num_key_value_heads} heads (head_dim "
                        f"{config.hidden_size // config.num_attention_heads}), batch lengths {lengths} padded to "
                        f"{total}", "flex_backward": flex_backward, "cases": [], "bidirectional": []}
    ctx.partial = result  # kept by the driver if this section stops early
    fp32_reference: dict = {}
    dense_by_alpha: dict = {}
    for dtype in dtypes:
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        dtype_name = str(dtype).replace("torch.", "")
        for side in ("left", "right"):
            ids, mask = padded_batch(lengths, total, side, config.vocab_size, device)
            generator = torch.Generator().manual_seed(1)
            weights = torch.randn(int(mask.sum()), config.hidden_size, generator=generator).to(device)
            for alpha in (0.3, 0.7):
                if budget.left() < 0:
                    raise SectionTimeout(f"correctness budget spent after {len(result['cases'])} cases")
                try:
                    result["cases"].append(compare_case(model, ids, mask, alpha, weights, dtype, side, flex_backward,
                                                        fp32_reference, dense_by_alpha, result))
                except SectionTimeout:
                    raise
                except Exception as error:  # e.g. a kernel that does not fit this GPU: keep the other cases
                    result["cases"].append({"dtype": str(dtype).replace("torch.", ""), "padding": side,
                                            "alpha": alpha, "pass": False,
                                            "error": f"{type(error).__name__}: {error}"[:300]})
        # alpha >= 1: the model must leave the soft machinery for its own (sdpa / flash) bidirectional kernel, with
        # outputs equal to attention_mode="bidirectional".
        ids, mask = padded_batch(lengths, total, "left", config.vocab_size, device)
        for alpha in (1.0, 1.5):
            with torch.no_grad():
                out, _, path = soft_forward(model, ids, mask, alpha, "flex_attention", None)
                model.config.attention_mode = "bidirectional"
                try:
                    reference = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()[mask.bool()]
                finally:
                    model.config.attention_mode = "soft"
            implementation = model.config._attn_implementation
            diff = relative_difference(out, reference)
            result["bidirectional"].append({
                "dtype": dtype_name, "alpha": alpha, "path": path, "attn_implementation": implementation,
                "output_rel_diff_vs_bidirectional_mode": diff,
                "pass": path == "bidirectional" and implementation in ("sdpa", "flash_attention_2", "flash_attention_3")
                and diff == 0.0})
        if model is not base:
            del model
        free_memory()
    fp32_cases = [c for c in result["cases"] if c["dtype"] == "float32" and "error" not in c]
    fp32_worst = max((c["output_rel_diff"] for c in fp32_cases), default=0.0)
    sensitive = result.get("alpha_sensitivity", 0.0) > 100 * fp32_worst
    result["pass"] = sensitive and all(c["pass"] for c in result["cases"] + result["bidirectional"])
    return result


def report_correctness(r: dict) -> list[str]:
    lines = [f"Model: {r['config']}; random weights. Compared at real tokens: outputs (last hidden state) and, "
             + ("every parameter gradient of a fixed random projection of the outputs." if r["flex_backward"] else
                "forward outputs only: torch's flex attention has no CPU backward, so gradients are not compared "
                "on CPU (the GPU run compares them)."),
             "Metric: max |flex - dense| / max |dense| (for gradients: the worst parameter tensor). Tolerances: fp32 "
             f"{FP32_TOLERANCE['output']:g} (outputs) / {FP32_TOLERANCE['grad']:g} (gradients); bf16: at most "
             f"{BF16_FLOOR_FACTOR:g}x the bf16 noise floor (dense bf16 against dense fp32, same case), capped at "
             f"{BF16_ABSOLUTE_MAX['output']:g} / {BF16_ABSOLUTE_MAX['grad']:g}.",
             "",
             "| dtype | padding | alpha | path (soft / reference) | output diff | tol | grad diff | tol | bf16 floor "
             "(out / grad) | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in r["cases"]:
        if "error" in c:
            lines.append(f"| {c['dtype']} | {c['padding']} | {c['alpha']} | ERROR: {c['error']} | | | | | | NO |")
            continue
        floor = (f"{fmt(c.get('bf16_floor_output'))} / {fmt(c.get('bf16_floor_grad'))}"
                 if "bf16_floor_output" in c else "-")
        lines.append(f"| {c['dtype']} | {c['padding']} | {c['alpha']} | {c['soft_path']} / {c['reference_path']} | "
                     f"{fmt(c['output_rel_diff'])} | {fmt(c['output_tolerance'])} | {fmt(c['grad_rel_diff'])} | "
                     f"{fmt(c['grad_tolerance'])} | {floor} | {'yes' if c['pass'] else 'NO'} |")
    lines += ["", "alpha >= 1 (requested backend flex_attention): the path taken and the difference from "
              "attention_mode='bidirectional' (must be exactly 0: the same kernel).", "",
              "| dtype | alpha | path | attn_implementation | diff vs bidirectional mode | pass |",
              "| --- | --- | --- | --- | --- | --- |"]
    for b in r["bidirectional"]:
        lines.append(f"| {b['dtype']} | {b['alpha']} | {b['path']} | {b['attn_implementation']} | "
                     f"{fmt(b['output_rel_diff_vs_bidirectional_mode'])} | {'yes' if b['pass'] else 'NO'} |")
    if "alpha_sensitivity" in r:
        lines += ["", "Sensitivity: the dense fp32 outputs at alpha 0.3 and 0.7 differ by "
                  f"{fmt(r['alpha_sensitivity'])} (same metric; required: > 100x the worst fp32 flex-dense "
                  "difference), so a flex path that got alpha or the mask wrong would fail by orders of magnitude."]
    verdict = {True: "PASS", False: "FAIL"}.get(r.get("pass"), "INCOMPLETE")
    lines += ["", f"**Correctness: {verdict}**"]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# 2. Soft-mask cost


def build_layer_model(ctx: Context, backend: str, length: int):
    """Full-width Conan layers (or the tiny smoke ones) for one backend: bidirectional | soft-flex | soft-dense."""
    from conan_hf import ConanConfig, ConanModel

    mode = "bidirectional" if backend == "bidirectional" else "soft"
    overrides = dict(attention_mode=mode, soft_mask_alpha=0.5, max_position_embeddings=max(length, 32_768),
                     soft_mask_backend="flex_attention" if backend == "soft-flex" else "sdpa")
    if ctx.smoke:
        config = ConanConfig.tiny(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, **overrides)
    else:
        # The released layer shape (hidden 3584, 32 query / 8 KV heads of 112, FFN 8192); 2 layers, small vocab so
        # that weights do not dominate the memory comparison.
        config = ConanConfig(num_hidden_layers=ctx.softmask_layers, vocab_size=4096, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = ConanModel(config)
    model.to(ctx.dtype)
    model.train()
    return model


def time_steps(model, ids, mask, backward: bool, warmup: int, repeats: int, device: torch.device,
               budget: Budget) -> dict:
    """Median wall time of forward(+backward) steps, and the peak memory above the weights (CUDA only)."""
    def step():
        with torch.set_grad_enabled(backward):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            if backward:
                out.float().pow(2).mean().backward()
                model.zero_grad(set_to_none=True)
        sync(device)

    for _ in range(warmup):  # flex compilation happens here
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for i in range(repeats):
        if i and budget.left() < 0:
            break
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "times": times, "peak_bytes": peak}


def run_softmask(ctx: Context, budget: Budget) -> dict:
    from conan_hf.modeling_conan import soft_mask_state

    backward_flex = ctx.device.type == "cuda"
    if ctx.smoke:
        time_lengths, memory_length, warmup, repeats = [64], 128, 1, 2
    else:
        time_lengths, memory_length, warmup, repeats = [2048, 8192], 32_768, 2, 5
    # The goals' rows first (so a slow flex compile costs the extras, not them): the first timed length, the memory
    # length, the other timed lengths; the dense-bias rows (for comparison only) last.
    plan = [(time_lengths[0], "bidirectional"), (time_lengths[0], "soft-flex"),
            (memory_length, "bidirectional"), (memory_length, "soft-flex")]
    plan += [(length, backend) for length in time_lengths[1:] for backend in ("bidirectional", "soft-flex")]
    plan += [(length, "soft-dense") for length in time_lengths]
    rows = []
    ctx.partial = {"rows": rows, "goals": {}, "backward": backward_flex, "layers": ctx.softmask_layers,
                   "smoke": ctx.smoke, "dtype": str(ctx.dtype).replace("torch.", ""), "memory_length": memory_length}
    for length, backend in plan:
        if budget.left() < 0:
            rows.append({"length": length, "backend": backend, "error": "skipped: section budget spent"})
            continue
        model = None
        try:
            model = build_layer_model(ctx, backend, length)
            ids = torch.randint(3, model.config.vocab_size, (1, length), device=ctx.device)
            mask = torch.ones_like(ids)
            backward = backward_flex  # on CPU every row is forward-only, like for like
            is_memory_row = length == memory_length
            row = time_steps(model, ids, mask, backward, 1 if is_memory_row else warmup,
                             2 if is_memory_row else repeats, ctx.device, budget)
            state = soft_mask_state(model, create=False)
            row.update(length=length, backend=backend, backward=backward,
                       path=state.backend_in_use if state is not None else model.config._attn_implementation)
            rows.append(row)
        except SectionTimeout:
            raise
        except Exception as error:  # e.g. out of memory at 32k: keep the other rows
            rows.append({"length": length, "backend": backend, "error": f"{type(error).__name__}: {error}"[:300]})
        finally:
            del model
            free_memory()
    baseline = {r["length"]: r for r in rows if r["backend"] == "bidirectional" and "error" not in r}
    for r in rows:
        base = baseline.get(r["length"])
        if "error" in r or base is None:
            continue
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = (r["peak_bytes"] / base["peak_bytes"]
                             if r.get("peak_bytes") and base.get("peak_bytes") else None)
    goals = {}
    for length in time_lengths:
        flex = next((r for r in rows if r["length"] == length and r["backend"] == "soft-flex" and "time_ratio" in r),
                    None)
        goals[f"time_L{length}"] = None if flex is None else flex["time_ratio"] <= 1.15
    flex_memory = next((r for r in rows if r["length"] == memory_length and r["backend"] == "soft-flex"
                        and "memory_ratio" in r), None)
    goals[f"memory_L{memory_length}"] = (None if flex_memory is None or flex_memory["memory_ratio"] is None
                                         else flex_memory["memory_ratio"] <= 1.1)
    return {"rows": rows, "goals": goals, "backward": backward_flex, "layers": ctx.softmask_layers, "smoke": ctx.smoke,
            "dtype": str(ctx.dtype).replace("torch.", ""), "memory_length": memory_length}


def report_softmask(r: dict) -> list[str]:
    step = "forward + backward" if r["backward"] else "forward only (torch's flex attention has no CPU backward)"
    shape = ("tiny smoke layers (hidden 64, 4/1 heads)" if r["smoke"] else
             f"{r['layers']} full-width Conan layers (hidden 3584, 32/8 heads, head_dim 112, FFN 8192), vocab 4096")
    lines = [f"Model: {shape}, batch 1, {r['dtype']}, alpha 0.5, no padding; {step}. Time: median wall clock "
             "(synchronised on CUDA) after warm-up (which compiles flex); peak: CUDA max_memory_allocated above the "
             "weights during the timed steps (n/a on CPU). Ratios are against the bidirectional sdpa baseline measured "
             "in this run.", "",
             "| L | backend | path | time ms | x bidirectional | peak MiB | x bidirectional |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    order = {"bidirectional": 0, "soft-flex": 1, "soft-dense": 2}
    for row in sorted(r["rows"], key=lambda row: (row["length"], order[row["backend"]])):
        if "error" in row:
            lines.append(f"| {row['length']} | {row['backend']} | ERROR: {row['error']} | | | | |")
            continue
        peak = None if row.get("peak_bytes") is None else row["peak_bytes"] / 2**20
        lines.append(f"| {row['length']} | {row['backend']} | {row['path']} | {row['seconds'] * 1e3:.2f} | "
                     f"{fmt(row.get('time_ratio'), '.3f')} | {fmt(peak, '.0f')} | "
                     f"{fmt(row.get('memory_ratio'), '.3f')} |")
    goal_text = ", ".join(f"{k}: {'met' if v else ('not met' if v is not None else 'n/a')}"
                          for k, v in r["goals"].items())
    lines += ["", f"Goals (soft-flex <= 1.15x time at each timed L, <= 1.1x memory at L = {r['memory_length']}): "
              f"{goal_text}."]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# 3. Encode


def texts_of_lengths(tokenizer, lengths: list[int], seed: int = 0) -> list[str]:
    """Texts of roughly the given token counts: random non-special token ids decoded to text."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [tokenizer.decode([rng.choice(vocab) for _ in range(max(1, n))]) for n in lengths]


def record_real_lengths(data_dir: Path, path: Path = REAL_LENGTHS_FILE) -> dict:
    """Token lengths (demo tokenizer, special tokens included) of a real retrieval-style mix: STS-B en dev sentences
    (query-like), MS MARCO passages and SciFact title + abstract (document-like). Only the integers are stored."""
    from conan_hf.eval.tasks import read_sts
    from conan_hf.tokenizer import demo_tokenizer

    tokenizer = demo_tokenizer()
    pairs = read_sts(data_dir / "sts/stsb-multi-mt/stsb-en-dev.csv")
    sources = {"stsb-en-dev sentences": (pairs.sentence1 + pairs.sentence2)[:1500]}
    for name, limit in (("msmarco-mini", 2000), ("scifact", 500)):
        texts = []
        with open(data_dir / "retrieval" / name / "corpus.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                texts.append(" ".join(t for t in (row.get("title"), row.get("text")) if t))
                if len(texts) >= limit:
                    break
        sources[f"{name} corpus"] = texts
    lengths, counts = [], {}
    for name, texts in sources.items():
        encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
        lengths += [len(ids) for ids in encoded]
        counts[name] = len(texts)
    record = {"tokenizer": "conan_hf.tokenizer.demo_tokenizer()", "sources": counts, "lengths": lengths}
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return record


def encode_flops(model, lengths: np.ndarray) -> float:
    from encode import model_flops  # benchmarks/encode.py: 2 N tokens + 4 layers h d sum(L^2)

    return model_flops(model, lengths)


def run_encode(ctx: Context, budget: Budget) -> dict:
    from sentence_transformers import SentenceTransformer

    from conan_hf import ConanConfig, ConanModel, build_sentence_transformer
    from conan_hf.encode import FastEncoder

    device = ctx.device
    if ctx.smoke:
        config = ConanConfig.tiny(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1)
        fixed_n, fixed_len, mix_n, mix_max, rounds = 32, 32, 48, 128, 1
    else:
        config = ConanConfig()  # the released architecture (1.5B parameters with the 150k embedding)
        fixed_n, fixed_len, mix_n, mix_max, rounds = 1024, 512, 4096, 1024, 2
    torch.manual_seed(0)
    with torch.device(device):
        backbone = ConanModel(config)
    backbone.to(torch.bfloat16)
    work = Path(tempfile.mkdtemp(prefix="conan-gpu-encode-"))
    ctx.cleanup.append(work)
    built = build_sentence_transformer(backbone, max_seq_length=mix_max, device=str(device))
    del backbone
    built.save(str(work / "model"))
    del built
    free_memory()
    # The fair baseline: plain sentence-transformers loading the same model in bf16.
    st_model = SentenceTransformer(str(work / "model"), device=str(device), trust_remote_code=True,
                                   model_kwargs={"torch_dtype": torch.bfloat16})
    encoder = FastEncoder(str(work / "model"), device=str(device), truncation="ignore")
    tokenizer = st_model.tokenizer
    if REAL_LENGTHS_FILE.exists():
        recorded = json.loads(REAL_LENGTHS_FILE.read_text(encoding="utf-8"))
        mix_source = f"{REAL_LENGTHS_FILE.name}: {recorded['sources']}"
        rng = random.Random(0)
        mix_lengths = [rng.choice(recorded["lengths"]) for _ in range(mix_n)]
    else:  # a fresh checkout without the recorded file: a log-normal stand-in, said so in the report
        mix_source = "synthetic log-normal (benchmarks/gpu/real_lengths.json missing)"
        rng = np.random.default_rng(0)
        mix_lengths = [int(x) for x in np.clip(rng.lognormal(4.3, 0.8, mix_n), 4, 4 * mix_max)]
    workloads = {
        f"seq {fixed_len}": (texts_of_lengths(tokenizer, [2 * fixed_len] * fixed_n, seed=1), fixed_len),
        "real-length mix": (texts_of_lengths(tokenizer, mix_lengths, seed=2), mix_max),
    }
    peak = peak_bf16_flops(accelerator_name()) if device.type == "cuda" else None
    result = {"model": f"ConanConfig({'tiny smoke' if ctx.smoke else 'defaults'}): hidden {config.hidden_size}, "
                       f"{config.num_hidden_layers} layers, {config.num_attention_heads}/{config.num_key_value_heads}"
                       f" heads, FFN {config.intermediate_size}, vocab {config.vocab_size}",
              "parameters": sum(p.numel() for p in st_model.parameters()),
              "unpadded": encoder.unpadded,
              "attn_implementation": encoder.transformer.auto_model.config._attn_implementation,
              "st_dtype": str(next(st_model.parameters()).dtype),
              "fast_dtype": str(next(encoder.model.parameters()).dtype),
              "peak_flops": peak, "matmul_tflops": ctx.matmul_tflops, "mix_source": mix_source, "workloads": [],
              "goals": {"speedup>=1.5": None, "mfu>=0.5": None}}
    ctx.partial = result
    for name, (texts, max_len) in workloads.items():
        if budget.left() < 0:
            result["workloads"].append({"name": name, "error": "skipped: section budget spent"})
            continue
        st_model.max_seq_length = max_len
        encoder.model.max_seq_length = max_len
        lengths = np.minimum(encoder.token_lengths(texts), max_len)
        tokens = int(lengths.sum())
        st_model.encode(texts[:64], show_progress_bar=False)  # warm-up: kernels, allocator
        encoder.encode(texts[:64])
        base_times, our_times = [], []
        for i in range(rounds):
            if i and budget.left() < 0:
                break
            for times in (base_times, our_times):  # called inline: no closure keeps the models after the `del`
                sync(device)
                start = time.perf_counter()
                if times is base_times:
                    st_model.encode(texts, convert_to_tensor=True, show_progress_bar=False)
                else:
                    encoder.encode(texts, convert_to_tensor=True)
                sync(device)
                times.append(time.perf_counter() - start)
        base_s, ours_s = min(base_times), min(our_times)
        flops = encode_flops(encoder.model, lengths)
        row = {"name": name, "texts": len(texts), "tokens": tokens, "mean_length": float(lengths.mean()),
               "max_length": int(lengths.max()), "st_seconds": base_s, "fast_seconds": ours_s,
               "st_tokens_per_s": tokens / base_s, "fast_tokens_per_s": tokens / ours_s,
               "speedup": base_s / ours_s, "flops": flops,
               "fast_tflops": flops / ours_s / 1e12, "st_tflops": flops / base_s / 1e12,
               "st_times": base_times, "fast_times": our_times}
        if peak:
            row["fast_mfu"], row["st_mfu"] = flops / ours_s / peak, flops / base_s / peak
        # Time to embed a million texts of this workload at the measured rate (scale to any corpus size by hand).
        row["fast_minutes_per_million_texts"] = ours_s / len(texts) * 1e6 / 60
        row["st_minutes_per_million_texts"] = base_s / len(texts) * 1e6 / 60
        result["workloads"].append(row)
    del st_model, encoder
    free_memory()
    ok = [w for w in result["workloads"] if "error" not in w]
    result["goals"] = {"speedup>=1.5": all(w["speedup"] >= 1.5 for w in ok) if ok else None,
                       "mfu>=0.5": (all(w["fast_mfu"] >= 0.5 for w in ok) if ok and peak else None)}
    return result


def report_encode(r: dict, table5: tuple[float, float] | None) -> list[str]:
    peak = r["peak_flops"]
    lines = [f"Model: {r['model']}; {r['parameters'] / 1e6:,.1f}M parameters, random weights. Baseline: "
             "`SentenceTransformer(path, model_kwargs={'torch_dtype': torch.bfloat16}).encode(texts)` (defaults, "
             f"weights {r['st_dtype']}); ours: `FastEncoder(path).encode(texts)` (weights {r['fast_dtype']}, attention "
             f"{r['attn_implementation']}, un-padded batches {r['unpadded']}). Time: best of the rounds, each a full "
             "pass over the texts, after a warm-up; CUDA synchronised.",
             "FLOPs (forward, real tokens only): 2 x non-embedding parameters x tokens + 4 x layers x hidden x "
             "sum(L^2) (QK^T and AV of bidirectional attention). MFU = FLOP/s / "
             + (f"{peak / 1e12:.1f} TFLOP/s (datasheet dense bf16 peak, benchmarks/_device.py)"
                if peak else "peak (unknown device: MFU not reported)")
             + (f"; this device's measured bf16 8192^3 matmul rate is {r['matmul_tflops']:.0f} TFLOP/s, the "
                "practical ceiling." if r.get("matmul_tflops") else "."),
             f"Real-length mix: token lengths sampled from {r['mix_source']}.", "",
             "| workload | texts | tokens (mean / max len) | ST bf16 tok/s | FastEncoder tok/s | speed-up | "
             "TFLOP/s (ST / ours) | MFU (ST / ours) | min per 1M texts (ST / ours) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in r["workloads"]:
        if "error" in w:
            lines.append(f"| {w['name']} | ERROR: {w['error']} | | | | | | | |")
            continue
        mfu = (f"{w['st_mfu']:.1%} / {w['fast_mfu']:.1%}" if "fast_mfu" in w else "n/a")
        lines.append(f"| {w['name']} | {w['texts']} | {w['tokens']} ({w['mean_length']:.0f} / {w['max_length']}) | "
                     f"{w['st_tokens_per_s']:,.0f} | {w['fast_tokens_per_s']:,.0f} | {w['speedup']:.2f}x | "
                     f"{w['st_tflops']:.1f} / {w['fast_tflops']:.1f} | {mfu} | "
                     f"{w['st_minutes_per_million_texts']:.1f} / {w['fast_minutes_per_million_texts']:.1f} |")
    if table5:
        texts, minutes = table5
        for w in r["workloads"]:
            if "error" not in w:
                ours = w["fast_minutes_per_million_texts"] * texts / 1e6
                lines.append(f"\nPaper Table 5 workload ({texts:,.0f} texts, {minutes:g} min reported): {w['name']} "
                             f"at the measured rate takes {ours:.1f} min here ({ours / minutes:.2f}x the paper's).")
    else:
        lines.append("\nThe paper's Table 5 figure (its text count and minutes) is not stored in this repository; "
                     "pass `--table5 TEXTS MINUTES` to print the scaled comparison. Minutes per million texts above "
                     "scale linearly to any count.")
    goals = r["goals"]
    lines.append(f"\nGoals: speed-up >= 1.5x ST bf16: {_goal(goals['speedup>=1.5'])}; MFU >= 50%: "
                 f"{_goal(goals['mfu>=0.5'])}.")
    return lines


def _goal(value: bool | None) -> str:
    return "n/a" if value is None else ("met" if value else "not met")


# ---------------------------------------------------------------------------------------------------------------------
# 4. Training


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def run_train(ctx: Context, budget: Budget) -> dict:
    from train_throughput import StepTimer, synthetic_rows  # benchmarks/train_throughput.py
    from transformers import AutoTokenizer

    from conan_hf import ConanConfig, ConanModel, build_sentence_transformer
    from conan_hf.stages import supervised
    from conan_hf.tokenizer import demo_tokenizer
    from conan_hf.training.config import config_from_dict
    from conan_hf.training.distributed import deepspeed_zero1_config

    gpu = ctx.device.type == "cuda"
    if ctx.smoke:
        seq, batch, steps, warmup = 32, 2, 4, 1
    else:
        seq, batch, steps, warmup = 512, 4, 14, 4
    use_deepspeed = {"on": True, "off": False}.get(ctx.deepspeed, gpu and deepspeed_available())
    if use_deepspeed:  # DeepSpeed needs a process group even for one process
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29533"}.items():
            os.environ.setdefault(key, value)
    work = Path(tempfile.mkdtemp(prefix="conan-gpu-train-"))
    ctx.cleanup.append(work)  # the full model is saved three times (staging, input, final): ~18 GB in fp32
    tokenizer = demo_tokenizer()
    if ctx.smoke:
        config = ConanConfig.tiny(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=1)
    else:
        config = ConanConfig()  # the released architecture, random init
    torch.manual_seed(0)
    with torch.device(ctx.device):
        backbone = ConanModel(config)  # fp32 master weights; bf16 comes from autocast (Trainer bf16=True)
    model = build_sentence_transformer(backbone, tokenizer=tokenizer, max_seq_length=seq)
    del backbone
    model_dir = str(work / "model")
    model.save(model_dir)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    del model
    free_memory()
    rows = synthetic_rows(AutoTokenizer.from_pretrained(model_dir), (steps + 2) * batch, seq, 15)
    data_file = work / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stage_config = config_from_dict(supervised.SupervisedConfig, {
        "model": model_dir, "output_dir": str(work / "run"), "resume": "no", "max_steps": steps,
        "save_steps": 10**9, "logging_steps": 10**9, "disable_tqdm": True, "max_seq_length": seq,
        "per_device_train_batch_size": batch, "bf16": gpu, "gradient_checkpointing": True,
        "dhnm": True, "matryoshka": True, "num_threads": None,
        "deepspeed": deepspeed_zero1_config(bf16=gpu) if use_deepspeed else None,
        "tasks": [{"name": "retrieval", "type": "retrieval", "data": [{"path": str(data_file)}],
                   "batch_size": batch}],
    })
    timer = StepTimer()
    original = supervised.MultiTaskTrainer.__init__

    def with_timer(self, *a, callbacks=None, **kw):
        original(self, *a, callbacks=[*(callbacks or []), timer.callback], **kw)

    supervised.MultiTaskTrainer.__init__ = with_timer
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        supervised.run(stage_config)
    finally:
        supervised.MultiTaskTrainer.__init__ = original
    wall = time.perf_counter() - start
    steady = timer.times[warmup:] or timer.times
    seconds = statistics.median(steady)
    tokens = batch * (2 + 7) * seq  # query + positive + 7 hard negatives, every text exactly `seq` tokens
    # Training FLOPs per token: 6 N (forward + backward of the non-embedding weights; gradient checkpointing's
    # recomputation is not counted, as usual for MFU) + 12 x layers x hidden x seq (bidirectional attention).
    flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq
    peak = peak_bf16_flops(accelerator_name()) if gpu else None
    tokens_per_s = tokens / seconds
    result = {"model": f"ConanConfig({'tiny smoke' if ctx.smoke else 'defaults'})", "non_embedding_params": n_params,
              "seq": seq, "queries_per_step": batch, "tokens_per_step": tokens, "steps": len(timer.times),
              "timed_steps": len(steady), "seconds_per_step": seconds, "step_times": timer.times,
              "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
              "tflops": tokens_per_s * flops_per_token / 1e12, "mfu": tokens_per_s * flops_per_token / peak
              if peak else None, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
              "optimizer": "DeepSpeed ZeRO-1 (bf16) + AdamW" if use_deepspeed else "torch AdamW (HF Trainer default)",
              "deepspeed_importable": deepspeed_available(), "precision": "bf16 autocast, fp32 master weights"
              if gpu else "fp32 (CPU)", "stage_wall_seconds": wall, "peak_flops": peak,
              "matmul_tflops": ctx.matmul_tflops}
    result["goals"] = {"mfu>=0.4": None if result["mfu"] is None else result["mfu"] >= 0.4}
    return result


def report_train(r: dict) -> list[str]:
    lines = [f"`conan_hf.stages.supervised.run` (stage 4: InfoNCE with 7 hard negatives + DHNM + Matryoshka) on "
             f"{r['model']} ({r['non_embedding_params'] / 1e6:,.1f}M non-embedding parameters), random init; "
             f"{r['queries_per_step']} queries x (query + positive + 7 negatives) x {r['seq']} tokens = "
             f"{r['tokens_per_step']} tokens per step; gradient checkpointing on; {r['precision']}; optimizer "
             f"{r['optimizer']}"
             + ("" if r["deepspeed_importable"] else " (DeepSpeed is not installed: PyPI has only a source tarball, "
                "so no wheel travels; plain AdamW is used)") + ".",
             f"Step time: median of {r['timed_steps']} steps after {r['steps'] - r['timed_steps']} warm-up steps "
             "(Trainer callbacks, CUDA synchronised). FLOPs per token: 6 x non-embedding parameters + 12 x layers x "
             f"hidden x seq = {r['flops_per_token'] / 1e9:.2f} GFLOP; MFU against "
             + (f"{r['peak_flops'] / 1e12:.1f} TFLOP/s (datasheet dense bf16)" if r["peak_flops"] else "n/a (CPU)")
             + (f"; measured matmul ceiling {r['matmul_tflops']:.0f} TFLOP/s." if r.get("matmul_tflops") else "."),
             "", "| tokens/s | ms/step | TFLOP/s | MFU | peak memory GiB | stage wall s (load + steps + save) |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {r['tokens_per_s']:,.0f} | {r['seconds_per_step'] * 1e3:.1f} | {r['tflops']:.2f} | "
             f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_memory_gib'], '.1f')} | {r['stage_wall_seconds']:.1f} |",
             "", f"Goal MFU >= 40%: {_goal(r['goals']['mfu>=0.4'])}."]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# 5. Ablation


def run_ablation(ctx: Context, budget: Budget) -> dict:
    script = BENCHMARKS / "ablation.py"
    if not script.exists():
        return {"skipped": "benchmarks/ablation.py does not exist yet"}
    if ctx.smoke:
        return {"skipped": "smoke run: the ablation needs the GPU scale"}
    seconds = budget.left() - 5
    if seconds < 30:
        return {"skipped": f"only {seconds:.0f} s left"}
    proc = subprocess.run([sys.executable, str(script), "--scale", "gpu"], capture_output=True, text=True,
                          timeout=seconds, cwd=str(ROOT))
    return {"returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-3000:]}


def report_ablation(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"Skipped: {r['skipped']}."]
    return [f"Exit status {r['returncode']}. Output (tail):", "", "```", r["output_tail"], "```"]


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def use_eager_compile_backend() -> None:
    """Make every later `torch.compile` (transformers' flex-attention wrapper, torch's block-mask builder) trace with
    dynamo but run the captured graph eagerly, skipping inductor's code generation, which takes minutes on a CPU.
    Dynamo itself must stay on: torch's flex attention needs it even uncompiled."""
    compile_ = torch.compile
    if getattr(compile_, "_conan_eager", False):
        return

    def eager_compile(model=None, **kwargs):
        kwargs.pop("mode", None)
        kwargs.pop("options", None)
        kwargs["backend"] = "eager"
        return compile_(model, **kwargs) if model is not None else compile_(**kwargs)

    eager_compile._conan_eager = True
    torch.compile = eager_compile


class Context:
    def __init__(self, args: argparse.Namespace):
        self.smoke = args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.deepspeed = args.deepspeed
        self.softmask_layers = args.softmask_layers
        self.matmul_tflops: float | None = None
        #: The result dict of the running section, filled as it goes (kept when the section fails or times out).
        self.partial: dict | None = None
        self.compile = not args.no_compile
        #: Temporary folders of the running section, removed when it ends.
        self.cleanup: list[Path] = []


RUNNERS: dict[str, tuple[Callable, Callable]] = {
    "correctness": (run_correctness, report_correctness),
    "softmask": (run_softmask, report_softmask),
    "encode": (run_encode, None),  # report_encode needs the Table 5 option
    "train": (run_train, report_train),
    "ablation": (run_ablation, report_ablation),
}


def device_slug(ctx: Context) -> str:
    name = accelerator_name() if ctx.device.type == "cuda" else "cpu-smoke"
    return "".join(c if c.isalnum() else "-" for c in (name or "cpu").lower()).strip("-").replace("--", "-")


def write_report(path: Path, ctx: Context, args, header: dict, results: dict, copies: list[Path]) -> None:
    lines = [f"# GPU benchmark suite (benchmarks/gpu/suite.py{' --smoke' if ctx.smoke else ''})", "",
             f"- date: {header['date']}", f"- device: {header['device']}",
             f"- packages: {', '.join(f'{k} {v}' for k, v in header['versions'].items())}",
             f"- python {platform.python_version()}; deadline {args.deadline:.0f} s; elapsed "
             f"{header['elapsed']:.0f} s (process CPU time {header['cpu_seconds']:.0f} s); flex attention "
             + ("compiled (torch.compile, one static compile per shape and dtype)" if ctx.compile else
                "traced by torch.compile with the eager backend, no inductor kernels (--no-compile)"),
             f"- bf16 8192^3 matmul: {fmt(ctx.matmul_tflops, '.0f')} TFLOP/s measured; datasheet peak "
             f"{fmt((peak_bf16_flops(accelerator_name()) or 0) / 1e12 if ctx.device.type == 'cuda' else None, '.1f')}"
             " TFLOP/s", ""]
    if ctx.smoke:
        lines += ["Smoke run: tiny configurations on CPU, so the figures only show the code runs end to end; they say "
                  "nothing about GPU performance.", ""]
    for name in SECTIONS:
        lines.append(f"## {TITLES[name]}")
        lines.append("")
        entry = results.get(name)
        if entry is None:
            lines.append("Not run (not selected, or the global deadline came first).")
        else:
            lines.append(f"_{entry['seconds']:.1f} s (budget {entry['budget']:.0f} s)_")
            lines.append("")
            if entry.get("result") is not None:
                try:
                    if name == "encode":
                        lines += report_encode(entry["result"], tuple(args.table5) if args.table5 else None)
                    else:
                        lines += RUNNERS[name][1](entry["result"])
                except Exception as error:  # a report bug must not lose the measurement (it is in the JSON)
                    lines.append(f"(report formatting failed: {type(error).__name__}: {error}; see the JSON)")
            if entry.get("error"):
                lines += ["", f"**ERROR** ({entry['error'].splitlines()[-1]})", "", "```", entry["error"][-2500:],
                          "```"]
        lines.append("")
    text = "\n".join(lines)
    payload = json.dumps({"header": header, "smoke": ctx.smoke, "sections": results}, indent=1, default=str)
    for target in [path, *copies]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        target.with_suffix(".json").write_text(payload + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU (the test's run)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report path (default benchmarks/results/gpu_<device>.md); a .json sits beside it")
    parser.add_argument("--copy-to", type=Path, default=None, help="also write the report into this folder "
                        "(e.g. $OUT on the device, so a run killed at its limit still returns it)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="wall-clock seconds for the whole run (GPU 400, smoke 280)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--deepspeed", choices=["auto", "on", "off"], default="auto",
                        help="ZeRO-1 for the training section; auto: on a GPU when deepspeed imports")
    parser.add_argument("--softmask-layers", type=int, default=2, help="full-width layers in section 2")
    parser.add_argument("--no-compile", action="store_true",
                        help="torch.compile with the eager backend (no inductor kernels); default for --smoke, "
                        "because inductor compiling flex attention on a CPU takes minutes")
    parser.add_argument("--table5", nargs=2, type=float, metavar=("TEXTS", "MINUTES"),
                        help="the paper's Table 5 workload, to print the scaled comparison")
    parser.add_argument("--record-lengths", type=Path, metavar="DATA_DIR",
                        help="write benchmarks/gpu/real_lengths.json from the shared data folder, then exit")
    args = parser.parse_args(argv)
    if args.record_lengths:
        record = record_real_lengths(args.record_lengths)
        print(f"wrote {REAL_LENGTHS_FILE}: {len(record['lengths'])} lengths from {record['sources']}")
        return 0

    started = time.monotonic()
    if args.smoke:
        args.no_compile = True
        torch.set_num_threads(1)  # tiny models gain nothing from threads; a shared CI machine loses a lot
    if args.no_compile:
        use_eager_compile_backend()
    else:
        # One static compile per shape and dtype: automatic dynamic shapes would recompile the flex kernel for
        # symbolic lengths (slower kernels, and on CPU a bf16 recompile after a dynamic one fails in inductor), and
        # the cache must hold every (dtype, length) the suite runs.
        torch._dynamo.config.automatic_dynamic_shapes = False
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    ctx = Context(args)
    if args.deadline is None:
        args.deadline = 280.0 if args.smoke else 400.0
    budgets = SMOKE_BUDGETS if args.smoke else GPU_BUDGETS
    output = args.output or ROOT / "benchmarks" / "results" / f"gpu_{device_slug(ctx)}.md"
    copies = [args.copy_to / output.name] if args.copy_to else []
    if ctx.device.type == "cpu" and not args.smoke:
        print("No CUDA device: running the tiny smoke configuration instead (use --smoke to silence this).")
        ctx.smoke = args.smoke = True
    header = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": describe_device(ctx.device.type),
              "versions": package_versions(), "elapsed": 0.0, "cpu_seconds": 0.0}
    ctx.matmul_tflops = measured_matmul_tflops(ctx.device)
    results: dict[str, dict[str, Any]] = {}
    write_report(output, ctx, args, header, results, copies)
    for name in args.sections:
        left = args.deadline - (time.monotonic() - started)
        budget_s = min(budgets[name], left - 3)
        if budget_s < (5 if args.smoke else 20):
            results[name] = {"seconds": 0.0, "budget": max(budget_s, 0.0), "result": None,
                             "error": f"skipped: only {left:.0f} s left before the global deadline"}
            continue
        print(f"[suite] {name}: budget {budget_s:.0f} s", flush=True)
        section_start = time.monotonic()
        entry: dict[str, Any] = {"budget": budget_s, "result": None, "error": None}
        ctx.partial = None
        try:
            # The section's loops stop at 0 s left; the alarm is the backstop for a step that hangs.
            with alarm(budget_s + 20 if not args.smoke else budget_s + 10):
                entry["result"] = RUNNERS[name][0](ctx, Budget(budget_s))
        except BaseException as error:  # noqa: BLE001 - one section's failure must not stop the others
            if isinstance(error, KeyboardInterrupt):
                raise
            entry["error"] = traceback.format_exc()
            entry["result"] = ctx.partial  # what the section had measured before it stopped
            print(f"[suite] {name} failed: {type(error).__name__}: {error}", flush=True)
        entry["seconds"] = time.monotonic() - section_start
        for folder in ctx.cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        ctx.cleanup.clear()
        results[name] = entry
        free_memory()
        header["elapsed"] = time.monotonic() - started
        header["cpu_seconds"] = time.process_time()
        write_report(output, ctx, args, header, results, copies)
        print(f"[suite] {name}: {entry['seconds']:.1f} s{' (ERROR)' if entry['error'] else ''}", flush=True)
    header["elapsed"] = time.monotonic() - started
    header["cpu_seconds"] = time.process_time()
    write_report(output, ctx, args, header, results, copies)
    print(output.read_text(encoding="utf-8"))
    print(f"[suite] report: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
