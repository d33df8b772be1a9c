"""The benchmarks in `--quick` mode on the CPU: `di-star bench` and the scripts in benchmarks/ produce their tables.

Structure only (rows, columns, finite positive timings, ratios consistent with the timings): no timing assertions.
"""

import contextlib
import io
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusers_di_star.benchmarking import SIZES, BenchSettings, Measurement, gpu_report
from diffusers_di_star.benchmarking.components import build_unet
from diffusers_di_star.benchmarking.memory import MemoryEstimate
from diffusers_di_star.benchmarking.rows import (
    ERROR,
    OK,
    OUT_OF_MEMORY,
    RUNNING,
    SKIPPED,
    TIME_LIMIT,
    Row,
    RowRunner,
)
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
    # The counts are exact (meta device, fixed configs): the reduced modules at 64², as counted with torch 2.13.
    pinned = {row["module"].split(" (")[0]: (row["parameters (M)"], row["GFLOP per image"]) for row in table}
    assert pinned["SDXL UNet forward"] == ("8.5", "0.2208")
    assert pinned["UNet forward+backward, full finetune"] == ("8.5", "0.5526")


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
        pytest.param(["--device", "cuda"], "--device 'cuda': no cuda device is available here", marks=NEEDS_NO_GPU),
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


def test_largest_batch_search_reports_each_probe_as_it_ends():
    settings = BenchSettings.resolve(device="cpu", quick=True)
    probes = []
    known = {batch: Measurement(1.0, None) for batch in (1, 2, 4)}
    batch, _ = _largest_batch(_FakeIteration(11), settings, known, lambda b, m: probes.append((b, m is not None)))
    assert batch == 11
    assert probes == [(8, True), (16, False), (12, False), (10, True), (11, True)]  # doubling, then bisection


# -- the GPU report (issue 14): rows under time limits, OOM as a result, saved as they go --------------------------


def _runner(tmp_path, budget=60.0, changes=None):
    log = []
    runner = RowRunner(
        tmp_path / "rows.json", {"run": "test"}, budget, torch.device("cpu"), on_change=changes, log=log.append
    )
    return runner, log


def _ok_row(name, value):
    return Row(name, lambda emit: emit({"value": value}), limit_seconds=10)


def _oom(emit):
    emit({"value": "before"})
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore detail")


def _slow(emit):
    emit({"value": "kept"})
    time.sleep(30)


def _broken(emit):
    raise ValueError("a bug in a row")


def test_row_runner_records_oom_time_limit_and_errors_as_results_and_keeps_going(tmp_path):
    saved = []
    runner, log = _runner(tmp_path, changes=lambda document: saved.append(json.dumps(document)))
    rows = [
        _ok_row("first", 1),
        Row("oom", _oom, limit_seconds=10),
        Row("slow", _slow, limit_seconds=0.3),
        Row("broken", _broken, limit_seconds=10),
        _ok_row("last", 2),
    ]
    document = runner.run(rows)
    assert json.loads((tmp_path / "rows.json").read_text()) == document
    assert json.loads(saved[-1]) == document
    by_name = {row["row"]: row for row in document["rows"]}
    assert [row["row"] for row in document["rows"]] == ["first", "oom", "slow", "broken", "last"]
    assert [row["status"] for row in document["rows"]] == [OK, OUT_OF_MEMORY, TIME_LIMIT, ERROR, OK]
    assert by_name["oom"]["message"] == "CUDA out of memory. Tried to allocate 80.00 GiB"
    assert by_name["slow"]["message"] == "ran past its 0.3 s limit" and by_name["slow"]["seconds"] < 30
    assert by_name["broken"]["message"] == "ValueError: a bug in a row"
    assert "raise ValueError" in by_name["broken"]["traceback"]
    # what a row emitted before it failed is kept
    assert [row["records"] for row in document["rows"]] == [
        [{"value": 1}],
        [{"value": "before"}],
        [{"value": "kept"}],
        [],
        [{"value": 2}],
    ]
    assert any(line.startswith("[slow] time limit after") for line in log)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left behind


def test_row_runner_caps_each_row_by_the_budget_left_and_skips_rows_it_cannot_start(tmp_path):
    runner, _ = _runner(tmp_path, budget=2.0)  # a stall of up to 1.9 s before the first row still starts it
    document = runner.run([Row("slow", _slow, limit_seconds=30, min_seconds=0.1), _ok_row("next", 1)])
    slow, skipped = document["rows"]
    assert slow["status"] == TIME_LIMIT and slow["limit_seconds"] <= 2.0
    assert skipped["status"] == SKIPPED and skipped["records"] == [] and "budget left" in skipped["message"]


