"""Scale benchmark (issue 11, the parts done so far): time and peak memory as the data grows.

Each case runs in a fresh subprocess (``--case``), which reports its own times and memory from ``/proc/self/status``:
``VmRSS`` before and after each phase and the phase's peak (``VmHWM``, reset per phase through
``/proc/self/clear_refs``); the parent process prints the table, the growth ratio between sizes, the ratio against
the previous implementation measured in the same run, and writes ``benchmarks/results/scale_cpu.txt``.

Cases:

- ``dhnm`` — DHNM pools (:class:`conan_hf.dhnm.pool.NegativePool`, ``k = 7``, 10 candidates per example) at 100k / 1M
  / 10M examples. ``dhnm_data`` first writes, in its own process, a corpus of as many ~65-character passages as an
  Arrow file and ``candidate_ids.npy`` (random corpus rows, as a miner returns them). Three kinds of pools:
  ``ids`` (``NegativePool.from_ids`` keyed by row index, ``candidate_ids`` memory-mapped, the corpus a memory-mapped
  ``datasets.Dataset``: what stage 4 builds), ``ids-ram`` (``candidate_ids`` read into RAM) and the baseline
  ``texts`` (``--dhnm-baseline-ref``'s pool over per-example lists of fresh Python strings, the way stage 4 held
  them; at 100k / 300k / 1M, as 10M would need ~12 GB). Measured: the anonymous RSS growth while building the pool
  (``RssAnon``: memory-mapped pages are page cache and not counted), the state arrays' size, the fingerprint,
  ``DHNMCallback.save`` + ``.load``, the per-step update ``apply_scores`` for 64 examples x 7 scored negatives
  (median of 300 steps, scores uniform in [0.3, 0.9] so that some negatives are replaced) and the collator's
  text lookup for those 64 x 7 negatives.
- ``sft`` — stage-2 preprocessing (``conan_hf.stages.sft.build_sft_examples``) rows/s with a 150k-vocabulary byte-level
  BPE tokenizer (trained here by ``conan_hf.tokenizer.train_tokenizer`` on synthetic words), one core
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
- ``mine`` — hard-negative mining (:func:`conan_hf.data.teacher.mine_negative_ids`): ``Q`` queries, one positive
  each, over a corpus of ``N`` synthetic passages (the positives among them), pool size 30, relative margin 0.05,
  with the tiny random Conan model (``ConanConfig.tiny()``: 2 layers, hidden 128, the parameter count printed;
  embedding dim 128, ``max_seq_length`` 16), one encoding thread. Time of each phase and the peak RSS growth of the
  whole call, with the exact ``"flat"`` index (in RAM; ``--mine-indexes flat stream`` adds the exact ``"stream"``
  index, which re-reads the corpus from disk instead).
  ``mine_old`` runs the implementation before issue 11 (sentence-transformers' brute force ``mine_hard_negatives``)
  at the small sizes.
- ``teacher`` — the teacher filter (:func:`conan_hf.data.teacher.filter_by_teacher`) over a generator of pairs, the
  tiny model + ``Dense`` to 2048 dims (as ``encode``), chunk 16384: time and peak RSS growth; ``teacher_old`` runs
  the implementation before issue 11 (all embeddings kept) on the same rows.

- ``load`` — the data layer (:mod:`conan_hf.data.sources`) reading a JSONL file of N query/positive pairs (~600 B
  per row) with a column mapping and the row checks, then consuming every row in batches of 1,000: ``list`` is the
  path before issue 11 (``read_sources`` → a Python list → ``Dataset.from_list``), ``mmap`` the memory-mapped
  ``load_sources`` (Arrow cache built, then read), ``stream`` the ``IterableDataset``, ``rank0/2`` rank 0 of 2 of the
  stream (rows it reads: about half).

- ``clr`` — the CLR builder (``write_clr_dataset`` over a ``RowStream``) on synthetic triplet JSONL files at 10k /
  100k / 1M rows with the Table 7 mix and an offline prefix translator: wall time and peak RSS (whole process, and
  growth during the build); ``old`` runs the in-memory builder of git ``CLR_OLD_REF`` at the sizes where it fits.
- ``clr_http`` — ``OpenAITranslator`` under the CLR builder against a local keep-alive server (in-process threads)
  where 2 % of the queries are slow: wall time against the ideal (total server time over the workers), connections
  opened (counted by the server), and whether the outputs kept the source order; old vs new with and without
  prefetching the next batches.
- ``weak`` — stage 3's data path: ``conan_hf.stages.weak.run`` with ``--max_steps 2`` (batch 64, ``max_seq_length`` 32)
  on a JSONL file of N instruction/input/output rows (~650 B per row, 4 instructions) with a tiny random Conan model,
  each run in a fresh process with an empty ``datasets`` cache: wall time and peak RSS growth of the whole
  ``run`` (reading, pair conversion, grouping, model, 2 steps). ``mmap``: the sources memory-mapped (cache built,
  pairs converted in a batched ``map``, groups as selections); ``stream``: the source with ``streaming: true``
  (read lazily: only the rows of 2 steps are read); ``old``: ``conan_hf/stages/weak.py`` at ``--weak-old-ref`` (the
  list-based stage: ``read_sources`` → Python rows → ``Dataset.from_list``).

Usage:
    python benchmarks/scale.py                      # all cases, writes benchmarks/results/scale_cpu.txt
    python benchmarks/scale.py --only dhnm --dhnm-sizes 100000 1000000
    python benchmarks/scale.py --only lm --old-ref e49e9fb     # stages 0-2 (about an hour on 2 busy cores)
    python benchmarks/scale.py --only clr clr_http   # the CLR sections only (about 10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
    """Wall time, RSS growth and peak RSS growth of a block (the peak counter is reset on entry), and the peak
    growth of anonymous memory (``RssAnon``, sampled every 10 ms): pages of a memory-mapped file count in RSS but are
    page cache the kernel can drop, so ``anon_peak_growth`` is what the process really holds."""

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.anon_peak = max(self.anon_peak, _status("RssAnon"))

    def __enter__(self) -> Phase:
        import threading

        self.anon_before = self.anon_peak = _status("RssAnon")
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
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
        self._done.set()
        self._sampler.join()
        self.anon_peak_growth = max(self.anon_peak, _status("RssAnon")) - self.anon_before
        self.cpu_seconds = time.process_time() - self.cpu_start  # this process only: other jobs share the machine
        self.rss_after = rss()
        self.peak_growth = _status("VmHWM") - self.rss_before
        self.growth = self.rss_after - self.rss_before
        self.anon_growth = _status("RssAnon") - self.anon_before  # without file-backed (memory-mapped) pages


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


def synthetic_words(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(5, 9))))
    return sorted(words)


def _filler_texts(count: int = 1000, seed: int = 7) -> list[str]:
    words = synthetic_words(3000, seed=seed)
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(7)) for _ in range(count)]


def passage(j: int, fillers: list[str]) -> str:
    """Text of corpus row ``j`` (~65 characters): a fresh Python string on each call, as read from a data file."""
    return f"passage {j:09d} {fillers[j % len(fillers)]}"


def case_dhnm_data(size: int, folder: str) -> dict:
    """Write the synthetic DHNM data of ``size`` examples into ``folder`` (run in its own process): a corpus of
    ``size`` passages as an Arrow file (``corpus.arrow``, what ``Dataset.save_to_disk`` holds) and
    ``candidate_ids.npy`` (``size x POOL_SIZE`` int64 rows of that corpus, hardest first, as a miner returns)."""
    import numpy as np
    import pyarrow as pa

    fillers = np.array(_filler_texts())
    schema = pa.schema([("text", pa.large_string())])
    start = time.perf_counter()
    with pa.OSFile(os.path.join(folder, "corpus.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for first in range(0, size, 1_000_000):
            rows = np.arange(first, min(size, first + 1_000_000))
            texts = [passage(j, fillers) for j in rows.tolist()]
            writer.write_batch(pa.record_batch([pa.array(texts, type=pa.large_string())], schema=schema))
    ids = np.lib.format.open_memmap(os.path.join(folder, "candidate_ids.npy"), mode="w+", dtype=np.int64,
                                    shape=(size, POOL_SIZE))
    rng = np.random.default_rng(0)
    for first in range(0, size, 1_000_000):
        stop = min(size, first + 1_000_000)
        ids[first:stop] = rng.integers(0, size, size=(stop - first, POOL_SIZE))
    ids.flush()
    return {"size": size, "seconds": time.perf_counter() - start}


def _step_times(pool, size: int) -> tuple[list[float], list[float]]:
    """Per-step update (``apply_scores``, 64 examples x 7 scores) and the collator's text lookup for those rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    update, lookup = [], []
    for _ in range(300):
        rows = rng.choice(size, size=STEP_EXAMPLES, replace=False)
        negs = pool.active[rows].astype(np.int64)
        scores = rng.uniform(0.3, 0.9, size=negs.shape)
        start = time.perf_counter()
        pool.apply_scores(rows, negs, scores)
        update.append(time.perf_counter() - start)
        start = time.perf_counter()
        if hasattr(pool, "negative_texts"):
            texts = pool.negative_texts(rows, pool.active[rows])
        else:  # the baseline: candidates are Python lists of strings
            texts = [[pool.candidates[r][c] for c in pool.active[r] if c >= 0] for r in rows.tolist()]
        lookup.append(time.perf_counter() - start)
        assert len(texts) == STEP_EXAMPLES
    return update, lookup


