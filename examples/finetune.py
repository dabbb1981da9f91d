"""The main job: train Conan-Embedding-v2 through all stages (paper §3.1) and write a SentenceTransformer folder.

    accelerate launch examples/finetune.py                     # tiny preset + embedded demo corpus, ~2-4 min on CPU

runs stage 0 (tokenizer) → 1 (pre-training) → 2 (SFT) → 3 (weakly-supervised, soft mask) → 4 (supervised multi-task,
DHNM, Matryoshka), prints each stage's losses and a held-out evaluation (CLR accuracy, STS Spearman) before and after
the embedding stages, and writes ``./conan-v2`` (stock transformers classes: no ``trust_remote_code`` needed):

    >>> from sentence_transformers import SentenceTransformer
    >>> model = SentenceTransformer("conan-v2")
    >>> model.encode_query(["What do pandas eat?"]).shape
    (1, 128)

Options (see ``--help``):

    --stages 3,4                     run only some stages (the others' outputs must exist in --work_dir)
    --stages 3,4 --set weak.model=Qwen/Qwen2.5-0.5B     stages 3-4 on your own decoder (or --stages 4 with
                                     --set supervised.model=<encoder or decoder>)
    --preset none                    the paper's full-size defaults (1.4B model) instead of the tiny preset
    --config_dir my_configs/         your own <stage>.yaml files, holding the keys you change (see --help of
                                     `conan-train <stage>`)
    --set pretrain.data='[{path: corpus.jsonl}]' --set supervised.lora='{r: 16}'   override single options
    --max_steps 5                    cap every stage (smoke tests)
    --resume no                      train every stage again from the start (default: resume / skip what is done)

Flags are spelled with underscores, as the stages' (``--max-steps`` etc. are accepted too).

Multi-GPU / NPU / multi-node: pass an accelerate config, e.g.
``accelerate launch --config_file conan_hf/stages/configs/accelerate/deepspeed_zero1_bf16.yaml examples/finetune.py
--preset none``.
Interrupted runs resume from the latest complete checkpoint of the interrupted stage when started again.
"""

from __future__ import annotations

import os
import sys

# Runnable from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conan_hf.stages.run_all import main  # noqa: E402

if __name__ == "__main__":
    main()
