"""The benchmarks in `--quick` mode on the CPU: `di-star bench` and the scripts in benchmarks/ produce their tables.

Structure only (rows, columns, finite positive timings, ratios consistent with the timings): no timing assertions.
"""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from diffusers_di_star.benchmarking import BenchSettings, Measurement
from diffusers_di_star.benchmarking.training import _largest_batch, _try_measure
from diffusers_di_star.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
INFERENCE_VARIANTS = ["peer", "ours", "fast", "fast-tiny-vae", "floor", "sdxl-base"]
INFERENCE_HEADERS = ["variant", "batch", "ms/image", "images/s", "peak memory", "speed-up vs peer", "time ÷ floor"]
NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
TRAINING_HEADERS = ["layout", "batch", "s/iteration", "s/image", "peak memory"]
TRAINING_HEADERS += ["time ÷ three-in-one", "memory ÷ three-in-one"]


def _sections(report: str) -> dict[str, list[list[dict[str, str]]]]:
    """Each `### title` of a report -> its Markdown tables, each a list of rows keyed by the header."""
    sections = {}
    for chunk in report.split("\n### ")[1:]:
        title, body = chunk.split("\n", 1)
        tables = []
        for block in body.split("\n\n"):
            lines = [line for line in block.splitlines() if line.startswith("|")]
            if lines:
                headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
                assert set(lines[1]) == {"|", "-"}
                rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
                assert all(len(row) == len(headers) for row in rows)
                tables.append([dict(zip(headers, row, strict=True)) for row in rows])
        sections[title] = tables
    return sections


def _number(cell: str) -> float:
    value = float(cell.removesuffix("×"))
    assert math.isfinite(value) and value > 0, cell
    return value


def _close(shown: float, expected: float, rounding: float) -> bool:
    return abs(shown - expected) <= rounding + 0.02 * expected


def _check_inference(table: list[dict[str, str]], batch_sizes: list[int]) -> None:
    assert list(table[0]) == INFERENCE_HEADERS
    assert [(row["variant"], int(row["batch"])) for row in table] == [
        (variant, batch) for variant in INFERENCE_VARIANTS for batch in batch_sizes
    ]
    ms = {(row["variant"], int(row["batch"])): _number(row["ms/image"]) for row in table}
    for row in table:
        key, batch = (row["variant"], int(row["batch"])), int(row["batch"])
        assert _close(_number(row["images/s"]), 1000 / ms[key], 0.01)
        assert _close(_number(row["speed-up vs peer"]), ms["peer", batch] / ms[key], 0.01)
        assert _close(_number(row["time ÷ floor"]), ms[key] / ms["floor", batch], 0.01)
        assert row["peak memory"] == "n/a"  # CPU


def _check_training(tables: list[list[dict[str, str]]], batch_sizes: list[int]) -> None:
    (table,) = tables  # no largest-batch table on a CPU
    assert list(table[0]) == TRAINING_HEADERS
    assert [(row["layout"], int(row["batch"])) for row in table] == [
        (layout, batch) for layout in ("three-in-one", "separate") for batch in batch_sizes
    ]
    seconds = {(row["layout"], int(row["batch"])): _number(row["s/iteration"]) for row in table}
    for row in table:
        layout, batch = row["layout"], int(row["batch"])
        assert _close(_number(row["s/image"]), seconds[layout, batch] / batch, 0.001)
        assert _close(
            _number(row["time ÷ three-in-one"]), seconds[layout, batch] / seconds["three-in-one", batch], 0.01
        )
        assert row["peak memory"] == row["memory ÷ three-in-one"] == "n/a"  # CPU


def _check_flops(tables: list[list[dict[str, str]]]) -> None:
    (table,) = tables
    assert len(table) == 8 and table[0]["module"] == "SDXL UNet forward"
    assert all(_number(row["GFLOP per image"]) for row in table)


