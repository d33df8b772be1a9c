"""The GPU report (issue 14): every GPU figure docs/benchmarks.md owes, in ONE command that ends within a budget.

``benchmarks/gpu_report.sh`` runs ``python -m diffusers_di_star.benchmarking.gpu_report``. It reuses the suites'
code (:mod:`.flops`, :mod:`.memory`, :mod:`.inference`, :mod:`.training`) as rows of a :class:`~.rows.RowRunner`:
each row has a time limit, an out-of-memory error is a result, and ``gpu_report.json`` and ``report.md`` under
``--out`` are rewritten as each record lands. Rows, the cheap and needed ones first, the open-ended ones last:

1. FLOPs of the modules and the static training memory of the LoRA and full layouts (both on the meta device);
2. inference at batch 1 and 4: ``peer`` and ``ours`` in the base dtype; then, on the same modules switched in place
   to the fast settings but not compiled, ``floor``, ``fast`` and ``fast-tiny-vae``; then the same compiled, batch 1;
3. training: three-in-one LoRA at batch 1, 2, 4 and the largest LoRA batch that fits (CUDA only; doubling then
   bisection, cut by its time limit, keeping the probes it finished); full finetuning at batch 1, 2; peak memory each;
4. the computed peak memory (:func:`~.memory.estimate_iteration_memory`, fake tensors on the host CPU) of the
   three-in-one and full rows at batch 1, shown beside their measured peaks;
5. the compiled rows at batch 4 (a second compilation, since shapes are static), with what is left of the budget.

Each inference row records its first (cold) call apart, since compilation happens there. Going from inference to
training (or back) frees every module of the other phase, so each peak-memory figure holds its own phase's modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ..weights import DTYPES
from . import inference
from .components import build_pickscore_reward, build_text_encoders, build_vae
from .flops import _DESCRIPTIONS, DOCUMENTED_TFLOP, count_flops
from .measure import Measurement, describe_device, free_memory, software_versions
from .memory import MemorySetting, estimate_iteration_memory, static_training_memory
from .report import NOT_AVAILABLE, format_memory, format_ratio, markdown_table
from .rows import ERROR, OK, Row, RowRunner
from .runner import _quiet
from .settings import BenchSettings
from .training import DIStarIteration, _config, _largest_batch, _try_measure, build_networks

__all__ = ["DEFAULT_BUDGET_SECONDS", "LIMITS", "GpuReport", "main", "render"]

#: The rows' budget (s), counted from the first row: with the imports before it (10-15 s on a CPU here) and the last
#: row's exit after it (seconds), the run ends within 8 minutes; benchmarks/gpu_report.sh kills it at 480 s if not.
DEFAULT_BUDGET_SECONDS = 420
DEFAULT_COMPILE_MODE = "default"
LORA, FULL = "three-in-one", "full"
#: Full finetuning (two float32 UNets with AdamW) at the batch DMD2 trains with per GPU, and one below.
FULL_BATCH_SIZES = (1, 2)
BASE, EAGER, COMPILED = "base", "fast, eager", "fast, compiled"
_STAGES = (BASE, EAGER, COMPILED)
#: Training timing: an iteration at 1024² takes about a second, and the figure that matters there is peak memory.
TRAINING_WARMUP, TRAINING_REPEATS = 1, 3
#: Per-row time limits (s) at full size on one GPU; docs/benchmarks.md gives the reasoning behind each.
LIMITS = {
    "flops": 60,
    "static memory": 60,
    "inference base": 45,
    "inference eager": 30,
    "inference compiled": 180,
    "training": 60,
    "largest batch": 45,
    "computed memory": 240,
}
#: The training rows whose peak memory the estimator computes beside the measurement (``computed memory`` row).
COMPUTED_SETTINGS = ((LORA, 1), (FULL, 1))


class GpuReport:
    """The rows of the report and the modules they share; one phase (inference or training) is resident at a time."""

    def __init__(self, settings: BenchSettings):
        self.settings = settings
        self.training_settings = dataclasses.replace(
            settings, warmup=min(settings.warmup, TRAINING_WARMUP), repeats=min(settings.repeats, TRAINING_REPEATS)
        )
        self._stage = self._pipes = self._fast = self._layout = self._iteration = self._shared = None
        self._lora_measured: dict[int, Measurement | None] = {}

    def _release(self, keep_shared: bool = False) -> None:
        shared = self._shared if keep_shared else None
        self._stage = self._pipes = self._fast = self._layout = self._iteration = self._shared = None
        torch._dynamo.reset()  # compiled graphs (and CUDA graph pools) keep their modules alive
        free_memory(self.settings.device)
        self._shared = shared

    def _inference_calls(self, stage: str) -> dict[str, Callable[[int], object]]:
        s = self.settings
        if self._stage is None or _STAGES.index(self._stage) > _STAGES.index(stage):  # the switch is in place
            self._release()
            self._pipes, self._stage = inference.build_pipelines(s), BASE
        if stage != BASE and self._stage == BASE:
            self._fast, self._stage = inference.switch_to_fast(self._pipes, s), EAGER
        if stage == COMPILED and self._stage == EAGER:
            inference.compile_pipelines(self._fast, s.compile_mode)
            self._stage = COMPILED
        if stage == BASE:
            return inference.base_calls(self._pipes, s, (inference.PEER, inference.OURS))
        return inference.fast_calls(self._fast, s)

    def _training_iteration(self, layout: str) -> DIStarIteration:
        s = self.training_settings
        if self._layout != layout:
            self._release(keep_shared=True)  # the text encoders, VAE and reward serve both layouts
            if self._shared is None:
                vae = build_vae(s.size, s.device, torch.bfloat16, s.seed)
                vae.enable_gradient_checkpointing()
                reward = build_pickscore_reward(s.size, s.device, s.seed) if s.reward else None
                self._shared = (build_text_encoders(s.size, s.device, torch.bfloat16, s.seed), vae, reward)
            config = _config(s)
            self._iteration = DIStarIteration(build_networks(layout, config, s), config, *self._shared, s)
            self._layout = layout
        self._iteration.reset()  # a row cut off between a backward and its optimiser step leaves gradients behind
        return self._iteration

    def _flops(self, emit) -> None:
        for module, (parameters, flops) in count_flops(self.settings).items():
            emit({"kind": "flops", "module": module, "parameters": parameters, "flops": flops})

    def _static_memory(self, emit) -> None:
        for layout in (LORA, FULL):
            emit({"kind": "static memory", "layout": layout} | static_training_memory(layout, self.training_settings))

    def _inference_row(self, stage: str, batch_size: int):
        def run(emit) -> None:
            calls = self._inference_calls(stage)
            for variant, call in calls.items():  # each variant's first call: compilation happens here
                start = time.perf_counter()
                call(batch_size)
                if self.settings.device.type == "cuda":
                    torch.cuda.synchronize(self.settings.device)
                seconds = time.perf_counter() - start
                emit(
                    {
                        "kind": "first call",
                        "variant": variant,
                        "stage": stage,
                        "batch_size": batch_size,
                        "seconds": seconds,
                    }
                )
            for result in inference.measure_variants(calls, self.settings, (batch_size,)):
                emit({"kind": "inference", "stage": stage} | inference.result_record(result, None, None))

        return run

    def _training_row(self, layout: str, batch_size: int):
        def run(emit) -> None:
            s = self.training_settings
            measurement = _try_measure(self._training_iteration(layout), batch_size, s, s.warmup, s.repeats)
            if layout == LORA:
                self._lora_measured[batch_size] = measurement
            emit(_training_record(layout, batch_size, measurement))

        return run

    def _largest_batch(self, emit) -> None:
        def on_probe(batch_size: int, measurement: Measurement | None) -> None:
            emit(_training_record(LORA, batch_size, measurement) | {"probe": True})

        _largest_batch(self._training_iteration(LORA), self.training_settings, self._lora_measured, on_probe)

    def _computed_memory(self, emit) -> None:
        s = self.training_settings
        for layout, batch_size in COMPUTED_SETTINGS:
            setting = MemorySetting(layout, batch_size, s.resolution, reward=s.reward, size=s.size)
            estimate = estimate_iteration_memory(setting)
            record = {"kind": "computed memory", "layout": layout, "batch_size": batch_size}
            emit(record | {"peak_bytes": estimate.peak()} | estimate.per_gpu[1])

    def rows(self) -> list[Row]:
        """Every row, in running order (see the module docstring)."""
        s = self.settings
        rows = [
            Row("flops", self._flops, LIMITS["flops"]),
            Row("static memory", self._static_memory, LIMITS["static memory"]),
        ]
        for stage, limit in ((BASE, "inference base"), (EAGER, "inference eager")):
            rows += [
                Row(f"inference {stage}, batch {b}", self._inference_row(stage, b), LIMITS[limit])
                for b in s.inference_batch_sizes
            ]
        compiled = []
        if s.compile_mode is not None:
            compiled = [
                Row(f"inference {COMPILED}, batch {b}", self._inference_row(COMPILED, b), LIMITS["inference compiled"])
                for b in s.inference_batch_sizes
            ]
        rows += compiled[:1]
        for layout, batches in ((LORA, s.training_batch_sizes), (FULL, FULL_BATCH_SIZES)):
            rows += [
                Row(f"training {layout}, batch {b}", self._training_row(layout, b), LIMITS["training"])
                for b in batches
            ]
            if layout == LORA and s.device.type == "cuda":  # while the LoRA networks are resident
                rows.append(Row("largest batch", self._largest_batch, LIMITS["largest batch"]))
        rows.append(Row("computed memory", self._computed_memory, LIMITS["computed memory"]))
        return rows + compiled[1:]


def _training_record(layout: str, batch_size: int, measurement: Measurement | None) -> dict:
    fits = measurement is not None
    return {
        "kind": "training",
        "layout": layout,
        "batch_size": batch_size,
        "fits": fits,
        "seconds_per_iteration": measurement.seconds if fits else None,
        "peak_memory_bytes": measurement.peak_memory if fits else None,
    }


# -- the report ------------------------------------------------------------------------------------------------------


def _records(document: dict, kind: str) -> list[dict]:
    return [record for row in document["rows"] for record in row["records"] if record.get("kind") == kind]


def _gib(num_bytes: int | None) -> str:
    return format_memory(num_bytes)


def _rows_table(document: dict) -> str:
    rows = []
    for row in document["rows"]:
        limit = NOT_AVAILABLE if row["limit_seconds"] is None else f"{row['limit_seconds']:.0f}"
        rows.append((row["row"], row["status"], f"{row['seconds']:.1f}", limit, row.get("message", "")))
    return markdown_table(("row", "status", "seconds", "limit (s)", "note"), rows)


def _flops_table(records: list[dict], full_size_1024: bool) -> str:
    unit, scale = ("TFLOP", 1e12) if full_size_1024 else ("GFLOP", 1e9)
    rows = []
    for r in records:
        documented = f"{DOCUMENTED_TFLOP[r['module']]:g}" if full_size_1024 else NOT_AVAILABLE
        rows.append(
            (_DESCRIPTIONS[r["module"]], f"{r['parameters'] / 1e6:.1f}", f"{r['flops'] / scale:.4g}", documented)
        )
    return markdown_table(("module", "parameters (M)", f"{unit} per image", "docs/benchmarks.md (TFLOP)"), rows)


def _memory_table(records: list[dict]) -> str:
    rows = [
        (
            r["layout"],
            _gib(r["weights"]),
            _gib(r["adam_states"]),
            _gib(r["gradients"]),
            _gib(r["total"]),
            f"{r['trainable_parameters'] / 1e6:.1f}",
        )
        for r in records
    ]
    headers = ("layout", "weights", "AdamW states", "gradients (one role)", "static total", "trainable (M)")
    return markdown_table(headers, rows)


def _inference_table(document: dict) -> str:
    measured = {(r["stage"], r["variant"], r["batch_size"]): r for r in _records(document, "inference")}
    first = {(r["stage"], r["variant"], r["batch_size"]): r["seconds"] for r in _records(document, "first call")}

    def per_image(key):
        return None if key not in measured else measured[key]["ms_per_image"]

    rows = []
    for stage, variant, batch in first:
        key, record = (stage, variant, batch), measured.get((stage, variant, batch))
        floor_stage = COMPILED if stage == COMPILED else EAGER  # the base rows are compared with the eager floor
        peer, floor = per_image((BASE, inference.PEER, batch)), per_image((floor_stage, inference.FLOOR, batch))
        if record is None:  # cut off between the first call and the timed ones
            rows.append((variant, stage, batch, f"{first[key]:.2f}") + (NOT_AVAILABLE,) * 5)
            continue
        ms = record["ms_per_image"]
        rows.append(
            (
                variant,
                stage,
                batch,
                f"{first[key]:.2f}",
                f"{ms:.1f}",
                f"{record['images_per_second']:.2f}",
                _gib(record["peak_memory_bytes"]),
                format_ratio(peer and peer / ms),
                format_ratio(floor and ms / floor),
            )
        )
    headers = ("variant", "settings", "batch", "first call (s)", "ms/image", "images/s", "peak memory")
    return markdown_table(headers + ("speed-up vs peer", "time ÷ floor"), rows)


def _training_table(document: dict) -> str:
    static = {r["layout"]: r["total"] for r in _records(document, "static memory")}
    computed = {(r["layout"], r["batch_size"]): r["peak_bytes"] for r in _records(document, "computed memory")}
    rows = []
    for r in _records(document, "training"):
        batch, peak, kind = r["batch_size"], r["peak_memory_bytes"], "probe" if r.get("probe") else "measured"
        estimate = computed.get((r["layout"], batch))
        if not r["fits"]:
            row = (r["layout"], batch, kind, "OOM", "OOM", "OOM", _gib(static.get(r["layout"])), NOT_AVAILABLE)
            rows.append(row + (_gib(estimate), NOT_AVAILABLE))
            continue
        seconds = r["seconds_per_iteration"]
        above = None if peak is None or r["layout"] not in static else peak - static[r["layout"]]
        rows.append(
            (
                r["layout"],
                batch,
                kind,
                f"{seconds:.3f}",
                f"{seconds / batch:.3f}",
                _gib(peak),
                _gib(static.get(r["layout"])),
                _gib(above),
                _gib(estimate),
                format_ratio(None if peak is None or estimate is None else peak / estimate),
            )
        )
    headers = ("layout", "batch", "run", "s/iteration", "s/image", "peak memory", "static (computed)")
    return markdown_table(headers + ("peak − static", "peak (computed)", "measured ÷ computed"), rows)


def _largest_line(document: dict) -> str | None:
    row = next((row for row in document["rows"] if row["row"] == "largest batch"), None)
    if row is None:
        return None
    lora = [r for r in _records(document, "training") if r["layout"] == LORA]
    fit = [r["batch_size"] for r in lora if r["fits"]]
    failed = [r["batch_size"] for r in lora if not r["fits"]]
    largest = max(fit, default=0)
    smallest_failed = min((b for b in failed if b > largest), default=None)
    if row["status"] == OK:
        return f"largest three-in-one batch that fits: {largest} (search complete: doubling, then bisection)"
    bound = "none that did not fit yet" if smallest_failed is None else f"{smallest_failed} did not fit"
    return f"largest three-in-one batch seen to fit: {largest}; {bound}; search {row['status']}"


def render(document: dict) -> str:
    """The Markdown report of a (possibly partial) run's document."""
    h = document["header"]
    lines = [
        "## GPU report",
        "",
        f"- command: `{h['command']}`, started {h['started']}, budget {h['budget_seconds']:.0f} s",
        f"- device: {h['device']}; nvidia-smi: {h['nvidia_smi']}",
        f"- software: {h['software']}",
        f"- modules: SDXL `{h['size']}` size, random weights, {h['resolution']}², base dtype {h['dtype']}, fast dtype "
        f"{h['fast_dtype']}, compile mode {h['compile_mode']}; inference: median of {h['repeats']} timed calls after "
        f"{h['warmup']} warm-up (after the first call); training: {h['training_repeats']} after "
        f"{h['training_warmup']}",
        "",
        "### Rows",
        "",
        _rows_table(document),
    ]
    sections = [
        (
            "FLOPs per image (meta device)",
            _records(document, "flops"),
            lambda r: _flops_table(r, h["size"] == "full" and h["resolution"] == 1024),
        ),
        (
            "Static training memory (computed on the meta device; activations not included)",
            _records(document, "static memory"),
            _memory_table,
        ),
        ("Inference", _records(document, "first call"), lambda r: _inference_table(document)),
        ("Training: one DI* iteration", _records(document, "training"), lambda r: _training_table(document)),
    ]
    for title, records, table in sections:
        if records:
            lines += ["", f"### {title}", "", table(records)]
    largest = _largest_line(document)
    if largest:
        lines += ["", f"- {largest}"]
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------------------------------------


