"""mteb tasks built from local files, so every evaluation of the paper (§4) runs without the Hugging Face Hub.

Each builder reads its data through :mod:`conan_hf.data.readers`, the readers the training stages use (so evaluation
accepts the same files, JSONL/CSV/TSV with a column mapping included, and a malformed row raises the same error
naming the file and line), and returns an *instance* of a real mteb task class (`AbsTaskSTS`, `AbsTaskRetrieval`,
`AbsTaskBitextMining`, ...) whose `load_data` serves the rows already read. mteb then does everything else: encoding
through the model's `encode_query` / `encode_document` / `encode` with the right prompts, the similarity computations
and the metrics (Spearman of cosine, nDCG@k / Recall@k via pytrec_eval, F1 of bitext mining, V-measure, ...). Nothing
here computes a metric.

Supported inputs

==========================  ==============================================================  ====================
builder                     format                                                          ``fmt`` name
==========================  ==============================================================  ====================
:func:`sts_task`            STS-B CSV without header ``s1,s2,score``                        ``"stsb"``
                            SICK TSV with header (``sentence_A``, ``sentence_B``,           ``"sick"``
                            ``relatedness_score``)
                            Chinese STS TSV ``s1\\ts2\\tscore``                             ``"tsv"``
                            JSONL rows ``sentence1``, ``sentence2``, ``score`` (the files   ``"jsonl"``
                            stage 4 trains on), or any table with ``columns=``
:func:`pair_task`           ``s1\\ts2\\tlabel`` (AFQMC, LCQMC, ...), or a header TSV with     ``"pair"``
                            ``sentence1``, ``sentence2``, ``label`` (PAWS-X), or ``columns=``
:func:`retrieval_task`      BEIR folder (``corpus.jsonl``, ``queries.jsonl``,               ``"beir"``
                            ``qrels/<split>.tsv``, header line optional)
:func:`squad_retrieval_task` SQuAD-format JSON: questions retrieve their paragraph           ``"squad"``
:func:`bitext_task`         two line-aligned text files (Tatoeba)                           ``"tatoeba"``
:func:`classification_task` labelled CSV (header with a text and a label column) or TSV     ``"labelled"``
:func:`clustering_task`     without header (``...\\ttext\\tlabel``: last column is the label)
==========================  ==============================================================  ====================

Cross-lingual XQuAD / MKQA retrieval lives in :mod:`conan_hf.eval.xling`, built on :func:`make_retrieval_task`.

Example::

    >>> import mteb
    >>> from sentence_transformers import SentenceTransformer
    >>> from conan_hf.eval.tasks import sts_task, retrieval_task
    >>> tasks = [sts_task("data/sts/stsb-multi-mt/stsb-en-dev.csv", limit=200),
    ...          retrieval_task("data/retrieval/scifact", limit_queries=50)]
    >>> results = mteb.evaluate(SentenceTransformer("my-model"), tasks, cache=None)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mteb import AbsTask

from conan_hf.data.readers import DataFormatError, OnError
from conan_hf.errors import DEFAULT_SCORE_RANGE, DataError, score_range_of

from .local_data import (  # noqa: F401 (PAIR_COLUMNS, TEXT_COLUMNS, LABEL_COLUMNS, _fail, _row_error: re-exported)
    LABEL_COLUMNS,
    PAIR_COLUMNS,
    STS_COLUMNS,
    STS_FORMATS,
    TEXT_COLUMNS,
    PairData,
    RetrievalData,
    _fail,
    _row_error,
    beir_retrieval_data,
    bitext_sentences,
    choose_beir_split,
    infer_sts_format,
    read_labelled,
    read_pairs,
    read_sts,
    squad_retrieval_data,
    tatoeba_files,
)
from .naming import (
    LANGUAGE_CODES,
    SPLIT_NAMES,  # noqa: F401 (re-exported)
    guess_language,
    split_from_name,
    task_name_from_path,
    to_langscript,
)

# Default instructions (the `prompt` of the task metadata) for instruction-following models; `run.evaluate` formats
# them with the model's instruction template. Retrieval instructions apply to queries only.
DEFAULT_INSTRUCTIONS: dict[str, str | dict[str, str]] = {
    "STS": "Retrieve semantically similar text.",
    "PairClassification": "Retrieve text that is semantically similar to the given text.",
    "Retrieval": {"query": "Given a question, retrieve passages that answer the question."},
    "BitextMining": "Retrieve parallel sentences.",
    "Classification": "Classify the given text into its category.",
    "Clustering": "Identify the topic or category of the given text.",
}




# ----------------------------------------------------------------------------------------------------------------
# mteb task construction
# ----------------------------------------------------------------------------------------------------------------


def _metadata(
    name: str,
    task_type: str,
    main_score: str,
    eval_langs: list[str] | dict[str, list[str]],
    split: str,
    source: str,
    description: str,
    prompt: str | dict[str, str] | None,
):
    from mteb import TaskMetadata

    return TaskMetadata(
        name=name,
        description=description,
        reference=None,
        dataset={"path": f"local:{source}", "revision": "local"},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=eval_langs,
        main_score=main_score,
        prompt=prompt if prompt is not None else DEFAULT_INSTRUCTIONS.get(task_type),
        sample_creation="found",
        bibtex_citation="",
    )


def _instantiate(base: type, metadata, build: Callable[[], Any], **class_attributes: Any) -> AbsTask:
    """A task instance of a fresh subclass of `base` whose class-level `metadata` is this task's.

    mteb reads `metadata` from the class (and drops instance-level metadata when it unloads data), so each local
    task gets its own small subclass; `build` turns the already-validated rows into the mteb dataset layout.
    """

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = build()
        self.data_loaded = True

    attributes = {"metadata": metadata, "load_data": load_data, "__module__": __name__, **class_attributes}
    cls = type(re.sub(r"\W", "_", metadata.name), (base,), attributes)
    return cls()


def _datasets(split: str, columns: dict[str, list]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({split: Dataset.from_dict(columns)})


def sts_task(
    path: str | Path,
    *,
    fmt: str | None = None,
    name: str | None = None,
    language: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    prompt: str | None = None,
    columns: dict[str, str | int] | None = None,
    on_error: OnError = "raise",
    score_range: Sequence[float] | None = None,
) -> AbsTask:
    """An mteb STS task (main score: Spearman of cosine similarity) from an STS-B CSV, SICK TSV, ``s1\\ts2\\tscore``
    file, or a JSONL / table file with ``sentence1``, ``sentence2``, ``score`` columns (or a ``columns`` mapping, as
    training takes it). See :func:`read_sts`. ``split`` labels the results (default: from the file name, see
    :func:`split_from_name`). ``score_range`` is the scale of the gold scores (default ``[0, 5]``, which holds STS-B's
    0-5 and SICK's 1-5): a score outside it is an error naming its file:line."""
    from mteb.abstasks.sts import AbsTaskSTS

    fmt = fmt or infer_sts_format(path)
    low, high = score_range_of(DEFAULT_SCORE_RANGE if score_range is None else score_range, "--score-range")
    data = read_sts(path, fmt=fmt, limit=limit, columns=columns, on_error=on_error, score_range=(low, high))
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, data.sentence1)
    metadata = _metadata(name or task_name_from_path("LocalSTS", path), "STS", "cosine_spearman", [lang], split,
                         str(path), f"STS pairs from {Path(path).name} ({fmt} format).", prompt)
    return _instantiate(
        AbsTaskSTS, metadata,
        lambda: _datasets(split, {"sentence1": data.sentence1, "sentence2": data.sentence2, "score": data.score}),
        min_score=low, max_score=high,
    )


