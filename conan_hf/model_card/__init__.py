"""Model-card generation for trained Conan embedding models (``generate_model_card``).

The card (README.md with Hub YAML metadata) is built from the saved model folder, the training run's record and
the evaluation results; see :mod:`conan_hf.model_card.generate`.
"""

from __future__ import annotations

from .generate import (
    count_parameters,
    generate_model_card,
    load_run_info,
    render_model_card,
)

__all__ = ["count_parameters", "generate_model_card", "load_run_info", "render_model_card"]
