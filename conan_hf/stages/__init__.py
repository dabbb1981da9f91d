"""The training stages of the paper (§3.1): ``tokenizer`` (0), ``pretrain`` (1), ``sft`` (2), ``weak`` (3) and
``supervised`` (4), and ``run_all`` (the whole pipeline, the main job). Run one with ``conan-train <stage>`` or
``accelerate launch -m conan_hf.stages <stage>``; the shipped YAML files are in ``conan_hf/stages/configs``."""

STAGES = ("tokenizer", "pretrain", "sft", "weak", "supervised")
