"""Model-card generation for trained Conan embedding models (``generate_model_card``).

The card (README.md with Hub YAML metadata) is built from the saved model folder, the training run's record and
the evaluation results; see :mod:`conan_hf.model_card.generate` (with :mod:`~conan_hf.model_card.run_info`,
:mod:`~conan_hf.model_card.languages`, :mod:`~conan_hf.model_card.results` and :mod:`~conan_hf.model_card.sections`).
Command line: ``python -m conan_hf.model_card MODEL_DIR [--run-info PATH] [--results PATH ...] [--hub-model-id ID]
[--output README.md]``.
"""

from __future__ import annotations

from .generate import (
    MIN_TRANSFORMERS,
    count_parameters,
    generate_model_card,
    load_run_info,
    main,
    render_model_card,
)

__all__ = ["MIN_TRANSFORMERS", "count_parameters", "generate_model_card", "load_run_info", "main",
           "render_model_card"]
