"""The empty text on an exported embedder (`conan_hf.export.export_embedder`, stock transformers classes): in a process
where conan_hf cannot be imported, `SentenceTransformer(path).encode(["", "hello"])` works and gives "" the zero
vector (mean pooling over no token) and "hello" its own embedding; `FastEncoder` and the trained
`ConanSentenceTransformer` give the same, also for "" alone; non-empty texts keep the trained embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from conan_hf import ConanConfig, build_sentence_transformer
from conan_hf.encode import FastEncoder
from conan_hf.export import export_embedder
from conan_hf.sentence import format_query_prompt

PROMPT = format_query_prompt("Given a question, retrieve passages that answer it")

ENCODE_WITHOUT_CONAN = textwrap.dedent(
    """
    import json, sys
    sys.modules["conan_hf"] = None
    try:
        import conan_hf  # noqa: F401
        raise SystemExit("conan_hf was importable")
    except ImportError:
        pass
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(sys.argv[1])
    np.savez(sys.argv[2], mixed=model.encode(["", "hello"]), hello=model.encode(["hello"]),
             query=model.encode(["", "hello"], prompt_name="query"), empty_ids=len(model.tokenizer("")["input_ids"]))
    """
)


def test_empty_text_on_the_exported_embedder(tmp_path):
    torch.manual_seed(0)
    trained = build_sentence_transformer(ConanConfig.tiny(), prompts={"query": PROMPT}, max_seq_length=64).eval()
    export_embedder(trained, tmp_path / "conan-v2")
    script, out = tmp_path / "encode.py", tmp_path / "out.npz"
    script.write_text(ENCODE_WITHOUT_CONAN)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "conan-v2"), str(out)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = np.load(out)
    assert int(stock["empty_ids"]) == 0  # the tokenizer is saved as trained: "" has no token
    # "" pools no token: the zero vector; "hello" is what it is alone, and what the trained model gives it.
    assert np.all(stock["mixed"][0] == 0) and np.all(stock["query"][0] == 0)
    np.testing.assert_allclose(stock["mixed"][1], stock["hello"][0], atol=1e-6)
    np.testing.assert_allclose(stock["hello"][0], trained.encode("hello"), atol=1e-5)
    assert abs(np.linalg.norm(stock["hello"][0]) - 1) < 1e-5

    for encoder in (FastEncoder(str(tmp_path / "conan-v2"), dtype="float32"), FastEncoder(trained, dtype="float32")):
        np.testing.assert_allclose(encoder.encode([""]), stock["mixed"][:1], atol=0)
        np.testing.assert_allclose(encoder.encode(["", "hello"]), stock["mixed"], atol=1e-5)
        np.testing.assert_allclose(encoder.encode_query(["", "hello"]), stock["query"], atol=1e-5)
    # The trained model embeds "" alone (a batch of texts without any token) as it does beside other texts.
    np.testing.assert_allclose(trained.encode([""]), stock["mixed"][:1], atol=0)
    np.testing.assert_allclose(trained.encode(["", ""], prompt_name="query"), stock["query"][[0, 0]], atol=0)
    np.testing.assert_allclose(trained.encode(["", "hello"]), stock["mixed"], atol=1e-5)
    # The saved tokenizer is the trained one, so every non-empty text keeps its tokens.
    saved = json.loads((tmp_path / "conan-v2" / "tokenizer.json").read_text())
    assert saved["post_processor"] == json.loads(trained.tokenizer.backend_tokenizer.to_str())["post_processor"]
