"""Entry point of the design card: `accelerate launch -m trainers.sft` runs `conan_hf.stages.sft`."""

from conan_hf.stages.sft import main

if __name__ == "__main__":
    main()
