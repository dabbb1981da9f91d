"""Entry point of the design card: ``python -m model_card.generate MODEL_DIR ...`` runs the card generator's command
line (:func:`conan_hf.model_card.generate.main`, the same as ``python -m conan_hf.model_card``)."""

from conan_hf.model_card.generate import *
from conan_hf.model_card.generate import main

if __name__ == "__main__":
    main()
