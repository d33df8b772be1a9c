"""Speed and memory benchmarks (issue 6): ``di-star bench`` and ``benchmarks/*.py`` are thin fronts to this.

Everything runs on SDXL modules with random weights built from the shipped configs (:mod:`.components`): full size
on a GPU, a reduced size on a CPU, where only the ratios mean something. Suites: ``flops`` (FLOP counts on the meta
device), ``inference`` (the peer recipe, our pipeline default and fast, the floor, SDXL base at 50 steps) and
``training`` (one DI* iteration, three-in-one LoRA vs three separate UNets). :mod:`.gpu_report`
(``benchmarks/gpu_report.sh``) runs what a GPU must measure as rows with time limits within one budget, and
:mod:`.memory` computes training memory without allocating it (``di-star bench memory``: the peak of one DI*
iteration on fake tensors; the static part on the meta device). Results: ``docs/benchmarks.md``.

>>> from diffusers_di_star.benchmarking import BenchSettings, run_benchmarks
>>> report, _ = run_benchmarks(["inference"], BenchSettings.resolve(quick=True))  # doctest: +SKIP
"""

from .components import SIZES, ModelSize, build_sdxl_components
from .inference import apply_fast_settings
from .measure import Measurement, measure
from .report import SuiteResult
from .runner import SUITES, run_benchmarks
from .settings import COMPILE_MODES, TRAINING_LAYOUTS, BenchSettings

__all__ = [
    "COMPILE_MODES",
    "SIZES",
    "SUITES",
    "TRAINING_LAYOUTS",
    "BenchSettings",
    "Measurement",
    "ModelSize",
    "SuiteResult",
    "apply_fast_settings",
    "build_sdxl_components",
    "measure",
    "run_benchmarks",
]
