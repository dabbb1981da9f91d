"""Scale benchmark (issue 11, the parts done so far): time and peak memory as the data grows.

Each case runs in a fresh subprocess (``--case``), which reports its own times and memory from ``/proc/self/status``:
``VmRSS`` before and after each phase and the phase's peak (``VmHWM``, reset per phase through
``/proc/self/clear_refs``); the parent process prints the table, the growth ratio between sizes, the ratio against
the previous implementation measured in the same run, and writes ``benchmarks/results/scale_cpu.txt``.

Cases:

- ``dhnm`` — the DHNM pool state (:class:`trainers.dhnm.NegativePool`) at 100k / 1M / 10M examples, ``k = 7``.
  Synthetic pools: integer ids (as a dataset's ``id`` column), and every example's candidate list is *one shared*
  list of 10 short texts, so the memory of candidate texts stays out of the measure (the real texts belong to the
  dataset; see the NegativePool docstring for the plan to hold them as row ids into a memory-mapped table).
  Measured: RAM of the pool beyond ids + candidate lists (``VmRSS`` growth over the constructor; the state arrays'
  own size is ``state_nbytes``), the fingerprint (hashing ids and texts, once per process), ``DHNMCallback.save``
  and ``.load`` of the checkpoint file, and the per-step update ``apply_scores`` for a step of 64 examples x 7
  scored negatives (median of 300 steps, scores uniform in [0.3, 0.9] so that some negatives are replaced).
  ``dhnm_old`` runs the same on the implementation before issue 11 (``git show <old-ref>:trainers/dhnm.py``:
  JSON state, int64/bool arrays) at the sizes where it finishes in reasonable time.
- ``sft`` — stage-2 preprocessing (``trainers.sft.build_sft_examples``) rows/s with a 150k-vocabulary byte-level BPE
  tokenizer (trained here by ``conan_hf.tokenizer.train_tokenizer`` on synthetic words), one core
  (``TOKENIZERS_PARALLELISM=false``); ``sft_old`` runs the per-row ``build_sft_example`` of ``<old-ref>`` on a few
  rows.
- ``encode`` — ``FastEncoder.encode`` of short synthetic texts (1-3 words) after a warm-up call, with a tiny
  random Conan model whose embeddings are projected to 2048 dimensions (a sentence-transformers ``Dense`` module,
  so the result is large while encoding stays cheap), in memory vs ``output_path=`` (a memory-mapped ``.npy``), at
  three sizes: the peak RSS growth during the call.
- ``lm`` — stages 0-2's data path: each stage's ``run(config)`` with ``--max_steps 2`` (stage 0: vocabulary 4,096) on
  10k / 100k / 1M synthetic rows, memory-mapped (``new``), streamed (``stream``, stages 1-2) and as at ``--old-ref``
  (``old``, up to ``--lm-old-max`` rows): wall and CPU time and the peak RSS of the run, each in a fresh process with
  its own ``datasets`` cache (``HF_DATASETS_CACHE``, emptied after), and the growth ratios between sizes. It writes
  only its own section ``## (lm)`` of the results file.

Usage:
    python benchmarks/scale.py                      # all cases, writes benchmarks/results/scale_cpu.txt
    python benchmarks/scale.py --only dhnm --dhnm-sizes 100000 1000000
    python benchmarks/scale.py --only lm --old-ref e49e9fb     # stages 0-2 (about an hour on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core for the SFT figure
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

K = 7
POOL_SIZE = 10
STEP_EXAMPLES = 64


# ---- memory probes ---------------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss() -> int:
    return _status("VmRSS")


class Phase:
    """Wall time, RSS growth and peak RSS growth of a block (the peak counter is reset on entry)."""

    def __enter__(self) -> Phase:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass
        self.rss_before = rss()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start  # this process only: other jobs share the machine
        self.rss_after = rss()
        self.peak_growth = _status("VmHWM") - self.rss_before
        self.growth = self.rss_after - self.rss_before


# ---- cases (run in a subprocess) -------------------------------------------------------------------------------------
def load_module_from_ref(ref: str, path: str, name: str):
    """Import ``path`` as it was at git ``ref`` (the implementation this benchmark compares against)."""
    import importlib.util

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def case_dhnm(size: int, old_ref: str | None) -> dict:
    import numpy as np
    import torch

    dhnm = load_module_from_ref(old_ref, "trainers/dhnm.py", "dhnm_old") if old_ref else __import__(
        "trainers.dhnm", fromlist=["NegativePool"])

    class NoScores(torch.nn.Module):  # DHNMCallback only needs a loss that can hand over recorded scores
        def pop_hard_negative_scores(self):
            return []

    out: dict = {"size": size}
    with Phase() as data:
        ids = list(range(size))
        shared = [f"negative text {j}" for j in range(POOL_SIZE)]
        candidates = [shared] * size
    out["data_bytes"] = data.growth
    with Phase() as build:
        pool = dhnm.NegativePool(ids, candidates, k=K)
    out["build_s"], out["pool_bytes"], out["pool_peak_bytes"] = build.seconds, build.growth, build.peak_growth
    out["state_bytes"] = int(sum(a.nbytes for a in (pool.active, pool.s0, pool.cursor, pool.pool_sizes)) + (
        pool.fresh_bits.nbytes if hasattr(pool, "fresh_bits") else pool.fresh.nbytes))
    with Phase() as fingerprint:
        pool.fingerprint()
    out["fingerprint_s"] = fingerprint.seconds

    rng = np.random.default_rng(0)
    times = []
    for _ in range(300):
        rows = rng.choice(size, size=STEP_EXAMPLES, replace=False)
        negs = pool.active[rows].astype(np.int64)
        scores = rng.uniform(0.3, 0.9, size=negs.shape)
        start = time.perf_counter()
        pool.apply_scores(rows, negs, scores)
        times.append(time.perf_counter() - start)
    out["step_ms_median"] = statistics.median(times) * 1e3
    out["step_ms_p90"] = sorted(times)[int(0.9 * len(times))] * 1e3

    callback = dhnm.DHNMCallback(pool, NoScores())
    folder = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
    with Phase() as save:
        path = callback.save(folder, global_step=1)
    out["save_s"], out["save_peak_bytes"] = save.seconds, save.peak_growth
    out["file_bytes"] = os.path.getsize(path)
    expected = (pool.active.copy(), pool.s0.copy(), pool.cursor.copy())
    pool.active[:] = -1  # so the load visibly restores the state
    with Phase() as load:
        callback.load(folder, expected_step=1)
    out["load_s"], out["load_peak_bytes"] = load.seconds, load.peak_growth
    out["roundtrip_equal"] = bool(np.array_equal(pool.active, expected[0]) and np.array_equal(pool.cursor, expected[2])
                                  and np.array_equal(pool.s0, expected[1], equal_nan=True))
    os.remove(path)
    out["peak_rss"] = _status("VmHWM")
    return out


def synthetic_words(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(5, 9))))
    return sorted(words)


def build_150k_tokenizer(folder: str) -> dict:
    """Train a 150k byte-level BPE (stage-0 specials) on synthetic words; every word occurs twice or more."""
    from conan_hf.tokenizer import train_tokenizer

    words = synthetic_words(120_000, seed=1)
    rng = random.Random(2)
    lines = []
    for _ in range(3):
        shuffled = words[:]
        rng.shuffle(shuffled)
        lines += [" ".join(shuffled[i:i + 50]) for i in range(0, len(shuffled), 50)]
    start = time.perf_counter()
    tokenizer = train_tokenizer(lines, vocab_size=150_000, show_progress=False)
    seconds = time.perf_counter() - start
    tokenizer.save_pretrained(folder)
    return {"train_s": seconds, "vocab": len(tokenizer)}


def sft_rows(count: int, seed: int = 3) -> tuple[list[str], list[str], list[str]]:
    words = synthetic_words(5000, seed=4)
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    return ([text(12) for _ in range(count)], [text(rng.randint(0, 40)) for _ in range(count)],
            [text(rng.randint(20, 80)) for _ in range(count)])


def case_sft(size: int, tokenizer_dir: str, old_ref: str | None) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    instructions, inputs, outputs = sft_rows(size)
    out: dict = {"size": size, "vocab": len(tokenizer)}
    if old_ref:
        old = load_module_from_ref(old_ref, "trainers/sft.py", "sft_old")
        with Phase() as phase:
            for i in range(size):
                old.build_sft_example(tokenizer, instructions[i], inputs[i], outputs[i], 2048)
    else:
        from trainers.sft import build_sft_examples

        with Phase() as phase:
            columns = build_sft_examples(tokenizer, instructions, inputs, outputs, 2048)
        out["tokens"] = sum(map(len, columns["input_ids"]))
    out["seconds"], out["rows_per_s"], out["peak_bytes"] = phase.seconds, size / phase.seconds, phase.peak_growth
    out["cpu_s"], out["rows_per_cpu_s"] = phase.cpu_seconds, size / phase.cpu_seconds
    return out


def case_encode(size: int, mode: str) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    from conan_hf import ConanConfig, build_sentence_transformer
    from conan_hf.encode import FastEncoder

    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=16)
    dense = Dense(in_features=base.get_embedding_dimension(), out_features=2048, bias=False,
                  activation_function=torch.nn.Identity())
    model = SentenceTransformer(modules=[*base, dense], device="cpu")
    encoder = FastEncoder(model, dtype="float32", max_batch_size=1024, truncation="ignore")
    words = synthetic_words(2000, seed=5)
    rng = random.Random(6)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(size)]
    folder = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
    out: dict = {"size": size, "mode": mode, "dim": 2048}
    encoder.encode(texts[:2048])  # warm-up: one-time allocations (kernels, tokenizer caches) out of the measure
    with Phase() as phase:
        if mode == "memmap":
            result = encoder.encode(texts, output_path=os.path.join(folder, "embeddings.npy"))
        else:
            result = encoder.encode(texts)
    out["seconds"], out["peak_bytes"], out["result_bytes"] = phase.seconds, phase.peak_growth, size * 2048 * 4
    out["first_row_norm"] = float(np.linalg.norm(result[0]))
    del result
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    return out


# ---- stages 0-2: the data path (stream-lm, issue 11) -----------------------------------------------------------------
#: Tokens per packed block in the stage-1 case.
LM_SEQ_LENGTH = 256


def _lm_text(rng: random.Random, vocabulary: list[str], low: int, high: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(low, high)))


def case_lm_data(size: int, folder: str) -> dict:
    """Synthetic stage-0/1 texts (10-60 words) and stage-2 rows (instruction 5-15, input 0-30, output 10-50 words)
    over 5,000 made-up words, as JSONL files in ``folder``; plus (once) a 4,096-token tokenizer and a tiny decoder."""
    rng = random.Random(size)
    vocabulary = synthetic_words(5_000)
    root = Path(folder)
    with open(root / f"texts-{size}.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(size):
            handle.write(json.dumps({"text": _lm_text(rng, vocabulary, 10, 60)}) + "\n")
    with open(root / f"sft-{size}.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(size):
            row = {"instruction": _lm_text(rng, vocabulary, 5, 15), "output": _lm_text(rng, vocabulary, 10, 50)}
            if rng.random() < 0.7:
                row["input"] = _lm_text(rng, vocabulary, 1, 30)
            handle.write(json.dumps(row) + "\n")
    if not (root / "lm" / "config.json").is_file():
        import torch

        from conan_hf.tokenizer import train_tokenizer
        from trainers.pretrain import new_causal_lm

        tokenizer = train_tokenizer((_lm_text(rng, vocabulary, 10, 60) for _ in range(20_000)), vocab_size=4096,
                                    show_progress=False)
        torch.manual_seed(0)
        tokenizer.save_pretrained(root / "lm")
        new_causal_lm("tiny", tokenizer).save_pretrained(root / "lm")
    return {"size": size, "bytes": (root / f"texts-{size}.jsonl").stat().st_size}


def case_lm(stage: str, impl: str, size: int, folder: str, old_ref: str | None) -> dict:
    """One stage's ``run`` (``--max_steps 2``) on ``size`` synthetic rows: ``new`` (memory-mapped), ``stream``
    (``streaming: true``) or ``old`` (the stage module of ``old_ref``); wall time and peak RSS of the whole run."""
    import torch

    torch.set_num_threads(1)
    root = Path(folder)
    module_path = {"tokenizer": "trainers/tokenizer_stage.py", "pretrain": "trainers/pretrain.py",
                   "sft": "trainers/sft.py"}[stage]
    if impl == "old":
        module = load_module_from_ref(old_ref, module_path, f"{stage}_old")
    else:
        module = __import__(module_path[:-3].replace("/", "."), fromlist=["run"])
    file = root / (f"sft-{size}.jsonl" if stage == "sft" else f"texts-{size}.jsonl")
    source = {"path": str(file), "streaming": True} if impl == "stream" else str(file)
    common = {"output_dir": str(root / f"out-{stage}-{impl}-{size}"), "data": [source]}
    train = {"max_steps": 2, "save_steps": 1000, "bf16": False, "num_threads": 1, "disable_tqdm": True,
             "per_device_train_batch_size": 8, "resume": "no", "logging_steps": 1}
    from trainers.config import config_from_dict

    if stage == "tokenizer":
        config = config_from_dict(module.TokenizerConfig, {**common, "vocab_size": 4096})
    elif stage == "pretrain":
        config = config_from_dict(module.PretrainConfig, {**common, **train, "tokenizer": str(root / "lm"),
                                                          "model": "tiny", "seq_length": LM_SEQ_LENGTH})
    else:
        config = config_from_dict(module.SFTConfig, {**common, **train, "model": str(root / "lm"),
                                                     "max_length": 512})
    import threading

    # VmHWM counts the pages of memory-mapped Arrow files the run has read (file-backed, shared, reclaimable by the
    # kernel); the anonymous part (RssAnon: Python objects, tensors, buffers) is what a stage really holds, so its
    # peak is sampled too.
    anon = {"peak": _status("RssAnon"), "stop": False}

    def sample() -> None:
        while not anon["stop"]:
            anon["peak"] = max(anon["peak"], _status("RssAnon"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    anon_before = _status("RssAnon")
    with Phase() as phase:
        sampler.start()
        module.run(config)
        anon["stop"] = True
        sampler.join()
    return {"size": size, "seconds": phase.seconds, "cpu_s": phase.cpu_seconds, "rss_before": phase.rss_before,
            "peak_rss": phase.rss_before + phase.peak_growth, "peak_growth": phase.peak_growth,
            "anon_before": anon_before, "peak_anon": anon["peak"]}


def lm_section(args, emit, flush=lambda: None) -> None:
    """Stages 0-2 data path: peak RSS and time at each size, new (memory-mapped / streamed) and old; ``flush()``
    after each size writes what is measured so far."""
    import shutil

    folder = tempfile.mkdtemp(prefix="scale-lm-")
    emit(f"## (lm) stages 0-2 data path (`run(config)` with --max_steps 2; tokenizer: vocab 4096), synthetic rows "
         f"(texts 10-60 words; SFT 5-15 / 0-30 / 10-50 words), seq_length {LM_SEQ_LENGTH}, one thread")
    emit("new = memory-mapped data layer + batched map (datasets cache), stream = `streaming: true`, "
         f"old = git {args.old_ref} (read_sources list + one tokenizer call + Python-list packing)")
    emit("stage      impl       rows   wall s    CPU s   RSS before   peak RSS  peak growth  anon before  peak anon")
    emit("(peak RSS = VmHWM, including the pages of memory-mapped Arrow files read; anon = RssAnon, sampled every 20 ms)")
    reports: dict = {}
    for size in args.lm_sizes:
        made = run_case("lm_data", str(size), folder, timeout=1800)
        if "error" in made:
            emit(f"data {size:,}: ERROR {made['error']}")
            continue
        for stage in args.lm_stages:
            impls = ["new", "stream"] if stage != "tokenizer" else ["new"]
            if size <= args.lm_old_max:
                impls.append("old")
            for impl in impls:
                cache = Path(folder) / "hf-cache"
                os.environ["HF_DATASETS_CACHE"] = str(cache)  # inherited by the case; emptied after it
                r = run_case("lm", stage, impl, str(size), folder, args.old_ref, timeout=3600)
                shutil.rmtree(cache, ignore_errors=True)
                for leftover in Path(folder).glob("out-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                reports[(stage, impl, size)] = r
                if "error" in r:
                    emit(f"{stage:<9}  {impl:<6}  {size:>9,}  ERROR {r['error']}")
                    continue
                emit(f"{stage:<9}  {impl:<6}  {size:>9,}  {r['seconds']:>7.1f}  {r['cpu_s']:>7.1f}  "
                     f"{mb(r['rss_before']):>11}  {mb(r['peak_rss']):>9}  {mb(r['peak_growth']):>11}  "
                     f"{mb(r['anon_before']):>11}  {mb(r['peak_anon']):>9}")
        for name in (f"texts-{size}.jsonl", f"sft-{size}.jsonl"):
            (Path(folder) / name).unlink(missing_ok=True)
        flush()
    for stage in args.lm_stages:
        for impl in ("new", "stream", "old"):
            sizes = [s for s in args.lm_sizes if "error" not in reports.get((stage, impl, s), {"error": 1})]
            for a, b in zip(sizes, sizes[1:]):
                ra, rb = reports[(stage, impl, a)], reports[(stage, impl, b)]
                emit(f"growth {stage} {impl} {a:,} -> {b:,}: peak RSS {ratio(rb['peak_rss'], ra['peak_rss'])}"
                     f" (peak growth {ratio(rb['peak_growth'], ra['peak_growth'])}), peak anon "
                     f"{ratio(rb['peak_anon'], ra['peak_anon'])}, wall {ratio(rb['seconds'], ra['seconds'])}")
    shutil.rmtree(folder, ignore_errors=True)
    emit("")


def write_section(path: str, title_prefix: str, section: list[str]) -> None:
    """Replace the section starting with ``title_prefix`` in the results file (or append it), keeping the others."""
    file = Path(path)
    old = file.read_text().splitlines() if file.is_file() else []
    start = next((i for i, line in enumerate(old) if line.startswith(title_prefix)), None)
    if start is None:
        kept = old + ([""] if old and old[-1] else [])
        file.write_text("\n".join(kept + section) + "\n")
        return
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    file.write_text("\n".join(old[:start] + section + old[end:]) + "\n")


# ---- driver ----------------------------------------------------------------------------------------------------------
def run_case(*args: str, timeout: int = 900) -> dict:
    """Run ``--case ...`` in a fresh interpreter; returns its JSON report (or the error)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["process_s"] = time.perf_counter() - start
    return report


def mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=["dhnm", "sft", "encode", "lm"], default=["dhnm", "sft", "encode"])
    parser.add_argument("--lm-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--lm-stages", nargs="+", default=["pretrain", "sft", "tokenizer"])
    parser.add_argument("--lm-old-max", type=int, default=100_000, help="largest size the old stages run at")
    parser.add_argument("--dhnm-sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--dhnm-old-sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="sizes at which the old JSON implementation is measured (10M JSON takes ~5 min)")
    parser.add_argument("--sft-sizes", type=int, nargs="+", default=[2_000, 10_000, 40_000])
    parser.add_argument("--sft-old-rows", type=int, default=5)
    parser.add_argument("--encode-sizes", type=int, nargs="+", default=[10_000, 30_000, 90_000])
    parser.add_argument("--old-ref", default="35740d4", help="git revision of the implementation before issue 11")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "scale_cpu.txt"))
    args = parser.parse_args(argv)

    if args.case:
        name, rest = args.case[0], args.case[1:]
        if name == "dhnm":
            report = case_dhnm(int(rest[0]), rest[1] if len(rest) > 1 else None)
        elif name == "sft":
            report = case_sft(int(rest[0]), rest[1], rest[2] if len(rest) > 2 else None)
        elif name == "tokenizer":
            report = build_150k_tokenizer(rest[0])
        elif name == "lm_data":
            report = case_lm_data(int(rest[0]), rest[1])
        elif name == "lm":
            report = case_lm(rest[0], rest[1], int(rest[2]), rest[3], rest[4])
        else:
            report = case_encode(int(rest[0]), rest[1])
        print(json.dumps(report))
        return

    from _device import describe_device

    lines = [f"device: {describe_device('cpu')}", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"old implementation: git {args.old_ref}; each case in a fresh subprocess; RSS from /proc/self/status", ""]

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)
    reports: dict = {}
    if "dhnm" in args.only:
        emit(f"## (a) DHNM pool state, k={K}, {POOL_SIZE} shared candidates per example, step = {STEP_EXAMPLES} "
             f"examples x {K} scores")
        emit("impl  examples   state B/ex  pool RSS B/ex  build s  fingerpr s  save s  load s  save+load s  file MB"
             "   step ms (p90)   peak RSS  roundtrip")
        emit("(state B/ex: the state arrays; pool RSS B/ex: RSS growth over the constructor (state + id index + "
             "references); peak RSS: whole process)")
        rows = [(size, None) for size in args.dhnm_sizes] + [(size, args.old_ref) for size in args.dhnm_old_sizes]
        for size, ref in rows:
            r = run_case("dhnm", str(size), *([ref] if ref else []), timeout=1800)
            reports[("dhnm", size, bool(ref))] = r
            label = "old " if ref else "new "
            if "error" in r:
                emit(f"{label}  {size:>9,}  ERROR {r['error']}")
                continue
            emit(f"{label}  {size:>9,}  {r['state_bytes'] / size:>10.1f}  {r['pool_bytes'] / size:>13.1f}  "
                 f"{r['build_s']:>7.1f}  {r['fingerprint_s']:>10.2f}  {r['save_s']:>6.2f}  {r['load_s']:>6.2f}  "
                 f"{r['save_s'] + r['load_s']:>11.2f}  {r['file_bytes'] / 1e6:>7.1f}  "
                 f"{r['step_ms_median']:>7.3f} ({r['step_ms_p90']:.3f})  {mb(r['peak_rss']):>10}  "
                 f"{r['roundtrip_equal']}")
        sizes = [s for s in args.dhnm_sizes if "error" not in reports[("dhnm", s, False)]]
        for a, b in zip(sizes, sizes[1:]):
            ra, rb = reports[("dhnm", a, False)], reports[("dhnm", b, False)]
            emit(f"growth new {a:,} -> {b:,} ({b / a:.0f}x examples): save+load "
                 f"{ratio(rb['save_s'] + rb['load_s'], ra['save_s'] + ra['load_s'])}, pool RSS "
                 f"{ratio(rb['pool_bytes'], ra['pool_bytes'])}, "
                 f"step {ratio(rb['step_ms_median'], ra['step_ms_median'])}")
        for size in args.dhnm_old_sizes:
            new, old = reports.get(("dhnm", size, False)), reports.get(("dhnm", size, True))
            if new and old and "error" not in new and "error" not in old:
                old_io, new_io = old["save_s"] + old["load_s"], new["save_s"] + new["load_s"]
                emit(f"old / new at {size:,}: save+load {ratio(old_io, new_io)}"
                     f", state bytes {ratio(old['state_bytes'], new['state_bytes'])}, pool RSS "
                     f"{ratio(old['pool_bytes'], new['pool_bytes'])}, "
                     f"step {ratio(old['step_ms_median'], new['step_ms_median'])}"
                     f", file {ratio(old['file_bytes'], new['file_bytes'])}")
        emit("")

    if "sft" in args.only:
        folder = tempfile.mkdtemp()
        tok = run_case("tokenizer", folder)
        emit(f"## (b) SFT preprocessing, 150k-vocabulary byte-level BPE (trained in {tok.get('train_s', 0):.0f} s, "
             f"{tok.get('vocab')} tokens), one core, rows of 12 + 0-40 + 20-80 words")
        emit("impl  rows     wall s   CPU s   rows/s (wall)  rows per CPU-s  tokens/row  peak RSS growth")
        for size in args.sft_sizes:
            r = run_case("sft", str(size), folder)
            reports[("sft", size)] = r
            if "error" in r:
                emit(f"new   {size:>7,}  ERROR {r['error']}")
                continue
            emit(f"new   {size:>7,}  {r['seconds']:>6.2f}  {r['cpu_s']:>6.2f}  {r['rows_per_s']:>13,.0f}  "
                 f"{r['rows_per_cpu_s']:>14,.0f}  {r['tokens'] / size:>10.1f}  {mb(r['peak_bytes'])}")
        old = run_case("sft", str(args.sft_old_rows), folder, args.old_ref)
        reports[("sft", "old")] = old
        if "error" in old:
            emit(f"old   {args.sft_old_rows:>7,}  ERROR {old['error']}")
        else:
            emit(f"old   {args.sft_old_rows:>7,}  {old['seconds']:>6.2f}  {old['cpu_s']:>6.2f}  "
                 f"{old['rows_per_s']:>13,.1f}  {old['rows_per_cpu_s']:>14,.1f}")
            best = [reports[("sft", s)]["rows_per_cpu_s"] for s in args.sft_sizes if "error" not in reports[("sft", s)]]
            if best:
                emit(f"new / old rows per CPU-s (largest size): {best[-1] / old['rows_per_cpu_s']:,.0f}x")
        emit("")

    if "encode" in args.only:
        emit("## (c) FastEncoder, tiny random Conan model + Dense to 2048 dims, float32, peak RSS growth during encode")
        emit("texts     result MB  in-memory peak  memmap peak  memmap/in-memory  in-memory s  memmap s")
        for size in args.encode_sizes:
            mem, mm = run_case("encode", str(size), "memory"), run_case("encode", str(size), "memmap")
            reports[("encode", size)] = (mem, mm)
            if "error" in mem or "error" in mm:
                emit(f"{size:>7,}  ERROR {mem.get('error') or mm.get('error')}")
                continue
            emit(f"{size:>7,}  {mem['result_bytes'] / 1e6:>9.0f}  {mb(mem['peak_bytes']):>14}  "
                 f"{mb(mm['peak_bytes']):>11}"
                 f"  {ratio(mm['peak_bytes'], mem['peak_bytes']):>16}  {mem['seconds']:>11.1f}  {mm['seconds']:>8.1f}")
        sizes = [s for s in args.encode_sizes if all("error" not in r for r in reports[("encode", s)])]
        for a, b in zip(sizes, sizes[1:]):
            (ma, mma), (mb_, mmb) = reports[("encode", a)], reports[("encode", b)]
            emit(f"growth {a:,} -> {b:,} ({b / a:.0f}x texts): in-memory peak "
                 f"{ratio(mb_['peak_bytes'], ma['peak_bytes'])}"
                 f", memmap peak {ratio(mmb['peak_bytes'], mma['peak_bytes'])}")
        emit("")

    if "lm" in args.only:  # its own section of the results file (the other sections are left as they are)
        start = len(lines)

        def flush() -> None:
            section = lines[start:]
            section.insert(1, f"({lines[0]}; {lines[1]})")  # the machine and date of these figures
            write_section(args.output, "## (lm)", section)

        lm_section(args, emit, flush)
        flush()
        if args.only == ["lm"]:
            print(f"wrote the (lm) section of {args.output}")
            return

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
