"""The command lines report user errors in one line on stderr with exit status 2 (no traceback); other exceptions keep
their traceback. Also what conan-eval prints for a metric that is undefined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conan_hf.errors import DataError, cli_errors

from helpers import REPO, _assert_one_line_exit_2, _write


def test_cli_errors_turns_only_data_errors_into_exit_2(capsys):
    @cli_errors("tool")
    def bad_input():
        raise DataError("score is 'nan'\nnot a number", where="f.csv:3", hint="fix it")

    @cli_errors("tool")
    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(SystemExit) as exited:
        bad_input()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "tool: error: f.csv:3: score is 'nan' not a number; fix it\n"
    with pytest.raises(KeyError):
        bug()


def test_usage_errors_are_one_line_too(capsys):
    from conan_hf.data.clr import main as clr_main
    from conan_hf.eval.__main__ import main as eval_main
    from conan_hf.stages.weak import WeakConfig
    from conan_hf.training.config import parse_config

    for call, prog in ((lambda: clr_main(["rows.jsonl"]), "conan-clr"),
                       (lambda: eval_main(["--data", "x.csv"]), "conan-eval"),
                       (lambda: eval_main(["--model", "m", "--task", "nonsense"]), "conan-eval"),
                       (lambda: parse_config(WeakConfig, "weak", ["--no-such-option", "1"]), "conan-train weak")):
        with pytest.raises(SystemExit) as exited:
            call()
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and f"see {prog} --help" in err, err


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_training_clis_report_bad_data_in_one_line(tmp_path):
    _write(tmp_path / "bad.jsonl", '{"query": "a", "positive": "b"}\n{"query": 12, "positive": "p"}\n')
    result = _run(["-m", "conan_hf.stages.weak", "--model", "unused", "--data", "[bad.jsonl]",
                   "--output_dir", "out"], tmp_path)
    line = _assert_one_line_exit_2(result, "conan-train weak", "bad.jsonl:2")
    assert "column 'query' must be a text" in line
    result = _run([str(REPO / "examples" / "finetune.py"), "--stages", "3", "--work-dir", "work", "--no-eval",
                   "--set", "weak.data=[bad.jsonl]"], tmp_path)
    _assert_one_line_exit_2(result, "finetune", "bad.jsonl:2")
    assert not (tmp_path / "work" / "weak" / "final").exists()


def test_conan_clr_refuses_an_empty_input_file(tmp_path):
    _write(tmp_path / "empty.jsonl", "")
    result = _run(["-m", "conan_hf.data.clr", "empty.jsonl", "-o", "out.jsonl"], tmp_path)
    assert "no rows" in _assert_one_line_exit_2(result, "conan-clr", "empty.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_conan_eval_reports_a_nan_score_in_one_line(tiny_model_dir, tmp_path):
    _write(tmp_path / "sts.csv", "a,b,4.0\nc,d,nan\n")
    result = _run(["-m", "conan_hf.eval", "--model", str(tiny_model_dir), "--task", "sts", "--data", "sts.csv"],
                  tmp_path)
    assert "column 'score': cannot convert 'nan'" in _assert_one_line_exit_2(result, "conan-eval", "sts.csv:2")
    assert "NaN" not in result.stdout


def test_conan_eval_prints_null_for_an_undefined_metric(tiny_model_dir, tmp_path, capsys):
    """Every gold score equal: Spearman is undefined. The JSON line stays strict JSON (null, not NaN), and stderr says
    why."""
    from conan_hf.eval.__main__ import main

    data = _write(tmp_path / "flat.csv", "".join(f"sentence {i},other sentence {i},3\n" for i in range(6)))
    assert main(["--model", str(tiny_model_dir), "--task", "sts", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    summary = json.loads(last, parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"))
    assert summary == {"LocalSTS-flat": None}
    assert "LocalSTS-flat is undefined (NaN), reported as null" in captured.err
