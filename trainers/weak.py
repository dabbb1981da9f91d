"""Entry point of the design card: `accelerate launch -m trainers.weak` runs `conan_hf.stages.weak`."""

from conan_hf.stages.weak import main

if __name__ == "__main__":
    main()
