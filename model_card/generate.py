"""Entry point of the design card: ``python -m model_card.generate MODEL_DIR ...`` runs the card generator's command
line (:func:`conan_hf.model_card.generate.main`, the same as ``python -m conan_hf.model_card``)."""

from conan_hf.model_card.generate import (
    MIN_TRANSFORMERS,
    backbone_attention,
    base_model,
    build_parser,
    count_parameters,
    data_languages,
    detect_languages,
    generate_model_card,
    is_training_split,
    load_run_info,
    main,
    render_model_card,
    stage4_facts,
    training_languages,
)

__all__ = ["MIN_TRANSFORMERS", "backbone_attention", "base_model", "build_parser", "count_parameters",
           "data_languages", "detect_languages", "generate_model_card", "is_training_split", "load_run_info", "main",
           "render_model_card", "stage4_facts", "training_languages"]

if __name__ == "__main__":
    main()
