"""Run benchmark suites with the libraries' chatter silenced, and render (and write) their report."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import diffusers
import torch
import transformers

from .flops import run_flops_benchmark
from .inference import run_inference_benchmark
from .measure import free_memory
from .report import render, write
from .settings import BenchSettings
from .training import run_training_benchmark

__all__ = ["SUITES", "run_benchmarks"]

#: Suite name -> ``run(settings) -> SuiteResult``, in the order ``all`` runs them (cheapest first).
SUITES = {"flops": run_flops_benchmark, "inference": run_inference_benchmark, "training": run_training_benchmark}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Random weights and repeated casts make diffusers, transformers and peft warn about things that mean nothing here.
    loggers = (diffusers.utils.logging, transformers.utils.logging)
    levels = [logging.get_verbosity() for logging in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logging in loggers:
            logging.set_verbosity_error()
        try:
            yield
        finally:
            for logging, level in zip(loggers, levels, strict=True):
                logging.set_verbosity(level)


def run_benchmarks(
    suites: Sequence[str],
    settings: BenchSettings,
    out_dir: str | os.PathLike | None = None,
    on_suite: Callable[[str], None] | None = None,
) -> tuple[str, list[str]]:
    """Run ``suites`` (names from :data:`SUITES`); return the Markdown report and the files written to ``out_dir``.

    ``on_suite(name)`` is called as each suite starts (``di-star bench`` prints it)."""
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; choose from {list(SUITES)}.")
    results = []
    with _quiet():
        for name in suites:
            if on_suite is not None:
                on_suite(name)
            results.append(SUITES[name](settings))
            torch._dynamo.reset()  # compiled graphs (and CUDA graph pools) keep a suite's modules alive
            free_memory(settings.device)
    report = render(results, settings)
    return report, write(results, report, out_dir) if out_dir is not None else []
