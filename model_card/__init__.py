"""Entry point of the design card: the model-card generator lives in :mod:`conan_hf.model_card`."""

from conan_hf.model_card import count_parameters, generate_model_card, load_run_info, render_model_card

__all__ = ["count_parameters", "generate_model_card", "load_run_info", "render_model_card"]