def pair_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    prompt: str | None = None,
    columns: dict[str, str | int] | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb pair-classification task (main score: max average precision over similarity functions) from a
    ``s1\\ts2\\tlabel`` file, or any table with ``sentence1``/``sentence2``/``label`` columns (or a ``columns``
    mapping). See :func:`read_pairs`."""
    from mteb.abstasks.pair_classification import AbsTaskPairClassification

    data = read_pairs(path, limit=limit, columns=columns, on_error=on_error)
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, data.sentence1)
    metadata = _metadata(name or task_name_from_path("LocalPairs", path), "PairClassification", "max_ap", [lang],
                         split, str(path), f"Sentence-pair classification from {Path(path).name}.", prompt)
    labels = [int(x) for x in data.score]
    return _instantiate(
        AbsTaskPairClassification, metadata,
        lambda: _datasets(split, {"sentence1": data.sentence1, "sentence2": data.sentence2, "labels": labels}),
    )


def make_retrieval_task(
    name: str,
    subsets: dict[str, RetrievalData],
    languages: dict[str, list[str]] | list[str],
    *,
    split: str = "test",
    source: str = "",
    description: str = "",
    prompt: str | dict[str, str] | None = None,
    main_score: str = "ndcg_at_10",
    k_values: Sequence[int] = (1, 3, 5, 10, 20, 100, 1000),
) -> AbsTask:
    """An mteb retrieval task from in-memory collections, one per subset (``"default"`` for a monolingual task,
    ``"de-en"`` style names for cross-lingual subsets with ``languages`` mapping each subset to its languages)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    metadata = _metadata(name, "Retrieval", main_score, languages, split, source, description or name, prompt)

    def build() -> dict[str, dict[str, RetrievalSplitData]]:
        dataset = {}
        for subset, data in subsets.items():
            corpus = Dataset.from_dict({
                "id": list(data.corpus),
                "title": [doc.get("title", "") for doc in data.corpus.values()],
                "text": [doc["text"] for doc in data.corpus.values()],
            })
            queries = Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())})
            dataset[subset] = {split: RetrievalSplitData(
                corpus=corpus, queries=queries, relevant_docs=data.qrels, top_ranked=None)}
        return dataset

    return _instantiate(AbsTaskRetrieval, metadata, build, k_values=tuple(k_values))