@pytest.fixture(scope="module")
def bench_all(tmp_path_factory):
    """`di-star bench --quick --out DIR`: every suite, once for the module."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_bench_quick_runs_every_suite_and_writes_its_report(bench_all):
    report = (bench_all / "report.md").read_text()
    assert "- device: " in report and "torch " in report and "`--quick`" in report
    sections = _sections(report)
    titles = list(sections)
    assert [title.split(",")[0] for title in titles] == ["FLOPs per image", "Inference", "Training: one DI* iteration"]
    _check_flops(sections[titles[0]])
    _check_inference(sections[titles[1]][0], [1, 4])
    _check_training(sections[titles[2]], [1, 2])
    assert "largest batch that fits: not searched" in report


def test_bench_json_records_hold_the_exact_ratios(bench_all):
    records = json.loads((bench_all / "inference.json").read_text())
    seconds = {(r["variant"], r["batch_size"]): r["seconds_per_call"] / r["batch_size"] for r in records}
    for r in records:
        key, batch = (r["variant"], r["batch_size"]), r["batch_size"]
        assert r["speedup_vs_peer"] == pytest.approx(seconds["peer", batch] / seconds[key])
        assert r["time_over_floor"] == pytest.approx(seconds[key] / seconds["floor", batch])
        assert r["peak_memory_bytes"] is None
    training = json.loads((bench_all / "training.json").read_text())
    assert all(r["fits"] and r["seconds_per_iteration"] > 0 for r in training)


@pytest.mark.parametrize("suite", ["inference", "training", "flops"])
def test_benchmark_script_quick_produces_its_table(suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"bench_{suite}.py", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / f"bench_{suite}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith((tmp_path / "report.md").read_text())
    (tables,) = _sections(printed).values()
    if suite == "inference":
        _check_inference(tables[0], [1, 4])
    elif suite == "training":
        _check_training(tables, [1, 2])
    else:
        _check_flops(tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.md", f"{suite}.json"])


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--device", "cuda"], "sees no CUDA device", marks=NEEDS_NO_GPU),
        (["--layouts", "three-in-one,shared"], "layouts must be among"),
        (["--resolution", "100"], "multiple of 8"),
        (["--device", "cpu", "--largest-batch"], "needs a CUDA device"),
        (["--compile-mode", "fastest"], "compile_mode must be one of"),
    ],
)
def test_bench_bad_options_are_one_clear_line(argv, message, capsys):
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("di-star bench: error: ") and message in err


class _FakeIteration:
    """A training iteration that runs out of GPU memory above ``capacity`` images."""

    def __init__(self, capacity: int):
        self.capacity, self.resets = capacity, 0

    def __call__(self, batch_size: int) -> None:
        if batch_size > self.capacity:
            raise torch.OutOfMemoryError(f"batch {batch_size} does not fit")

    def reset(self) -> None:
        self.resets += 1


@pytest.mark.parametrize(
    "capacity, measured, expected",
    [(11, {1: True, 2: True, 4: True}, 11), (3, {1: True, 2: True, 4: False}, 3), (0, {1: False}, 0), (500, {}, 64)],
)
def test_largest_batch_search_doubles_then_bisects(capacity, measured, expected):
    settings = BenchSettings.resolve(device="cpu", quick=True)
    iteration = _FakeIteration(capacity)
    known = {batch: Measurement(1.0, None) if fits else None for batch, fits in measured.items()}
    batch, measurement = _largest_batch(iteration, settings, known)
    assert batch == expected
    assert (measurement is None) == (expected == 0)


def test_out_of_memory_is_recorded_as_not_fitting_and_resets_the_optimisers():
    settings = BenchSettings.resolve(device="cpu", quick=True)
    iteration = _FakeIteration(capacity=2)
    assert _try_measure(iteration, 2, settings, warmup=1, repeats=2).seconds >= 0
    assert _try_measure(iteration, 3, settings, warmup=1, repeats=2) is None
    assert iteration.resets == 1
