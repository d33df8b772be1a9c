#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in ONE command that ends within 8 minutes by construction: FLOPs and static
# training memory (meta device), inference at 1024² (peer, ours, fast, fast-tiny-vae, floor; batch 1 and 4) and
# training at 1024² (three-in-one LoRA batch 1, 2, 4 and the largest that fits; full finetuning batch 1, 2).
#
#   benchmarks/gpu_report.sh                      # writes $OUT/report.md and $OUT/gpu_report.json (else ./gpu-report)
#   benchmarks/gpu_report.sh --out results/gpu   # or anywhere; --help lists every option
#   benchmarks/gpu_report.sh --device cpu --size reduced --resolution 64   # the code path on a CPU (the test suite)
#
# Nothing is downloaded (random-weight SDXL from the shipped configs, HF_HUB_OFFLINE=1). The package is taken from
# this checkout's src/, ahead of any PYTHONPATH you set (for wheels installed with pip --target: docs/benchmarks.md).
# The Python process keeps its rows to --budget (420 s by default: per-row time limits, rows skipped when the budget is
# spent); `timeout` kills it at GPU_REPORT_HARD_LIMIT seconds (480) should it overrun, and the files it has written
# by then stay. PYTHON picks the interpreter (default python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="${root}/src${PYTHONPATH:+:${PYTHONPATH}}"
exec timeout --kill-after=10 "${GPU_REPORT_HARD_LIMIT:-480}" "${PYTHON:-python3}" \
    -m diffusers_di_star.benchmarking.gpu_report "$@"