def case_dhnm(size: int, mode: str, data_dir: str, baseline_ref: str | None) -> dict:
    """One DHNM pool of ``size`` examples, k=7, ``POOL_SIZE`` candidates each.

    ``mode``: ``ids`` (the pool as stage 4 builds it: row-index ids, ``candidate_ids.npy`` memory-mapped, the corpus
    a memory-mapped Arrow table), ``ids-ram`` (the same with ``candidate_ids`` read into RAM), ``texts`` (the
    baseline, ``<baseline_ref>``'s NegativePool over per-example lists of Python strings, as stage 4 held them;
    its RAM includes those lists, which is what the pool needed).
    """
    import numpy as np
    import torch

    class NoScores(torch.nn.Module):  # DHNMCallback only needs a loss that can hand over recorded scores
        def pop_hard_negative_scores(self):
            return []

    out: dict = {"size": size, "mode": mode}
    if mode == "texts":
        dhnm = load_module_from_ref(baseline_ref, "conan_hf/dhnm/pool.py", "dhnm_baseline")
        fillers = _filler_texts()
        ids_on_disk = np.load(os.path.join(data_dir, "candidate_ids.npy"), mmap_mode="r")
        with Phase() as build:
            candidates = []
            for first in range(0, size, 1_000_000):
                block = ids_on_disk[first:first + 1_000_000].tolist()
                candidates += [[passage(j, fillers) for j in row] for row in block]
            pool = dhnm.NegativePool(list(range(size)), candidates, k=K)
    else:
        from datasets import Dataset

        from conan_hf.dhnm import NegativePool

        with Phase() as build:
            corpus = Dataset.from_file(os.path.join(data_dir, "corpus.arrow"))  # memory-mapped
            candidate_ids = np.load(os.path.join(data_dir, "candidate_ids.npy"),
                                    mmap_mode="r" if mode == "ids" else None)
            pool = NegativePool.from_ids(None, candidate_ids, corpus, k=K)
        dhnm = sys.modules["conan_hf.dhnm"]
        out["candidate_ids_bytes"] = int(candidate_ids.nbytes)
    out["build_s"], out["pool_bytes"], out["pool_anon_bytes"] = build.seconds, build.growth, build.anon_growth
    out["pool_peak_bytes"], out["state_bytes"] = build.peak_growth, pool.state_nbytes()
    with Phase() as fingerprint:
        pool.fingerprint()
    out["fingerprint_s"] = fingerprint.seconds
    update, lookup = _step_times(pool, size)
    out["step_ms_median"], out["step_ms_p90"] = statistics.median(update) * 1e3, sorted(update)[270] * 1e3
    out["lookup_ms_median"] = statistics.median(lookup) * 1e3

    callback = dhnm.DHNMCallback(pool, NoScores())
    folder = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
    with Phase() as save:
        path = callback.save(folder, global_step=1)
    out["save_s"], out["file_bytes"] = save.seconds, os.path.getsize(path)
    expected = (pool.active.copy(), pool.s0.copy(), pool.cursor.copy())
    pool.active[:] = -1  # so the load visibly restores the state
    with Phase() as load:
        callback.load(folder, expected_step=1)
    out["load_s"] = load.seconds
    out["roundtrip_equal"] = bool(np.array_equal(pool.active, expected[0]) and np.array_equal(pool.cursor, expected[2])
                                  and np.array_equal(pool.s0, expected[1], equal_nan=True))
    os.remove(path)
    out["peak_rss"] = _status("VmHWM")
    return out


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
        old = load_module_from_ref(old_ref, "conan_hf/stages/sft.py", "sft_old")
        with Phase() as phase:
            for i in range(size):
                old.build_sft_example(tokenizer, instructions[i], inputs[i], outputs[i], 2048)
    else:
        from conan_hf.stages.sft import build_sft_examples

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

        from conan_hf.stages.pretrain import new_causal_lm
        from conan_hf.tokenizer import train_tokenizer

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
    module_path = {"tokenizer": "conan_hf/stages/tokenizer.py", "pretrain": "conan_hf/stages/pretrain.py",
                   "sft": "conan_hf/stages/sft.py"}[stage]
    if impl == "old":
        module = load_module_from_ref(old_ref, module_path, f"{stage}_old")
    else:
        module = __import__(module_path[:-3].replace("/", "."), fromlist=["run"])
    file = root / (f"sft-{size}.jsonl" if stage == "sft" else f"texts-{size}.jsonl")
    source = {"path": str(file), "streaming": True} if impl == "stream" else str(file)
    common = {"output_dir": str(root / f"out-{stage}-{impl}-{size}"), "data": [source]}
    train = {"max_steps": 2, "save_steps": 1000, "bf16": False, "num_threads": 1, "disable_tqdm": True,
             "per_device_train_batch_size": 8, "resume": "no", "logging_steps": 1}
    from conan_hf.training.config import config_from_dict

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
    emit("(peak RSS = VmHWM, including the pages of memory-mapped Arrow files read; anon = RssAnon, "
         "sampled every 20 ms)")
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
def write_pairs(path: str, size: int) -> None:
    """``size`` JSONL pairs of ~600 bytes: a 10-word query and a 70-word positive (plus an unmapped column)."""
    words = synthetic_words(5000, seed=11)
    rng = random.Random(5)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(size):
            query = " ".join(rng.choices(words, k=10))
            positive = " ".join(rng.choices(words, k=70))
            handle.write(json.dumps({"id": i, "title": query, "body": positive, "source": "synthetic"}) + "\n")


