"""Generate the README.md (Hugging Face model card) of a trained Conan embedding model.

Everything in the card is read from the run, never typed in by hand (a Hub-ready folder: YAML front matter with
``library_name``, ``pipeline_tag``, tags, ``license`` (apache-2.0 unless ``run_info`` says otherwise), ``language`` (the
training data's, see :func:`training_languages`), ``base_model`` (see :func:`base_model`) and the mteb
``model-index`` from the evaluation results passed in, only those, and only their evaluation splits):

* the saved SentenceTransformer folder: ``config.json`` (architecture table; encoder or decoder, see
  :func:`backbone_attention`), ``model*.safetensors`` headers (parameter count), ``config_sentence_transformers.json``
  (prompts, similarity), ``1_Pooling/config.json``, ``tokenizer_config.json`` (maximum sequence length);
* ``run_info``: what the training stages actually used (see :func:`load_run_info`): the Matryoshka section appears
  only when Matryoshka representation learning was trained, DHNM only when stage 4 ran it on hard negatives the data
  had (the ``tasks`` / ``dhnm`` entries of its record);
* ``results``: evaluation results from :func:`conan_hf.eval.evaluate` / :func:`conan_hf.eval.evaluate_cross_lingual`
  (objects, their ``summary.json`` files, or a results folder), rendered as tables and as the ``model-index`` YAML
  the Hub shows. Scores on a ``train`` split are shown in the table with a note, never in the model-index.

The title and the model id in the usage snippets are ``hub_model_id`` (``--hub-model-id``; else ``run_info``'s
``hub_model_id`` / ``repo_id``, or a stage's recorded ``hub_model_id``), else the output folder's name (a stage's
``<output_dir>/final`` is named after ``<output_dir>``). A decoder exported with stock classes runs bidirectionally
through ``"is_causal": false`` in its ``config.json``, which transformers honours from version :data:`MIN_TRANSFORMERS`
on; the card says so.

Every ``python`` block of the card runs as written in a folder holding the model under its name (tests execute
them). Whether they pass ``trust_remote_code=True`` follows the folder: only a ``config.json`` with ``auto_map``
(Conan's own remote code) needs it, so the card never shows a line that stops at transformers' y/N prompt.

Publishing: the folder (with this README.md) uploads as it is with sentence-transformers'
``SentenceTransformer("conan-v2").push_to_hub("you/conan-v2", local_model_path="conan-v2")``; without
``local_model_path`` sentence-transformers would save the model again and write its own card.

Command line (see :func:`main`)::

    python -m conan_hf.model_card runs/supervised/final --results results/ --hub-model-id me/conan-v2

Example::

    >>> from conan_hf.model_card import generate_model_card
    >>> from conan_hf.eval import evaluate, sts_task
    >>> report = evaluate("out/final", [sts_task("stsb-en-dev.csv")])
    >>> card = generate_model_card("out/final", run_info="runs/run_info.json", results=report)
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conan_hf.errors import (
    DataFileNotFoundError,
    OneLineArgumentParser,
    cli_errors,
)

from .languages import (  # noqa: F401 (re-exported)
    LANGUAGE_SAMPLE_ROWS,
    data_languages,
    detect_languages,
    training_languages,
)
from .results import _model_index, _result_rows, is_training_split
from .run_info import (
    _hub_id,
    _matryoshka_dims,
    _output_name,
    _read_json,
    backbone_attention,
    base_model,
    count_parameters,
    load_run_info,
    stage4_facts,
)
from .sections import (  # noqa: F401 (STAGE_OBJECTIVES, KEY_HYPERPARAMETERS: re-exported)
    KEY_HYPERPARAMETERS,
    STAGE_OBJECTIVES,
    _backbone_phrase,
    _evaluation_section,
    _format_value,
    _md_cell,
    _pooling_code,
    _prompts_section,
    _training_section,
)

TEMPLATE_PATH = Path(__file__).with_name("template.md")
#: The oldest transformers that runs a stock-exported decoder as it was trained: its ``config.json`` says
#: ``"is_causal": false``, which transformers reads from 5.2.0 on (``masking_utils.create_causal_mask`` then builds a
#: bidirectional mask, ``utils.generic.merge_with_config_defaults`` passes ``is_causal`` to the attention kernels);
#: 5.0 and 5.1 ignore it and silently run the decoder causally. setup.cfg's floor is the same.
MIN_TRANSFORMERS = "5.2"


ARCHITECTURE_FIELDS = (
    ("model_type", "Model type"), ("architectures", "Architecture"), ("num_hidden_layers", "Layers"),
    ("hidden_size", "Hidden size"), ("num_attention_heads", "Attention heads (query)"),
    ("num_key_value_heads", "Key/value heads"), ("head_dim", "Head dimension"),
    ("intermediate_size", "FFN size"), ("hidden_act", "Activation"), ("vocab_size", "Vocabulary"),
    ("max_position_embeddings", "Max positions"), ("rms_norm_eps", "RMSNorm epsilon"),
    ("attention_mode", "Attention (embedding)"), ("tie_word_embeddings", "Tied embeddings"),
)


def _citation() -> str:
    from conan_hf.losses import CONAN_CITATION

    return CONAN_CITATION.strip()


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def render_model_card(model_dir: str | Path, run_info: Any = None, results: Any = None,
                      hub_model_id: str | None = None) -> str:
    """The model card of ``model_dir`` as a string (see :func:`generate_model_card`)."""
    import yaml

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataFileNotFoundError("no such model folder" if not model_dir.exists() else "not a folder",
                                    where=str(model_dir), hint="pass a saved SentenceTransformer folder")
    if not (model_dir / "config.json").is_file():
        raise DataFileNotFoundError("no config.json; expected a saved SentenceTransformer folder",
                                    where=str(model_dir))

    def optional_json(*parts: str) -> dict[str, Any]:
        path = model_dir.joinpath(*parts)
        return _read_json(path) if path.exists() else {}

    config = _read_json(model_dir / "config.json")
    st_config = optional_json("config_sentence_transformers.json")
    pooling = optional_json("1_Pooling", "config.json")
    tokenizer_config = optional_json("tokenizer_config.json")
    bert_config = optional_json("sentence_bert_config.json")
    info = load_run_info(run_info, model_dir)
    rows = _result_rows(results)

    embedding_dim = pooling.get("embedding_dimension") or pooling.get("word_embedding_dimension") \
        or config.get("hidden_size")
    max_seq_length = bert_config.get("max_seq_length") or tokenizer_config.get("model_max_length") or 512
    if isinstance(max_seq_length, (int, float)) and max_seq_length > 10**8:
        max_seq_length = config.get("max_position_embeddings", 512)
    pooling_mode = pooling.get("pooling_mode") or next(
        (k.replace("pooling_mode_", "").replace("_tokens", "") for k, v in pooling.items()
         if k.startswith("pooling_mode_") and v), "mean")
    if pooling_mode == "mean" and pooling.get("include_prompt") is False:
        pooling_label = "mean over input tokens (prompt tokens excluded)"
    else:
        pooling_label = pooling_mode
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v is not None}
    similarity = st_config.get("similarity_fn_name") or "cosine"
    mrl_dims = _matryoshka_dims(info, embedding_dim)
    parameters = count_parameters(model_dir)
    hub = _hub_id(hub_model_id, info)
    name = info.get("model_name") or (hub.rsplit("/", 1)[-1] if hub else _output_name(model_dir))
    repo_id = hub or name
    languages = training_languages(info)
    license_name = info.get("license") or "apache-2.0"
    model_index = _model_index(name, rows)
    kind, attention = backbone_attention(config, info)
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "conan-embedding"]
    if mrl_dims:
        tags.append("matryoshka")
    if model_index:
        tags.append("mteb")  # the model-index below holds mteb results
    tags += [t for t in info.get("tags", []) if t not in tags]

    metadata: dict[str, Any] = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                                "tags": tags, "license": license_name}
    if languages:
        metadata["language"] = list(languages)
    base = base_model(info)
    if base:
        metadata["base_model"] = base
    if model_index:
        metadata["model-index"] = model_index
    # Conan's own architecture is loaded through the folder's code (config.json `auto_map`); a stock architecture
    # loads without it, and asking for it would only add a needless trust decision.
    remote_code = bool(config.get("auto_map"))

    architecture = []
    for key, label in ARCHITECTURE_FIELDS:
        if key in config and config[key] is not None:
            architecture.append(f"| {label} | {_md_cell(config[key])} |")
    rope = config.get("rope_parameters") or {}
    if isinstance(rope, Mapping) and rope.get("rope_theta"):
        architecture.append(f"| RoPE theta | {_format_value(rope['rope_theta'])} |")

    stock_bidirectional = kind == "decoder" and config.get("is_causal") is False and not remote_code
    requirements = f"Requires `sentence-transformers` and `transformers >= {MIN_TRANSFORMERS}`"
    requirements += (": the decoder runs bidirectionally through `\"is_causal\": false` in its config.json, which "
                     "older transformers ignore (they would silently run it causally)." if stock_bidirectional else ".")
    details = [
        f"| Parameters | {_human(parameters) if parameters else 'unknown'} |",
        f"| Backbone | {kind}, {attention} attention |",
        f"| Embedding dimension | {embedding_dim} |",
        f"| Maximum sequence length | {max_seq_length} tokens |",
        f"| Pooling | {pooling_label} |",
        f"| Similarity | {similarity} |",
        f"| Languages | {', '.join(languages) if languages else 'not recorded'} |",
        f"| License | {license_name} |",
    ]
    if mrl_dims:
        mrl_example = mrl_dims[0] if mrl_dims[0] < (embedding_dim or 0) else embedding_dim
        mrl_section = (
            "### Matryoshka dimensions\n\nTrained with Matryoshka Representation Learning: the first *d* values of "
            "an embedding form a usable *d*-dimensional embedding for *d* in "
            f"{', '.join(str(d) for d in mrl_dims)}.\n\n")
        mrl_usage = string.Template(MRL_USAGE).substitute(
            repo_id=repo_id, remote_code=", trust_remote_code=True" if remote_code else "", mrl_example=mrl_example)
        fast_dim, fast_shape = f"dim={mrl_example}, ", str(mrl_example)
    else:
        mrl_section = mrl_usage = ""
        fast_dim, fast_shape = "", str(embedding_dim)

    description = info.get("description") or (
        "A text embedding model trained with conan-hf following the Conan-Embedding-v2 recipe (arXiv 2509.12892): "
        f"{_backbone_phrase(config, kind, attention)}{f', fine-tuned from `{base}`' if base else ''}, mapping text "
        f"to {embedding_dim}-dimensional vectors for retrieval, semantic similarity, classification and clustering.")

    substitutions = {
        "metadata": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000).strip(),
        "title": name,
        "description": description,
        "details": "\n".join(details),
        "architecture": "\n".join(architecture) or "| (not recorded) | |",
        "mrl_section": mrl_section,
        "mrl_usage": mrl_usage,
        "fast_dim": fast_dim,
        "fast_shape": fast_shape,
        "prompts": _prompts_section(prompts, st_config.get("default_prompt_name")),
        "repo_id": repo_id,
        "remote_code": ", trust_remote_code=True" if remote_code else "",
        "transformers_note": " (the folder's own model code: `trust_remote_code=True`)" if remote_code else "",
        "requirements": requirements,
        "embedding_dim": str(embedding_dim),
        "max_seq_length": str(max_seq_length),
        "transformers_example": '"Paris is the capital of France.", "巴黎是法国的首都。"',
        "pooling_code": _pooling_code(pooling_mode),
        "training": _training_section(info),
        "evaluation": _evaluation_section(rows),
        "citation": _citation(),
    }
    template = string.Template(TEMPLATE_PATH.read_text(encoding="utf-8"))
    return template.substitute(substitutions)


#: The Matryoshka truncation snippet of the usage section (only for a model trained with Matryoshka).
MRL_USAGE = """### Matryoshka truncation

