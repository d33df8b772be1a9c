"""Training benchmark: one DI* iteration (K_TA assistant updates + one generator update) per batch size, LoRA
three-in-one against three separate UNets, and the largest batch that fits (CUDA).

A front to `di-star bench training` (the code lives in `diffusers_di_star.benchmarking`); it takes the same options:

    python benchmarks/bench_training.py --quick          # smoke run on a CPU, seconds
    python benchmarks/bench_training.py --out results/   # full-size modules on a GPU, reduced ones on a CPU

See docs/benchmarks.md.
"""

import sys

from diffusers_di_star.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "training", *sys.argv[1:]]))