def case_load(path: str, mode: str) -> dict:
    import datasets  # noqa: F401 - imported before the measured phase

    from conan_hf.data.sources import load_sources, read_sources

    source = [{"path": path, "columns": {"query": "title", "positive": "body"}}]
    kwargs = {"required": ["query", "positive"], "text": ["query", "positive"], "what": "benchmark data"}
    cache = tempfile.mkdtemp(prefix="conan-load-cache-")
    rows, shards = 0, None
    with Phase() as phase:
        if mode == "list":
            from datasets import Dataset

            data = Dataset.from_list(read_sources(source, None, **kwargs))
            batches = data.iter(batch_size=1000)
        elif mode == "mmap":
            data = load_sources(source, cache_dir=cache, **kwargs)
            batches = data.iter(batch_size=1000)
        else:
            rank, world = (0, 2) if mode == "rank0/2" else (0, 1)
            data = load_sources(source, streaming=True, rank=rank, world_size=world, **kwargs)
            shards = data.n_shards  # this rank's shards (byte ranges of the file)
            batches = data.iter(batch_size=1000)
        for batch in batches:
            rows += len(batch["query"])
    return {"seconds": phase.seconds, "cpu_s": phase.cpu_seconds, "peak_bytes": phase.peak_growth,
            "anon_peak_bytes": phase.anon_peak_growth, "rows": rows, "file_bytes": os.path.getsize(path),
            "shards": shards}


# ---- CLR builder and HTTP translator (issue 11) ---------------------------------------------------------------------
CLR_OLD_REF = "a9bce54"  # conan_hf/data/clr.py and translate.py before streaming


def load_package_module_from_ref(ref: str, path: str, name: str):
    """Like :func:`load_module_from_ref`, for a module with relative imports: it is loaded as ``conan_hf.data.<name>``
    (so ``from .cache import ...`` finds today's siblings)."""
    import importlib.util

    import conan_hf.data  # noqa: F401  (the parent package of the module)

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"conan_hf.data.{name}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def clr_source_file(size: int) -> str:
    """A synthetic triplet file of ``size`` rows (~780 bytes each: a query, a 200-character positive, two negatives),
    written once per size under ``SCALE_TMP``; queries repeat (every 3rd row reuses an earlier query text)."""
    folder = Path(os.environ.get("SCALE_TMP") or tempfile.gettempdir())
    path = folder / f"clr_source_{size}.jsonl"
    if path.is_file():
        return str(path)
    words = synthetic_words(3000, seed=7)
    rng = random.Random(8)

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for i in range(size):
            query = f"query {rng.randrange(i)}" if i % 3 == 2 else f"{text(6)} {i}"
            handle.write(json.dumps({"id": f"q{i}", "query": query, "positive": text(28),
                                     "negatives": [text(28), text(28)]}) + "\n")
    partial.rename(path)
    return str(path)


def _prefix_translator(base):
    """A fast offline translator: ``"<lang>: <text>"``, cacheable like an LLM's (so the run memo is exercised).
    Non-Latin target languages fail the script check, so about a third of the translated rows are rejected."""

    class PrefixTranslator(base):
        model_name = "prefix"

        def translate(self, texts, language, ids=None):
            self.num_translated += len(texts)
            return [f"{language}: {t}" for t in texts]

    return PrefixTranslator()


