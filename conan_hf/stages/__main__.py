"""``conan-train <stage> [options]`` / ``python -m conan_hf.stages <stage> [options]``: run one training stage
(``tokenizer``, ``pretrain``, ``sft``, ``weak``, ``supervised``) or ``all`` (the main job, as
``examples/finetune.py``). ``conan-train <stage> --help`` lists the stage's options."""

from __future__ import annotations

import importlib
import sys

from conan_hf.stages import STAGES

COMMANDS = {**{stage: stage for stage in STAGES}, "all": "run_all"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: conan-train {{{','.join(COMMANDS)}}} [options]\n\n{__doc__}")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"conan-train: error: unknown stage {argv[0]!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"conan_hf.stages.{COMMANDS[argv[0]]}").main(argv[1:])


if __name__ == "__main__":
    main()