```python
from sentence_transformers import SentenceTransformer

# keep the first ${mrl_example} values of every embedding (re-normalised before cosine similarity)
model = SentenceTransformer("${repo_id}"${remote_code}, truncate_dim=${mrl_example})
embeddings = model.encode(["Matryoshka embeddings nest smaller ones inside."], normalize_embeddings=True)
print(embeddings.shape)  # (1, ${mrl_example})
```

"""


def generate_model_card(model_dir: str | Path, run_info: Any = None, results: Any = None,
                        hub_model_id: str | None = None, output: str | Path | None = None) -> str:
    """Render the model card of ``model_dir`` and write it to ``output`` (default ``model_dir/README.md``); returns
    the text.

    Args:
        model_dir: A saved SentenceTransformer folder.
        run_info: Training record (dict, JSON file, list of stage dicts/files, or folder; see the module docstring).
            Default: ``run_info.json`` or ``conan_stage.json`` in ``model_dir`` when present.
        results: Evaluation results: an ``EvalReport``, a ``CrossLingualReport``, an mteb ``ModelResult``, a
            ``summary.json`` path or results folder, a ``{task: score}`` dict, or a list of these.
        hub_model_id: The Hub repo id (``owner/name``) the card's title and snippets name; default: see the module
            docstring.
        output: Where to write the card.

    Raises:
        DataError: a missing or unreadable input, named with its file (and line).
    """
    card = render_model_card(model_dir, run_info=run_info, results=results, hub_model_id=hub_model_id)
    Path(output or Path(model_dir) / "README.md").write_text(card, encoding="utf-8")
    return card


def build_parser() -> OneLineArgumentParser:
    """The command line of :func:`main` (``python -m conan_hf.model_card``)."""
    parser = OneLineArgumentParser(
        prog="python -m conan_hf.model_card",
        description="Write the model card (README.md with Hub metadata) of a trained Conan embedding model, from "
                    "the saved folder, its training record and evaluation results.")
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a saved SentenceTransformer folder (e.g. runs/supervised/final)")
    parser.add_argument("--run-info", metavar="PATH",
                        help="training record: a run_info JSON, a stage record (conan_stage.json) or a folder of "
                             "stage JSON files (default: MODEL_DIR/run_info.json or MODEL_DIR/conan_stage.json)")
    parser.add_argument("--results", metavar="PATH", nargs="+", action="extend", default=[],
                        help="evaluation results: summary.json files or results folders written by conan-eval")
    parser.add_argument("--hub-model-id", metavar="ID",
                        help="Hub repo id (OWNER/NAME) for the title and the usage snippets (default: the recorded "
                             "hub_model_id, else the output folder's name)")
    parser.add_argument("--output", metavar="README.md",
                        help="where to write the card (default: MODEL_DIR/README.md)")
    return parser


@cli_errors("python -m conan_hf.model_card")
def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m conan_hf.model_card MODEL_DIR [--run-info PATH] [--results PATH ...] [--hub-model-id ID]
    [--output README.md]``: write the card and print where. Bad input (a missing folder or file, unreadable JSON) is
    one line naming the file, exit status 2."""
    args = build_parser().parse_args(argv)
    output = Path(args.output) if args.output else Path(args.model_dir) / "README.md"
    if args.output and not output.parent.is_dir():
        raise DataFileNotFoundError("--output: its folder does not exist", where=str(output))
    generate_model_card(args.model_dir, run_info=args.run_info, results=args.results or None,
                        hub_model_id=args.hub_model_id, output=output)
    print(f"wrote {output}")
    return output


__all__ = ["MIN_TRANSFORMERS", "backbone_attention", "base_model", "build_parser", "count_parameters",
           "data_languages", "detect_languages", "generate_model_card", "is_training_split", "load_run_info", "main",
           "render_model_card", "stage4_facts", "training_languages"]
