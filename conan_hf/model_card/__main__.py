"""``python -m conan_hf.model_card MODEL_DIR ...``: write a model card (see
:func:`conan_hf.model_card.generate.main`)."""

from conan_hf.model_card.generate import main

if __name__ == "__main__":
    main()
