"""Entry point of the design card: `accelerate launch -m trainers.run_all` runs `conan_hf.stages.run_all`."""

from conan_hf.stages.run_all import main

if __name__ == "__main__":
    main()
