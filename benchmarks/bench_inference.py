"""Inference benchmark: the peer recipe (SDXL + LCMScheduler, timesteps=[399]), DIStarSDXLPipeline with default
and fast settings, the floor (modules called directly) and SDXL base at 50 steps with CFG, side by side.

A front to `di-star bench inference` (the code lives in `diffusers_di_star.benchmarking`); it takes the same options:

    python benchmarks/bench_inference.py --quick          # smoke run on a CPU, seconds
    python benchmarks/bench_inference.py --out results/   # full-size modules on a GPU, reduced ones on a CPU

See docs/benchmarks.md.
"""

import sys

from diffusers_di_star.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "inference", *sys.argv[1:]]))
