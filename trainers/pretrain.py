"""Entry point of the design card: `accelerate launch -m trainers.pretrain` runs `conan_hf.stages.pretrain`."""

from conan_hf.stages.pretrain import main

if __name__ == "__main__":
    main()