def case_clr(size: int, impl: str, batch_size: int) -> dict:
    """The CLR builder over a ``size``-row JSONL file with the Table 7 mix: ``new`` streams the file through
    ``write_clr_dataset``; ``old`` (git ``CLR_OLD_REF``) reads every row, builds in memory and writes at the end."""
    source = clr_source_file(size)
    folder = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
    output = os.path.join(folder, "clr.jsonl")
    out: dict = {"size": size, "impl": impl, "source_bytes": os.path.getsize(source)}
    if impl == "new":
        from conan_hf.data.clr import TABLE7, RowStream, write_clr_dataset
        from conan_hf.data.translate import Translator

        translator = _prefix_translator(Translator)
        with Phase() as phase:
            report = write_clr_dataset(RowStream(source), output, TABLE7, translator, seed=42, batch_size=batch_size,
                                       show_progress_bar=False)
    else:
        old_translate = load_package_module_from_ref(CLR_OLD_REF, "conan_hf/data/translate.py", "translate_old")
        old = load_package_module_from_ref(CLR_OLD_REF, "conan_hf/data/clr.py", "clr_old")
        from conan_hf.data.readers import load_rows

        translator = _prefix_translator(old_translate.Translator)
        with Phase() as phase:  # what the old `conan-clr` main did
            rows = list(load_rows(source))
            dataset, report = old.build_clr_dataset(rows, old.TABLE7, translator, seed=42, show_progress_bar=False)
            with open(output, "w", encoding="utf-8") as handle:
                for record in dataset:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    out["seconds"], out["peak_growth"] = phase.seconds, phase.peak_growth
    out["peak_rss"] = _status("VmHWM")
    out["output_rows"], out["rejected"] = report.num_output_rows, report.num_rejected
    out["output_bytes"] = os.path.getsize(output)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    return out


def case_clr_http(impl: str, requests: int, slow_fraction: float, fast_s: float, slow_s: float, workers: int,
                  batch_size: int, prefetch: int) -> dict:
    """The HTTP translator under the CLR builder against a local keep-alive chat-completions server (threads in this
    process) that answers in ``fast_s`` seconds, or ``slow_s`` for a ``slow_fraction`` of the queries (spread
    evenly). ``old``: the builder and translator of ``CLR_OLD_REF`` (chunks of ``batch_size`` texts, each waiting for
    its slowest request; a new connection per request)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    counts = {"connections": 0, "requests": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            with lock:
                counts["connections"] += 1

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            query = body["messages"][-1]["content"].split("\n\n", 1)[1]
            with lock:
                counts["requests"] += 1
            time.sleep(slow_s if query.startswith("slow") else fast_s)
            data = json.dumps({"choices": [{"message": {"content": "Übersetzung: " + query}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    step = round(1 / slow_fraction)
    rows = [{"id": str(i), "query": f"{'slow' if i % step == step // 2 else 'fast'} query {i}", "positive": "p"}
            for i in range(requests)]
    num_slow = sum(row["query"].startswith("slow") for row in rows)
    out: dict = {"impl": impl, "requests": requests, "slow": num_slow, "workers": workers, "batch_size": batch_size,
                 "prefetch": prefetch}
    out["ideal_s"] = max(slow_s, (num_slow * slow_s + (requests - num_slow) * fast_s) / workers)
    import datasets  # noqa: F401  (imported by build_clr_dataset: out of the timing)

    if impl == "new":
        from conan_hf.data.clr import build_clr_dataset
        from conan_hf.data.translate import OpenAITranslator

        translator = OpenAITranslator(url, model="m", max_workers=workers, timeout=60, show_progress_bar=False)
        start = time.perf_counter()
        dataset, report = build_clr_dataset(rows, ["de"], translator, seed=0, batch_size=batch_size,
                                            prefetch_batches=prefetch, show_progress_bar=False)
        out["seconds"] = time.perf_counter() - start
        translator.close()
    else:
        old_translate = load_package_module_from_ref(CLR_OLD_REF, "conan_hf/data/translate.py", "translate_old")
        old = load_package_module_from_ref(CLR_OLD_REF, "conan_hf/data/clr.py", "clr_old")
        translator = old_translate.OpenAITranslator(url, model="m", max_workers=workers, timeout=60,
                                                    show_progress_bar=False)
        start = time.perf_counter()
        dataset, report = old.build_clr_dataset(rows, ["de"], translator, seed=0, batch_size=batch_size,
                                                show_progress_bar=False)
        out["seconds"] = time.perf_counter() - start
    server.shutdown()
    out["in_order"] = dataset["query"] == ["Übersetzung: " + row["query"] for row in rows]
    out["output_rows"] = report.num_output_rows
    out.update(counts)
def _tiny_model(dense_dim: int | None = None, max_seq_length: int = 16):
    """The tiny random Conan SentenceTransformer (optionally projected to ``dense_dim``) and its parameter count."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    from conan_hf import ConanConfig, build_sentence_transformer

    torch.manual_seed(0)
    base = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=max_seq_length)
    modules = [*base]
    if dense_dim:
        modules.append(Dense(in_features=base.get_embedding_dimension(), out_features=dense_dim, bias=False,
                             activation_function=torch.nn.Identity()))
    model = SentenceTransformer(modules=modules, device="cpu")
    return model, sum(p.numel() for p in model.parameters())


