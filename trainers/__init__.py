"""Entry points of the design card: one file per stage, each calling :mod:`conan_hf.stages`."""
