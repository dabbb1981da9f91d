"""Entry point of the design card: ``python -m model_card.generate``; the generator is :mod:`conan_hf.model_card`."""

from conan_hf.model_card.generate import *  # noqa: F401,F403
