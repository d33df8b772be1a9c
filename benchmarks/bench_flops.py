"""FLOP counts of the SDXL modules with FlopCounterMode on the meta device, next to the figures in docs/benchmarks.md.

A front to `di-star bench flops` (the code lives in `diffusers_di_star.benchmarking`); it takes the same options:

    python benchmarks/bench_flops.py --quick          # smoke run on a CPU, seconds
    python benchmarks/bench_flops.py --out results/   # full-size modules on a GPU, reduced ones on a CPU

See docs/benchmarks.md.
"""

import sys

from diffusers_di_star.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "flops", *sys.argv[1:]]))