def mining_rows(queries: int, corpus: int) -> tuple[list[dict], list[str]]:
    """``queries`` (query, positive) rows whose positives are the first passages of a ``corpus``-passage corpus."""
    words = synthetic_words(5000, seed=7)
    rng = random.Random(8)
    passages = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(corpus)]
    rows = [{"query": " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))), "positive": passages[i]}
            for i in range(queries)]
    return rows, passages


def case_mine(queries: int, corpus: int, index: str) -> dict:
    import torch

    torch.set_num_threads(1)
    model, params = _tiny_model()
    rows, passages = mining_rows(queries, corpus)
    out: dict = {"queries": queries, "corpus": corpus, "index": index, "params": params,
                 "dim": model.get_embedding_dimension()}
    folder = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
    if index == "old":
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        model.encode(passages[:2048], batch_size=256)  # warm-up, as for the new implementation
        with Phase() as phase:
            mined = mine_hard_negatives(Dataset.from_list(rows), model, anchor_column_name="query",
                                        positive_column_name="positive", corpus=passages, relative_margin=0.05,
                                        num_negatives=30, sampling_strategy="top", output_format="labeled-list",
                                        output_scores=True, batch_size=256, verbose=False)
        out["mean_pool"] = sum(len(p) - 1 for p in mined["positive"]) / queries
    else:
        from conan_hf.data.teacher import mine_negative_ids
        from conan_hf.encode import FastEncoder

        encoder = FastEncoder(model, dtype="float32", max_batch_size=1024, truncation="ignore")
        encoder.encode(passages[:2048])  # warm-up: one-time allocations (kernels, tokenizer caches) out of the measure
        with Phase() as phase:
            pools, report = mine_negative_ids(rows, encoder, pool_size=30, corpus=passages, relative_margin=0.05,
                                              index=index, chunk_size=16384, work_dir=folder,
                                              show_progress_bar=False, verbose=False)
        out["mean_pool"] = report.mean_pool_size
        out["empty"] = report.empty
    out["seconds"], out["cpu_s"], out["peak_bytes"] = phase.seconds, phase.cpu_seconds, phase.peak_growth
    out["peak_rss"] = _status("VmHWM")
    shutil.rmtree(folder, ignore_errors=True)  # the embedding files (work_dir is the caller's to remove)
    return out


def teacher_pairs(count: int):
    words = synthetic_words(5000, seed=9)
    rng = random.Random(10)
    for _ in range(count):
        yield {"query": " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))),
               "positive": " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))}


def case_teacher(size: int, old_ref: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    model, params = _tiny_model(dense_dim=2048)
    out: dict = {"size": size, "params": params, "dim": 2048}
    model.encode([row["positive"] for row in teacher_pairs(2048)], batch_size=256)  # warm-up, out of the measure
    if old_ref:
        old = load_module_from_ref(old_ref, "conan_hf/data/teacher.py", "teacher_old")
        with Phase() as phase:
            kept, report = old.filter_by_teacher(teacher_pairs(size), model, threshold=0.4, batch_size=256,
                                                 show_progress_bar=False, verbose=False)
    else:
        from conan_hf.data.teacher import filter_by_teacher

        folder = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
        with Phase() as phase:
            kept, report = filter_by_teacher(teacher_pairs(size), model, threshold=0.4, batch_size=256,
                                             chunk_size=16384, output_dir=folder, show_progress_bar=False,
                                             verbose=False)
        del kept
        shutil.rmtree(folder, ignore_errors=True)
    out["seconds"], out["cpu_s"], out["peak_bytes"] = phase.seconds, phase.cpu_seconds, phase.peak_growth
    out["kept"], out["total"] = report.kept, report.total
    out["embeddings_bytes"] = size * 2 * 2048 * 4
    return out


WEAK_INSTRUCTIONS = (("Given a web search query, retrieve relevant passages.", 0.55),
                     ("Answer the question.", 0.25), ("回答问题。", 0.15), ("Find the duplicate question.", 0.05))


def write_weak_pairs(path: str, size: int) -> None:
    """``size`` JSONL stage-3 rows of ~650 bytes: an instruction (4, unevenly used), a 10-word input, a 70-word
    output."""
    words = synthetic_words(5000, seed=12)
    rng = random.Random(6)
    instructions = [i for i, _ in WEAK_INSTRUCTIONS]
    weights = [w for _, w in WEAK_INSTRUCTIONS]
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(size):
            row = {"instruction": rng.choices(instructions, weights)[0], "input": " ".join(rng.choices(words, k=10)),
                   "output": " ".join(rng.choices(words, k=70))}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_tiny_model(folder: str) -> dict:
    """The tiny random Conan SentenceTransformer (``ConanConfig.tiny()``) stage 3 trains in the ``weak`` case."""
    import torch

    from conan_hf import ConanConfig, build_sentence_transformer

    torch.manual_seed(0)
    model = build_sentence_transformer(ConanConfig.tiny(), max_seq_length=32)
    model.save(folder)
    return {"params": sum(p.numel() for p in model.parameters())}


def case_weak(path: str, model_dir: str, mode: str, old_ref: str | None = None) -> dict:
    import datasets  # noqa: F401 - imported before the measured phase
    import torch  # noqa: F401

    from conan_hf.training.config import config_from_dict

    if mode == "old":
        weak = load_module_from_ref(old_ref, "conan_hf/stages/weak.py", "weak_old")
    else:
        from conan_hf.stages import weak
    source = {"path": path, **({"streaming": True} if mode == "stream" else {})}
    config = config_from_dict(weak.WeakConfig, {
        "model": model_dir, "output_dir": tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP")), "data": [source],
        "max_steps": 2, "per_device_train_batch_size": 64, "max_seq_length": 32, "bf16": False, "num_threads": 1,
        "disable_tqdm": True, "logging_steps": 1, "save_steps": 1000})
    with Phase() as phase:
        summary = weak.run(config)
    return {"seconds": phase.seconds, "cpu_s": phase.cpu_seconds, "peak_bytes": phase.peak_growth,
            "anon_peak_bytes": phase.anon_peak_growth, "growth": phase.growth, "pairs": summary.get("num_pairs"),
            "steps": summary["global_step"], "file_bytes": os.path.getsize(path)}


# ---- driver ----------------------------------------------------------------------------------------------------------
def run_case(*args: str, timeout: int = 900, env: dict[str, str] | None = None) -> dict:
    """Run ``--case ...`` in a fresh interpreter; returns its JSON report (or the error)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["process_s"] = time.perf_counter() - start
    return report


def mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def growth_lines(reports: dict, case: str, sizes: list[int], modes: tuple[str, ...]) -> list[str]:
    """``growth A -> B`` lines of a case measured per (size, mode): peak RSS, anonymous peak and time ratios."""
    lines = []
    for a, b in zip(sizes, sizes[1:]):
        parts = []
        for mode in modes:
            ra, rb = reports[(case, a, mode)], reports[(case, b, mode)]
            if "error" not in ra and "error" not in rb:
                parts.append(f"{mode} peak {ratio(rb['peak_bytes'], ra['peak_bytes'])} (anon "
                             f"{ratio(rb['anon_peak_bytes'], ra['anon_peak_bytes'])}), "
                             f"time {ratio(rb['seconds'], ra['seconds'])}")
        lines.append(f"growth {a:,} -> {b:,} ({b / a:.0f}x rows): " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    cases = ["dhnm", "sft", "encode", "load", "clr", "clr_http", "mine", "teacher", "weak"]
    # lm (stages 0-2, about an hour on 2 busy cores) runs when asked for: --only lm
    parser.add_argument("--only", nargs="+", choices=[*cases, "lm"], default=cases)
    parser.add_argument("--lm-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--lm-stages", nargs="+", default=["pretrain", "sft", "tokenizer"])
    parser.add_argument("--lm-old-max", type=int, default=100_000, help="largest size the old stages run at")
    parser.add_argument("--dhnm-sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--dhnm-baseline-sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000],
                        help="sizes at which the baseline pool of Python strings is measured (~1.2 KB per example: "
                             "10M would need ~12 GB)")
    parser.add_argument("--dhnm-baseline-ref", default="a9bce54",
                        help="git revision whose NegativePool held the candidates as Python strings")
    parser.add_argument("--sft-sizes", type=int, nargs="+", default=[2_000, 10_000, 40_000])
    parser.add_argument("--sft-old-rows", type=int, default=5)
    parser.add_argument("--encode-sizes", type=int, nargs="+", default=[10_000, 30_000, 90_000])
    parser.add_argument("--load-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--clr-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--clr-old-sizes", type=int, nargs="+", default=[10_000, 100_000],
                        help="sizes at which the in-memory CLR builder is measured (1M rows needs ~9 GB)")
    parser.add_argument("--clr-batch-size", type=int, default=1024)
    parser.add_argument("--http-requests", type=int, default=2000)
    parser.add_argument("--http-workers", type=int, default=16)
    parser.add_argument("--mine-sizes", nargs="+", default=["1000x10000", "10000x100000", "100000x1000000"],
                        help="QUERIESxCORPUS sizes for the mining case")
    parser.add_argument("--mine-indexes", nargs="+", default=["flat"])
    parser.add_argument("--mine-old-sizes", nargs="+", default=["1000x10000"],
                        help="sizes at which the old brute-force mining runs (10000x100000 needs ~4 GB of scores)")
    parser.add_argument("--teacher-sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--teacher-old-ref", default="a9bce54", help="git revision of the teacher filter before")
    parser.add_argument("--weak-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--weak-old-ref", default="1d5fb26", help="git revision of the list-based stage 3")
    parser.add_argument("--old-ref", default="35740d4", help="git revision of the implementation before issue 11")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "scale_cpu.txt"))
    args = parser.parse_args(argv)

    if args.case:
        name, rest = args.case[0], args.case[1:]
        if name == "dhnm":
            report = case_dhnm(int(rest[0]), rest[1], rest[2], rest[3])
        elif name == "dhnm_data":
            report = case_dhnm_data(int(rest[0]), rest[1])
        elif name == "sft":
            report = case_sft(int(rest[0]), rest[1], rest[2] if len(rest) > 2 else None)
        elif name == "load":
            report = case_load(rest[0], rest[1])
        elif name == "tokenizer":
            report = build_150k_tokenizer(rest[0])
        elif name == "lm_data":
            report = case_lm_data(int(rest[0]), rest[1])
        elif name == "lm":
            report = case_lm(rest[0], rest[1], int(rest[2]), rest[3], rest[4])
        elif name == "clr":
            report = case_clr(int(rest[0]), rest[1], int(rest[2]))
        elif name == "clr_http":
            report = case_clr_http(rest[0], int(rest[1]), float(rest[2]), float(rest[3]), float(rest[4]),
                                   int(rest[5]), int(rest[6]), int(rest[7]))
        elif name == "mine":
            report = case_mine(int(rest[0]), int(rest[1]), rest[2])
        elif name == "teacher":
            report = case_teacher(int(rest[0]), rest[1] if len(rest) > 1 else None)
        elif name == "weak":
            report = case_weak(rest[0], rest[1], rest[2], rest[3] if len(rest) > 3 else None)
        elif name == "tinymodel":
            report = build_tiny_model(rest[0])
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
        emit(f"## (a) DHNM pools, k={K}, {POOL_SIZE} candidates per example (random rows of a corpus of as many "
             f"~65-character passages), step = {STEP_EXAMPLES} examples x {K} scores")
        emit(f"machine: {describe_device('cpu')}; measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"load average at start {os.getloadavg()[0]:.1f} (other jobs share the machine: times are upper bounds)")
        emit("pools: ids = NegativePool.from_ids(None, candidate_ids.npy memory-mapped, corpus Arrow file "
             "memory-mapped); ids-ram = the same with candidate_ids read into RAM; texts = baseline, "
             f"git {args.dhnm_baseline_ref}'s pool over per-example lists of Python strings (the lists included)")
        emit("RAM B/ex: anonymous RSS growth while building the pool (RssAnon; the memory-mapped files' pages are "
             "page cache, shown as file MB); update: apply_scores; lookup: texts of the step's 64 x 7 negatives")
        emit("pools    examples  RAM B/ex  state B/ex  file MB  build s  fingerpr s  save+load s  update ms (p90)"
             "  lookup ms   peak RSS  roundtrip")
        plan = [(size, mode) for mode in ("ids", "ids-ram") for size in args.dhnm_sizes]
        plan += [(size, "texts") for size in args.dhnm_baseline_sizes]
        for size in sorted({size for size, _ in plan}):
            data_dir = tempfile.mkdtemp(dir=os.environ.get("SCALE_TMP"))
            made = run_case("dhnm_data", str(size), data_dir, timeout=3600)
            for mode in [m for s, m in plan if s == size]:
                r = run_case("dhnm", str(size), mode, data_dir, args.dhnm_baseline_ref, timeout=3600)
                reports[("dhnm", size, mode)] = r
                if "error" in r or "error" in made:
                    emit(f"{mode:<7} {size:>9,}  ERROR {r.get('error') or made.get('error')}")
                    continue
                file_mb = (r["pool_bytes"] - r["pool_anon_bytes"]) / 1e6
                emit(f"{mode:<7} {size:>9,}  {r['pool_anon_bytes'] / size:>8.1f}  {r['state_bytes'] / size:>10.1f}  "
                     f"{file_mb:>7.0f}  {r['build_s']:>7.1f}  {r['fingerprint_s']:>10.2f}  "
                     f"{r['save_s'] + r['load_s']:>11.2f}  {r['step_ms_median']:>7.3f} ({r['step_ms_p90']:.3f})  "
                     f"{r['lookup_ms_median']:>9.3f}  {mb(r['peak_rss']):>10}  {r['roundtrip_equal']}")
            shutil.rmtree(data_dir, ignore_errors=True)
        emit(f"load average at end {os.getloadavg()[0]:.1f}")
        for mode in ("ids", "ids-ram", "texts"):
            sizes = [s for s, m in plan if m == mode and "error" not in reports[("dhnm", s, m)]]
            for a, b in zip(sizes, sizes[1:]):
                ra, rb = reports[("dhnm", a, mode)], reports[("dhnm", b, mode)]
                emit(f"growth {mode} {a:,} -> {b:,} ({b / a:.0f}x examples): RAM "
                     f"{ratio(rb['pool_anon_bytes'], ra['pool_anon_bytes'])}, update "
                     f"{ratio(rb['step_ms_median'], ra['step_ms_median'])}, lookup "
                     f"{ratio(rb['lookup_ms_median'], ra['lookup_ms_median'])}, save+load "
                     f"{ratio(rb['save_s'] + rb['load_s'], ra['save_s'] + ra['load_s'])}")
        for size in args.dhnm_baseline_sizes:
            ids, texts = reports.get(("dhnm", size, "ids")), reports.get(("dhnm", size, "texts"))
            if ids and texts and "error" not in ids and "error" not in texts:
                emit(f"texts / ids at {size:,}: RAM {ratio(texts['pool_anon_bytes'], ids['pool_anon_bytes'])}, "
                     f"update {ratio(texts['step_ms_median'], ids['step_ms_median'])}, lookup "
                     f"{ratio(texts['lookup_ms_median'], ids['lookup_ms_median'])}")
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
    if "load" in args.only:
        emit("## (d) data layer: JSONL pairs with a column mapping and row checks, every row consumed in batches of "
             "1,000; peak RSS growth during the phase")
        emit("(peak RSS counts the pages of memory-mapped files, which the kernel can drop; anon: the peak growth of "
             "anonymous memory, what the process holds)")
        emit("rows       file MB  mode      rows read  wall s  CPU s  peak RSS growth  anon peak growth  shards read")
        folder = tempfile.mkdtemp(prefix="conan-load-")
        modes = ("list", "mmap", "stream", "rank0/2")
        for size in args.load_sizes:
            path = os.path.join(folder, f"pairs-{size}.jsonl")
            write_pairs(path, size)
            for mode in modes:
                r = run_case("load", path, mode, timeout=3600)
                reports[("load", size, mode)] = r
                if "error" in r:
                    emit(f"{size:>9,}  {'':>7}  {mode:<8}  ERROR {r['error']}")
                    continue
                emit(f"{size:>9,}  {r['file_bytes'] / 1e6:>7.1f}  {mode:<8}  {r['rows']:>9,}  {r['seconds']:>6.1f}  "
                     f"{r['cpu_s']:>5.1f}  {mb(r['peak_bytes']):>15}  {mb(r['anon_peak_bytes']):>16}  "
                     f"{r['shards'] or ''}")
            os.remove(path)
        for line in growth_lines(reports, "load", args.load_sizes, modes):
            emit(line)
        emit("")

    stamp = f"(measured {lines[1].replace('date: ', '')}; {lines[0]})"  # sections of other runs keep their own
    if "clr" in args.only:
        emit(f"## (e) CLR builder, Table 7 mix, synthetic triplets (~780 B/row JSONL), offline prefix translator "
             f"(cacheable: the run memo is used), batch {args.clr_batch_size} rows; old = git {CLR_OLD_REF} "
             "(reads all rows, builds in memory, writes at the end)")
        emit(stamp)
        emit("impl     rows   source MB   wall s   rows/s   peak RSS growth   peak RSS   output rows  rejected")
        rows_ = [(size, "new") for size in args.clr_sizes] + [(size, "old") for size in args.clr_old_sizes]
        for size, impl in rows_:
            r = run_case("clr", str(size), impl, str(args.clr_batch_size), timeout=3600)
            reports[("clr", size, impl)] = r
            if "error" in r:
                emit(f"{impl:<4} {size:>9,}  ERROR {r['error']}")
                continue
            emit(f"{impl:<4} {size:>9,}  {r['source_bytes'] / 1e6:>9.0f}  {r['seconds']:>7.1f}  "
                 f"{size / r['seconds']:>7,.0f}  {mb(r['peak_growth']):>16}  {mb(r['peak_rss']):>9}  "
                 f"{r['output_rows']:>11,}  {r['rejected']:>8,}")
        for impl, sizes in (("new", args.clr_sizes), ("old", args.clr_old_sizes)):
            sizes = [size for size in sizes if "error" not in reports[("clr", size, impl)]]
            for a, b in zip(sizes, sizes[1:]):
                ra, rb = reports[("clr", a, impl)], reports[("clr", b, impl)]
                emit(f"growth {impl} {a:,} -> {b:,} ({b / a:.0f}x rows): peak RSS "
                     f"{ratio(rb['peak_rss'], ra['peak_rss'])}, peak RSS growth "
                     f"{ratio(rb['peak_growth'], ra['peak_growth'])}, time {ratio(rb['seconds'], ra['seconds'])}")
        small, large = reports.get(("clr", 100_000, "new")), reports.get(("clr", 1_000_000, "new"))
        if small and large and "error" not in small and "error" not in large:
            growth = large["peak_rss"] / small["peak_rss"]
            emit(f"target: peak RSS of the CLR builder grows <= 1.2x from 100k to 1M rows: {growth:.2f}x, "
                 f"{'met' if growth <= 1.2 else 'MISSED'}")
        emit("")

    if "clr_http" in args.only:
        fast_s, slow_s, slow_fraction, batch = 0.02, 1.0, 0.02, 256
        emit(f"## (f) HTTP translator under the CLR builder (old = git {CLR_OLD_REF}): local keep-alive server, "
             f"{args.http_requests} queries, {slow_fraction:.0%} slow ({slow_s} s, others {fast_s} s), "
             f"{args.http_workers} requests in flight, batches of {batch}")
        emit(stamp)
        emit("impl                 wall s   ideal s   wall/ideal   connections   requests   order kept")
        for impl, prefetch in (("old", 0), ("new", 0), ("new", 4)):
            r = run_case("clr_http", impl, str(args.http_requests), str(slow_fraction), str(fast_s), str(slow_s),
                         str(args.http_workers), str(batch), str(prefetch), timeout=1800)
            label = "old" if impl == "old" else f"new, prefetch {prefetch}"
            if "error" in r:
                emit(f"{label:<18}  ERROR {r['error']}")
                continue
            emit(f"{label:<18}  {r['seconds']:>8.2f}  {r['ideal_s']:>8.2f}  {r['seconds'] / r['ideal_s']:>10.2f}x"
                 f"  {r['connections']:>12,}  {r['requests']:>9,}   {r['in_order']}")
        emit("(ideal: the server's total answer time over the workers; old: each batch of 256 waits for its slowest "
             "request, one connection per request; prefetch 0: the window drains at each batch end)")
    if "mine" in args.only:
        emit("## (g) hard-negative mining, pool 30, relative margin 0.05, tiny random Conan model, 1 encoding thread")
        emit("index   queries     corpus   wall s   CPU s   peak RSS growth   mean pool  (model)")
        runs = [(size, index) for size in args.mine_sizes for index in args.mine_indexes]
        runs += [(size, "old") for size in args.mine_old_sizes]
        for size, index in runs:
            q, n = (int(x) for x in size.split("x"))
            r = run_case("mine", str(q), str(n), index, timeout=3600)
            reports[("mine", size, index)] = r
            if "error" in r:
                emit(f"{index:<6} {q:>8,} {n:>10,}  ERROR {r['error']}")
                continue
            emit(f"{index:<6} {q:>8,} {n:>10,}  {r['seconds']:>7.1f}  {r['cpu_s']:>6.1f}  {mb(r['peak_bytes']):>16}"
                 f"  {r['mean_pool']:>10.2f}  ({r['params'] / 1e6:.2f}M params, dim {r['dim']})")
        for index in args.mine_indexes:
            done = [s for s in args.mine_sizes if "error" not in reports[("mine", s, index)]]
            for a, b in zip(done, done[1:]):
                ra, rb = reports[("mine", a, index)], reports[("mine", b, index)]
                emit(f"growth {index} {a} -> {b}: time {ratio(rb['seconds'], ra['seconds'])}, peak RSS growth "
                     f"{ratio(rb['peak_bytes'], ra['peak_bytes'])}")
        emit("")

    if "teacher" in args.only:
        emit("## (h) teacher filter over a generator of pairs, tiny random Conan model + Dense to 2048 dims, "
             "chunk 16384, 1 thread")
        emit("impl  pairs     wall s   CPU s   peak RSS growth   (all embeddings would be)   kept")
        for size in args.teacher_sizes:
            for ref in (None, args.teacher_old_ref):
                r = run_case("teacher", str(size), *([ref] if ref else []), timeout=3600)
                reports[("teacher", size, bool(ref))] = r
                label = "old " if ref else "new "
                if "error" in r:
                    emit(f"{label}  {size:>7,}  ERROR {r['error']}")
                    continue
                emit(f"{label}  {size:>7,}  {r['seconds']:>6.1f}  {r['cpu_s']:>6.1f}  {mb(r['peak_bytes']):>16}  "
                     f"{mb(r['embeddings_bytes']):>26}  {r['kept']:,}/{r['total']:,}")
        for label, flag in (("new", False), ("old", True)):
            done = [s for s in args.teacher_sizes if "error" not in reports[("teacher", s, flag)]]
            for a, b in zip(done, done[1:]):
                ra, rb = reports[("teacher", a, flag)], reports[("teacher", b, flag)]
                emit(f"growth {label} {a:,} -> {b:,} ({b / a:.1f}x pairs): time {ratio(rb['seconds'], ra['seconds'])}"
                     f", peak RSS growth {ratio(rb['peak_bytes'], ra['peak_bytes'])}")
        emit("")

    if "weak" in args.only:
        folder = tempfile.mkdtemp(prefix="conan-weak-", dir=os.environ.get("SCALE_TMP"))
        model_dir = os.path.join(folder, "tiny-model")
        tiny = run_case("tinymodel", model_dir)
        emit(f"## (weak) stage 3 data path: conan_hf.stages.weak.run --max_steps 2 (batch 64, "
             f"max_seq_length 32, tiny random Conan model, {tiny.get('params', 0):,} parameters), "
             "JSONL instruction/input/output rows, 4 instructions; fresh process and empty datasets cache per run; "
             "peak RSS growth over the run")
        emit(f"{stamp}; old: git {args.weak_old_ref}")
        emit("rows       file MB  mode    pairs trained on  wall s  CPU s  peak RSS growth  peak B/row  "
             "peak anon growth")
        emit("(peak RSS: VmHWM, includes the pages of memory-mapped files that were read; anon: RssAnon sampled "
             "every 10 ms, the process's own memory)")
        modes = ("old", "mmap", "stream")
        for size in args.weak_sizes:
            path = os.path.join(folder, f"weak-{size}.jsonl")
            write_weak_pairs(path, size)
            for mode in modes:
                cache = tempfile.mkdtemp(prefix="hf-datasets-", dir=os.environ.get("SCALE_TMP"))
                r = run_case("weak", path, model_dir, mode, *([args.weak_old_ref] if mode == "old" else []),
                             timeout=3600, env={"HF_DATASETS_CACHE": cache})
                subprocess.run(["rm", "-rf", cache], check=False)
                reports[("weak", size, mode)] = r
                if "error" in r:
                    emit(f"{size:>9,}  {'':>7}  {mode:<6}  ERROR {r['error']}")
                    continue
                pairs = f"{r['pairs']:,}" if r["pairs"] is not None else "(a stream)"
                emit(f"{size:>9,}  {r['file_bytes'] / 1e6:>7.1f}  {mode:<6}  {pairs:>16}  {r['seconds']:>6.1f}  "
                     f"{r['cpu_s']:>5.1f}  {mb(r['peak_bytes']):>15}  {r['peak_bytes'] / size:>10,.0f}  "
                     f"{mb(r['anon_peak_bytes']):>16}")
            os.remove(path)
        for line in growth_lines(reports, "weak", args.weak_sizes, modes):
            emit(line)
        emit("")

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_sections(Path(args.output), lines)
    print(f"wrote {args.output}")


def write_sections(path: Path, lines: list[str]) -> None:
    """Write the sections measured now into ``path``, keeping the other sections of an earlier run (each section
    starts with a ``## (x)`` line and is replaced by the section with the same ``(x)``)."""

    def split(text_lines: list[str]) -> tuple[list[str], dict[str, list[str]]]:
        head, sections, key = [], {}, None
        for line in text_lines:
            if line.startswith("## ("):
                key = line.split(")", 1)[0] + ")"
                sections[key] = []
            (sections[key] if key else head).append(line)
        return head, sections

    head, new = split(lines)
    old: dict[str, list[str]] = {}
    if path.exists():
        _, old = split(path.read_text().splitlines())
    merged = {**old, **new}
    text = head + [line for key in sorted(merged) for line in merged[key]]
    path.write_text("\n".join(text).rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