def retrieval_task(
    folder: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    split: str | None = None,
    limit_queries: int | None = None,
    limit_corpus: int | None = None,
    prompt: str | dict[str, str] | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb retrieval task (main score nDCG@10; Recall@k, MAP, MRR also reported) from a BEIR folder.
    See :func:`beir_retrieval_data` for the split and the limits."""
    data, qrels_split = beir_retrieval_data(folder, split=split, limit_queries=limit_queries,
                                            limit_corpus=limit_corpus, on_error=on_error)
    lang = to_langscript(language) if language else guess_language(folder, list(data.queries.values()))
    return make_retrieval_task(
        name or task_name_from_path("LocalRetrieval", folder), {"default": data}, [lang], split=qrels_split,
        source=str(folder), description=f"BEIR retrieval from {Path(folder).name} ({qrels_split} qrels).",
        prompt=prompt,
    )


def squad_retrieval_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    limit_queries: int | None = None,
    split: str | None = None,
    prompt: str | dict[str, str] | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """Monolingual retrieval from a SQuAD-format file (e.g. CMRC2018): each question retrieves its paragraph.
    See :func:`squad_retrieval_data`; ``on_error="skip"`` leaves out (and logs) questions without text."""
    data = squad_retrieval_data(path, limit_queries=limit_queries, on_error=on_error)
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, list(data.queries.values()))
    return make_retrieval_task(
        name or task_name_from_path("LocalSQuADRetrieval", path), {"default": data}, [lang], split=split,
        source=str(path), description=f"Question-to-paragraph retrieval from {Path(path).name}.", prompt=prompt,
    )


def bitext_task(
    path1: str | Path,
    path2: str | Path | None = None,
    *,
    name: str | None = None,
    languages: tuple[str, str] | None = None,
    limit: int | None = None,
    split: str = "test",
    prompt: str | None = None,
) -> AbsTask:
    """An mteb bitext-mining task (main score F1) from two line-aligned files, or a Tatoeba prefix/file alone
    (``tatoeba.deu-eng`` finds ``tatoeba.deu-eng.deu`` and ``tatoeba.deu-eng.eng``)."""
    from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

    if path2 is None:
        path1, path2, lang1, lang2 = tatoeba_files(path1)
        languages = languages or (lang1, lang2)
        stem = Path(path1).stem
    else:
        stem = Path(path1).stem
    s1, s2 = bitext_sentences(path1, path2, limit=limit)
    langs = [to_langscript(x) for x in languages] if languages else [guess_language(path1, s1),
                                                                       guess_language(path2, s2)]
    metadata = _metadata(name or f"LocalBitext-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}", "BitextMining", "f1",
                         {"default": langs}, split, f"{path1}|{path2}",
                         f"Bitext mining between {Path(path1).name} and {Path(path2).name}.", prompt)
    return _instantiate(AbsTaskBitextMining, metadata,
                        lambda: {"default": _datasets(split, {"sentence1": s1, "sentence2": s2})})


def _train_test(texts: list[str], labels: list[str], test_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    stratify = labels if min(counts.values()) >= 2 else None
    return train_test_split(texts, labels, test_size=test_size, random_state=seed, stratify=stratify)


def classification_task(
    path: str | Path,
    *,
    test_path: str | Path | None = None,
    name: str | None = None,
    language: str | None = None,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    limit: int | None = None,
    test_size: float = 0.5,
    n_experiments: int = 10,
    samples_per_label: int = 8,
    seed: int = 42,
    prompt: str | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb classification task (logistic regression on embeddings; main score accuracy).

    With ``test_path`` the first file trains and the second tests; with one file, a stratified ``test_size`` share
    (fixed seed) becomes the test split. ``n_experiments`` / ``samples_per_label`` are mteb's undersampling knobs.
    """
    from mteb.abstasks.classification import AbsTaskClassification

    texts, labels = read_labelled(path, text_column, label_column, limit, on_error=on_error)
    if test_path is not None:
        test_texts, test_labels = read_labelled(test_path, text_column, label_column, limit, on_error=on_error)
        train_texts, train_labels = texts, labels
    else:
        train_texts, test_texts, train_labels, test_labels = _train_test(texts, labels, test_size, seed)
    names = sorted(set(labels) | set(test_labels))
    index = {label: i for i, label in enumerate(names)}
    lang = to_langscript(language) if language else guess_language(path, texts)
    metadata = _metadata(name or task_name_from_path("LocalClassification", path), "Classification", "accuracy",
                         [lang], "test", str(path), f"Classification of {Path(path).name} ({len(names)} labels).",
                         prompt)

    def build():
        from datasets import Dataset, DatasetDict

        return DatasetDict({
            "train": Dataset.from_dict({"text": train_texts, "label": [index[x] for x in train_labels]}),
            "test": Dataset.from_dict({"text": test_texts, "label": [index[x] for x in test_labels]}),
        })

    return _instantiate(AbsTaskClassification, metadata, build, n_experiments=n_experiments,
                        samples_per_label=samples_per_label)


def clustering_task(
    path: str | Path,
    *,
    name: str | None = None,
    language: str | None = None,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    limit: int | None = None,
    n_clusters: int = 10,
    max_documents_per_cluster: int | None = None,
    split: str | None = None,
    prompt: str | None = None,
    on_error: OnError = "raise",
) -> AbsTask:
    """An mteb clustering task (k-means on embeddings; main score V-measure averaged over ``n_clusters``
    bootstrap samples of ``max_documents_per_cluster`` documents, all documents by default)."""
    from mteb.abstasks.clustering import AbsTaskClustering

    texts, labels = read_labelled(path, text_column, label_column, limit, on_error=on_error)
    split = split or split_from_name(path)
    lang = to_langscript(language) if language else guess_language(path, texts)
    metadata = _metadata(name or task_name_from_path("LocalClustering", path), "Clustering", "v_measure", [lang],
                         split, str(path), f"Clustering of {Path(path).name} by its labels.", prompt)
    return _instantiate(
        AbsTaskClustering, metadata, lambda: _datasets(split, {"sentences": texts, "labels": labels}),
        n_clusters=n_clusters, max_fraction_of_documents_to_embed=None,
        max_documents_per_cluster=max_documents_per_cluster or len(texts),
    )


TASK_KINDS = ("sts", "pairs", "retrieval", "squad", "xling", "bitext", "classification", "clustering")


def infer_task_kind(path: str | Path) -> str:
    """Guess the kind of evaluation a path holds (used by the command line when ``--task`` is omitted)."""
    path = Path(path)
    if path.is_dir():
        if (path / "corpus.jsonl").exists():
            return "retrieval"
        if list(path.glob("xquad.*.json")):
            return "xling"
        raise DataError("a folder must be BEIR (corpus.jsonl) or XQuAD (xquad.<lang>.json)", where=str(path),
                        hint="point --data at such a folder or at a data file")
    if path.suffix == ".json":
        return "squad"
    if path.suffix in (".jsonl", ".ndjson"):
        return "sts" if _first_record_has(path, STS_COLUMNS[:2]) else "xling"  # STS pairs or MKQA
    if re.search(r"[a-z]{3}-[a-z]{3}(\.[a-z]{3})?$", path.name):
        return "bitext"
    return "sts"


def _first_record_has(path: Path, keys: Sequence[str]) -> bool:
    """Whether the first JSON line of ``path`` is an object with all ``keys``."""
    with path.open(encoding="utf-8") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and all(k in record for k in keys)
    return False


def task_from_path(kind: str, paths: Sequence[str | Path], **options: Any) -> AbsTask:
    """Build a local task of ``kind`` (one of :data:`TASK_KINDS` except ``xling``) from ``paths``.

    ``options`` are passed to the builder (``limit``, ``name``, ``language``, ``fmt``, ``split``, ...); options a
    builder does not take are ignored, so the command line can pass its flags uniformly.
    """
    import inspect

    builders: dict[str, Callable[..., AbsTask]] = {
        "sts": sts_task, "pairs": pair_task, "retrieval": retrieval_task, "squad": squad_retrieval_task,
        "bitext": bitext_task, "classification": classification_task, "clustering": clustering_task,
    }
    if kind not in builders:
        raise ValueError(f"Unknown task kind {kind!r}; expected one of {sorted(builders)}")
    builder = builders[kind]
    accepted = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in options.items() if v is not None and k in accepted}
    if kind == "bitext":
        return builder(*paths[:2], **kwargs)
    if kind == "classification" and len(paths) > 1:
        kwargs["test_path"] = paths[1]
    if len(paths) > 1 and kind != "classification":
        raise DataError(f"task kind {kind!r} takes one data path, got {len(paths)}", hint="give one --data path")
    return builder(paths[0], **kwargs)


__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "LANGUAGE_CODES",
    "TASK_KINDS",
    "DataFormatError",
    "PairData",
    "RetrievalData",
    "STS_COLUMNS",
    "STS_FORMATS",
    "beir_retrieval_data",
    "bitext_sentences",
    "bitext_task",
    "choose_beir_split",
    "classification_task",
    "clustering_task",
    "guess_language",
    "infer_sts_format",
    "infer_task_kind",
    "make_retrieval_task",
    "pair_task",
    "read_labelled",
    "read_pairs",
    "read_sts",
    "retrieval_task",
    "squad_retrieval_data",
    "squad_retrieval_task",
    "split_from_name",
    "sts_task",
    "task_from_path",
    "tatoeba_files",
    "to_langscript",
]
