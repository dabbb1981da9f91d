"""Entry point of the design card: `accelerate launch -m trainers.supervised` runs `conan_hf.stages.supervised`."""

from conan_hf.stages.supervised import main

if __name__ == "__main__":
    main()
