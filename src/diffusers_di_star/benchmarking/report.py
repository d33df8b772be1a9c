"""Markdown tables and the report around them (device, versions, settings), plus a JSON copy of the records."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .measure import describe_device, software_versions
from .settings import BenchSettings

__all__ = ["NOT_AVAILABLE", "SuiteResult", "format_memory", "format_ratio", "markdown_table", "render", "write"]

#: Shown for a value that was not measured (peak memory on a CPU) or could not be (out of memory).
NOT_AVAILABLE = "n/a"


@dataclass
class SuiteResult:
    """One benchmark's output: a title, its Markdown tables, notes printed under them, and the raw records."""

    name: str
    title: str
    tables: list[str]
    notes: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_memory(num_bytes: int | None) -> str:
    return NOT_AVAILABLE if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def format_ratio(value: float | None) -> str:
    return NOT_AVAILABLE if value is None or not math.isfinite(value) else f"{value:.2f}×"


def _header(settings: BenchSettings) -> list[str]:
    dtype_name = str(settings.dtype).removeprefix("torch.")
    lines = [
        f"- device: {describe_device(settings.device)}",
        f"- software: {software_versions()}",
        f"- modules: SDXL `{settings.size.name}` size, random weights, {settings.resolution}² images, "
        f"base dtype {dtype_name}; median of {settings.repeats} timed calls after {settings.warmup} warm-up",
    ]
    if settings.quick:
        lines.append("- `--quick`: a smoke run of the code paths; its numbers mean nothing")
    return lines


def render(results: Sequence[SuiteResult], settings: BenchSettings) -> str:
    """The Markdown report: the run's header, then each suite's title, tables and notes."""
    parts = ["\n".join(_header(settings))]
    for result in results:
        parts.append(f"### {result.title}")
        parts.extend(result.tables)
        if result.notes:
            parts.append("\n".join(f"- {note}" for note in result.notes))
    return "\n\n".join(parts) + "\n"


def write(results: Sequence[SuiteResult], report: str, out_dir: str | os.PathLike) -> list[str]:
    """``report.md`` and one ``<suite>.json`` of raw records per suite in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.md")]
    with open(paths[0], "w", encoding="utf-8") as file:
        file.write(report)
    for result in results:
        paths.append(os.path.join(out_dir, f"{result.name}.json"))
        with open(paths[-1], "w", encoding="utf-8") as file:
            json.dump(result.records, file, indent=2)
    return paths
