"""Entry point of the design card: `accelerate launch -m trainers.tokenizer_stage` runs `conan_hf.stages.tokenizer`."""

from conan_hf.stages.tokenizer import main

if __name__ == "__main__":
    main()