def _nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "not installed"
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"failed ({type(err).__name__})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu_report.sh",
        description="Every GPU figure of docs/benchmarks.md in one run that ends within --budget seconds: FLOPs, "
        "static training memory, inference (peer, ours, fast, fast-tiny-vae, floor; batch 1 and 4) and training "
        "(three-in-one LoRA batch 1, 2, 4 and the largest that fits; full finetuning batch 1, 2). Writes report.md "
        "and gpu_report.json under --out as each result lands. Nothing is downloaded.",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-report", help="default: $OUT, else ./gpu-report")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--size", choices=("full", "reduced"), default=None, help="default: full on CUDA, reduced on CPU")
    p.add_argument("--resolution", type=int, default=None, help="default: 1024 (full), 256 (reduced)")
    p.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_SECONDS, help=f"seconds (default {DEFAULT_BUDGET_SECONDS})"
    )
    p.add_argument(
        "--compile-mode",
        default=DEFAULT_COMPILE_MODE,
        help=f"torch.compile mode of the fast rows, or none (default {DEFAULT_COMPILE_MODE!r})",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 2 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed inference calls (default 5; training: at most 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="peer/ours weights (fp16 CUDA, fp32 CPU)")
    p.add_argument("--no-reward", dest="reward", action="store_false", default=None, help="train without PickScore")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the report; return 0 when every row ran (out of memory and time limits are results) and 1 if a row
    raised. Bad options exit with status 2 and one line on stderr."""
    parser = _parser()
    args = parser.parse_args(argv)
    options = {
        "size": args.size,
        "resolution": args.resolution,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "dtype": args.dtype and DTYPES[args.dtype],
        "compile_mode": args.compile_mode,
        "reward": args.reward,
        "find_largest_batch": False,  # the report's own row searches it, under a time limit
        "layouts": (LORA, FULL),
    }
    try:
        if args.budget <= 0:
            raise ValueError(f"--budget must be positive seconds, got {args.budget:g}.")
        settings = BenchSettings.resolve(device=args.device, **options)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    os.makedirs(args.out, exist_ok=True)
    report = GpuReport(settings)
    header = {
        "command": shlex.join([parser.prog, *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": describe_device(settings.device),
        "nvidia_smi": _nvidia_smi(),
        "software": software_versions(),
        "size": settings.size.name,
        "resolution": settings.resolution,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "fast_dtype": str(settings.fast_dtype).removeprefix("torch."),
        "compile_mode": settings.compile_mode or "none",
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "training_warmup": report.training_settings.warmup,
        "training_repeats": report.training_settings.repeats,
    }
    report_path = os.path.join(args.out, "report.md")

    def write_report(document: dict) -> None:
        temporary = f"{report_path}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(render(document))
        os.replace(temporary, report_path)

    runner = RowRunner(
        os.path.join(args.out, "gpu_report.json"),
        header,
        args.budget,
        settings.device,
        on_change=write_report,
        log=lambda line: print(line, flush=True),
    )
    with _quiet():
        document = runner.run(report.rows())
    print(render(document), end="", flush=True)
    return 1 if any(row["status"] == ERROR for row in document["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