def test_a_run_cut_off_from_outside_leaves_its_finished_rows_on_disk(tmp_path):
    def killed(emit):
        emit({"value": "partial"})
        raise KeyboardInterrupt  # as a signal from outside would: not a row's own failure

    runner, _ = _runner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run([_ok_row("done", 1), Row("killed", killed, limit_seconds=10), _ok_row("never", 2)])
    done, cut = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert done["status"] == OK and done["records"] == [{"value": 1}]
    assert cut["status"] == RUNNING and cut["records"] == [{"value": "partial"}]


@pytest.fixture(scope="module")
def gpu_report_on_cpu(tmp_path_factory):
    """The GPU report's every row (what ``benchmarks/gpu_report.sh`` runs), on the CPU with the reduced modules at 64²
    (numbers mean nothing); in-process, so the test pays no second import of torch."""
    out = tmp_path_factory.mktemp("gpu-report")
    argv = ["--device", "cpu", "--size", "reduced", "--resolution", "64", "--warmup", "0", "--repeats", "1"]
    # The real per-row limits and budget are for full size on a GPU; here no row may hit one however loaded the
    # machine is (on a busy 2-core machine a row once ran past its 30 s), so the test never depends on its speed.
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr(gpu_report, "LIMITS", dict.fromkeys(gpu_report.LIMITS, 24 * 3600))
        # the estimator itself is checked against a real run in tests/test_memory.py; here, where its figure goes
        patch.setattr(gpu_report, "estimate_iteration_memory", _stub_estimate)
        assert gpu_report.main([*argv, "--compile-mode", "none", "--budget", "86400", "--out", str(out)]) == 0
    return out, printed.getvalue()


def _stub_estimate(setting, gpus=(1,)):
    parts = {"weights": 3 * 2**30, "gradients": 0, "optimizer states": 2**30, "activations": setting.batch_size}
    return MemoryEstimate(setting, {1: parts | {"weights": parts["weights"] * (2 if setting.layout == "full" else 1)}})


def test_gpu_report_script_runs_the_report_from_this_checkout_offline(tmp_path):
    """The shell wrapper, with a stand-in interpreter that shows what it was given (no torch import)."""
    show = tmp_path / "show.sh"
    show.write_text('#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH HF_HUB_OFFLINE=$HF_HUB_OFFLINE args=$*"\n')
    show.chmod(0o755)
    env = os.environ | {"PYTHON": str(show), "PYTHONPATH": "/tmp/site"}
    result = subprocess.run(
        [str(BENCHMARKS / "gpu_report.sh"), "--out", "x y"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    src = BENCHMARKS.parent / "src"
    expected = (
        f"PYTHONPATH={src}:/tmp/site HF_HUB_OFFLINE=1 args=-m diffusers_di_star.benchmarking.gpu_report --out x y"
    )
    assert result.stdout == expected + "\n"


def test_gpu_report_runs_every_row_and_saves_the_records(gpu_report_on_cpu):
    out, printed = gpu_report_on_cpu
    document = json.loads((out / "gpu_report.json").read_text())
    names = [row["row"] for row in document["rows"]]
    assert names == [
        "flops",
        "static memory",
        *(f"inference {stage}, batch {b}" for stage in ("base", "fast, eager") for b in (1, 4)),
        *(
            f"training {layout}, batch {b}"
            for layout, bs in (("three-in-one", (1, 2, 4)), ("full", (1, 2)))
            for b in bs
        ),
        "computed memory",
    ]  # no compiled rows (--compile-mode none) and no largest-batch search on a CPU
    assert all(row["status"] == OK for row in document["rows"]), document["rows"]
    records = {row["row"]: row["records"] for row in document["rows"]}
    assert len(records["flops"]) == 8
    for name, variants in (("base", ["peer", "ours"]), ("fast, eager", ["floor", "fast", "fast-tiny-vae"])):
        for batch in (1, 4):
            kinds = [(r["kind"], r["variant"]) for r in records[f"inference {name}, batch {batch}"]]
            assert kinds == [("first call", v) for v in variants] + [("inference", v) for v in variants]
    training = [r for row in document["rows"] if row["row"].startswith("training") for r in row["records"]]
    assert [(r["layout"], r["batch_size"], r["fits"]) for r in training] == [
        ("three-in-one", 1, True),
        ("three-in-one", 2, True),
        ("three-in-one", 4, True),
        ("full", 1, True),
        ("full", 2, True),
    ]
    assert all(r["seconds_per_iteration"] > 0 and r["peak_memory_bytes"] is None for r in training)


def test_gpu_report_static_memory_counts_fp32_adam_and_one_roles_gradients(gpu_report_on_cpu):
    document = json.loads((gpu_report_on_cpu[0] / "gpu_report.json").read_text())
    (row,) = [row for row in document["rows"] if row["row"] == "static memory"]
    memory = {r["layout"]: r for r in row["records"]}
    unet_parameters = sum(p.numel() for p in build_unet(SIZES["reduced"], "meta", torch.float32).parameters())
    # full finetuning: generator and assistant are float32 copies of the whole UNet
    assert memory["full"]["trainable_parameters"] == 2 * unet_parameters
    for m in memory.values():
        assert m["adam_states"] == 2 * 4 * m["trainable_parameters"]  # two float32 moments
        assert m["gradients"] == 4 * m["trainable_parameters"] // 2  # one role's, both roles the same size
        assert m["total"] == m["weights"] + m["adam_states"] + m["gradients"]
    # weights: the bf16 reference once + two float32 UNets, against one bf16 UNet + float32 adapters
    lora_adapters = memory["three-in-one"]["trainable_parameters"]
    assert memory["full"]["weights"] - memory["three-in-one"]["weights"] == 2 * 4 * unet_parameters - 4 * lora_adapters


def test_gpu_report_tables_hold_the_ratios_of_the_saved_timings(gpu_report_on_cpu):
    out, printed = gpu_report_on_cpu
    report = (out / "report.md").read_text()
    document = json.loads((out / "gpu_report.json").read_text())
    assert report == gpu_report.render(document) and printed.endswith(report)  # printed at the end, too
    sections = _sections(report)
    assert [title.split(" (")[0].split(":")[0] for title in sections] == [
        "Rows",
        "FLOPs per image",
        "Static training memory",
        "Inference",
        "Training",
    ]
    (inference,) = sections["Inference"]
    ms = {(row["variant"], row["settings"], int(row["batch"])): _number(row["ms/image"]) for row in inference}
    assert len(ms) == 10
    for row in inference:
        key, batch = (row["variant"], row["settings"], int(row["batch"])), int(row["batch"])
        assert _close(_number(row["speed-up vs peer"]), ms["peer", "base", batch] / ms[key], 0.01)
        assert _close(_number(row["time ÷ floor"]), ms[key] / ms["floor", "fast, eager", batch], 0.01)
    (training,) = sections["Training: one DI* iteration"]
    static = {
        r["layout"]: r["total"] for row in document["rows"] for r in row["records"] if r["kind"] == "static memory"
    }
    for row in training:
        assert row["static (computed)"] == f"{static[row['layout']] / 2**30:.2f} GiB"
    # the estimator's peak beside the measured one, for the settings it computed (the stub: 4 or 7 GiB + batch bytes)
    computed = {(row["layout"], row["batch"]): row["peak (computed)"] for row in training}
    assert computed == {
        ("three-in-one", "1"): "4.00 GiB",
        ("three-in-one", "2"): "n/a",
        ("three-in-one", "4"): "n/a",
        ("full", "1"): "7.00 GiB",
        ("full", "2"): "n/a",
    }
    assert {row["measured ÷ computed"] for row in training} == {"n/a"}  # a CPU measures no peak


def test_gpu_report_marks_rows_that_did_not_finish():
    header = {
        "command": "c",
        "started": "s",
        "budget_seconds": 1,
        "device": "d",
        "nvidia_smi": "n",
        "software": "v",
        "size": "full",
        "resolution": 1024,
        "dtype": "float16",
        "fast_dtype": "bfloat16",
        "compile_mode": "default",
        "warmup": 2,
        "repeats": 5,
        "training_warmup": 1,
        "training_repeats": 3,
    }
    first_call = {"kind": "first call", "variant": "fast", "stage": "fast, compiled", "batch_size": 4, "seconds": 91.5}
    probes = [
        {
            "kind": "training",
            "layout": "three-in-one",
            "batch_size": b,
            "fits": fits,
            "probe": True,
            "seconds_per_iteration": 1.0 if fits else None,
            "peak_memory_bytes": 2**30 if fits else None,
        }
        for b, fits in ((8, True), (16, True))
    ]
    document = {
        "header": header,
        "rows": [
            {
                "row": "inference fast, compiled, batch 4",
                "status": TIME_LIMIT,
                "seconds": 120.0,
                "limit_seconds": 120,
                "records": [first_call],
                "message": "ran past its 120 s limit",
            },
            {"row": "largest batch", "status": TIME_LIMIT, "seconds": 45.0, "limit_seconds": 45, "records": probes},
        ],
    }
    report = gpu_report.render(document)
    (inference,) = _sections(report)["Inference"]
    assert inference == [
        {
            "variant": "fast",
            "settings": "fast, compiled",
            "batch": "4",
            "first call (s)": "91.50",
            "ms/image": "n/a",
            "images/s": "n/a",
            "peak memory": "n/a",
            "speed-up vs peer": "n/a",
            "time ÷ floor": "n/a",
        }
    ]
    assert "largest three-in-one batch seen to fit: 16; none that did not fit yet; search time limit" in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--compile-mode", "fastest"], "compile_mode must be one of"),
        (["--budget", "0"], "--budget must be positive seconds, got 0."),
        (["--resolution", "100"], "multiple of 8"),
    ],
)
def test_gpu_report_bad_options_are_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_report.main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("benchmarks/gpu_report.sh: error: ") and message in line
