"""Timing and peak memory: CUDA events with ``torch.cuda.max_memory_allocated``, or wall-clock time on a CPU."""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["Measurement", "describe_device", "free_memory", "measure", "measure_interleaved", "software_versions"]


@dataclass(frozen=True)
class Measurement:
    """Median seconds per call over the timed calls, and their peak allocated memory (bytes; ``None`` on a CPU)."""

    seconds: float
    peak_memory: int | None


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Measurement:
    """Call ``fn`` ``warmup`` times untimed (compilation, autotuning, lazy allocation), then time ``repeats`` calls.

    On CUDA each call is bracketed by CUDA events after a synchronize, and the peak is
    ``torch.cuda.max_memory_allocated`` over the timed calls (everything resident counts: weights, optimiser state,
    activations). On a CPU the time is ``time.perf_counter`` and memory is not reported: the RSS of a PyTorch process
    says little about what a model needs.
    """
    return measure_interleaved({None: fn}, device, warmup, repeats)[None]


def measure_interleaved(
    calls: Mapping[Hashable, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[Hashable, Measurement]:
    """:func:`measure` for several calls at once, round-robin: each is warmed up, then every round times each once.

    A slow spell of a shared machine then hits all of them alike, so their ratios stay meaningful.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in calls}
    peaks = dict.fromkeys(calls)
    for _ in range(repeats):
        for key, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[key].append(_time_call(fn, device))
            if device.type == "cuda":
                peaks[key] = max(peaks[key] or 0, torch.cuda.max_memory_allocated(device))
    return {key: Measurement(statistics.median(times[key]), peaks[key]) for key in calls}


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next measurement starts from what is still referenced."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_device(device: torch.device) -> str:
    """E.g. ``NVIDIA H100 80GB HBM3 (79.1 GiB)`` or ``AMD EPYC CPU, 2 threads``."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.1f} GiB)"
    return f"{_cpu_model()} CPU, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software_versions() -> str:
    import diffusers
    import peft
    import transformers

    python = ".".join(map(str, sys.version_info[:3]))
    return (
        f"Python {python}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )
