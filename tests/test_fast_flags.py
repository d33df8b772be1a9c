"""A mistyped flag fails before torch, diffusers, transformers or accelerate are imported (issue 21), and the lazy
package still gives every public name; the torch-free names in ``defaults.py`` match what they stand for."""

import os
import subprocess
import sys

import pytest

import diffusers_di_star
from diffusers_di_star import defaults

SCRIPT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_di_star_sdxl.py"))
HEAVY = ("accelerate", "diffusers", "torch", "transformers")

#: Runs an entry point as `python script.py ...` / `di-star ...` would, then prints its exit status and the heavy
#: libraries it imported.
RUN_ENTRY_POINT = f"""
import runpy, sys
kind, target, *sys.argv[1:] = sys.argv[1:]
try:
    runpy.run_path(target, run_name="__main__") if kind == "script" else runpy.run_module(target, run_name="__main__")
except SystemExit as stop:
    print(stop.code, *sorted({set(HEAVY)} & set(sys.modules)))
"""


#: A hang guard for the subprocesses, not a speed check (a flag error takes well under a second).
HANG_GUARD_S = 600


def run_entry_point(cwd, kind: str, target: str, *argv: str) -> subprocess.CompletedProcess:
    """``kind`` "script": ``python target argv``; "module": ``python -m target argv``, run in ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DI_STAR_DEBUG", None)
    command = [sys.executable, "-c", RUN_ENTRY_POINT, kind, target, *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=HANG_GUARD_S)


def test_importing_the_package_loads_no_heavy_library_and_installs_the_log_filters_first():
    code = (
        "import logging, sys; import diffusers_di_star, diffusers_di_star.training.config, diffusers_di_star.cli; "
        f"print(sorted({set(HEAVY)} & set(sys.modules)), "
        "[len(logging.getLogger(name).filters) for name in diffusers_di_star.quiet.SILENCED])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[] [1, 1]\n"


def test_the_lazy_package_gives_every_public_name():
    from diffusers_di_star import DIStarSDXLPipeline
    from diffusers_di_star.pipeline_di_star_sdxl import DIStarSDXLPipeline as defined
    from diffusers_di_star.training import DIStarConfig, checkpointing, generator_loss

    assert DIStarSDXLPipeline is defined
    assert diffusers_di_star.__version__ == "0.1.0.dev0"
    assert diffusers_di_star.__all__ == [
        "DEFAULT_CONDITIONING_TIMESTEP", "DIStarFluxPipeline", "DIStarSD3Pipeline", "DIStarSDPipeline",
        "DIStarSDXLPipeline", "DIStarSDXLPipelineOutput", "RewardModel", "decode_latents", "generate_x0",
        "load_generator_unet", "load_reward",
    ]  # fmt: skip
    assert set(diffusers_di_star.__all__) <= set(dir(diffusers_di_star))
    namespace = {}
    exec("from diffusers_di_star import *", namespace)
    assert set(diffusers_di_star.__all__) <= set(namespace) and namespace["DEFAULT_CONDITIONING_TIMESTEP"] == 399
    assert DIStarConfig().weighting == "sigma" and callable(generator_loss) and checkpointing.check_run_folder
    with pytest.raises(AttributeError, match="has no attribute 'DIStarPipeline'"):
        diffusers_di_star.DIStarPipeline  # noqa: B018


def test_the_flag_names_match_the_tables_they_name():
    import torch
    from diffusers.optimization import SchedulerType
    from test_training_script import load_script

    from diffusers_di_star import losses
    from diffusers_di_star.weights import DTYPES

    assert tuple(losses.TIME_WEIGHTINGS) == defaults.TIME_WEIGHTING_NAMES
    y = torch.ones(1, 1, 2, 2)
    assert [losses.score_distance(y, name, huber_c=1.0).item() for name in defaults.DISTANCES] == [
        pytest.approx(5**0.5 - 1),
        4.0,
    ]
    assert tuple(DTYPES) == defaults.DTYPE_NAMES and DTYPES["bf16"] is torch.bfloat16
    schedulers = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
    assert load_script().LR_SCHEDULERS == schedulers


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "train_di_star_sdxl.py: error: --seed must be in [0, 2**32), got -1."),
        (["--guidance_scale", "0.5"], "train_di_star_sdxl.py: error: `guidance_scale` must be >= 1 (1 = no "),
        (["--output_dir", SCRIPT], "train_di_star_sdxl.py: error: --output_dir "),
        (["--lr_scheduler", "cosin"], "train_di_star_sdxl.py: error: argument --lr_scheduler: invalid choice:"),
    ],
)
def test_a_bad_trainer_flag_fails_before_the_heavy_imports(argv, message, tmp_path):
    model = ["--pretrained_model_name_or_path", "x", "--report_to", "none"]
    result = run_entry_point(tmp_path, "script", SCRIPT, *model, *argv)
    assert result.stdout == "2\n", (result.stdout, result.stderr)  # exit 2, none of HEAVY imported
    assert result.stderr.splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_trainer_help_needs_no_heavy_library(tmp_path):
    result = run_entry_point(tmp_path, "script", SCRIPT, "--help")
    assert result.stdout.splitlines()[-1] == "0" and "--lr_scheduler" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "a", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1."),
        (["demo", "--out", SCRIPT], "is a file; pass a folder"),
        (["export", "--model", "m", "--format", "kohya-lora", "--out", "o.safetensors", "--lora-alpha", "0"],
         "--lora-alpha must be > 0"),
        (["eval", "--model", "m", "--prompts", "parti", "--out", "o", "--batch-size", "0"],
         "--batch-size must be in [1, 256], got 0."),
        (["bench", "--repeats", "0"], "--repeats must be >= 1, got 0."),
        (["serve", "--port", "70000"], "--port must be in [0, 65535], got 70000."),
    ],
)  # fmt: skip
def test_a_bad_di_star_flag_fails_before_the_heavy_imports(argv, message, tmp_path):
    result = run_entry_point(tmp_path, "module", "diffusers_di_star.cli", *argv)
    assert result.stdout == "2\n", (result.stdout, result.stderr)  # exit 2, none of HEAVY imported
    assert result.stderr.startswith(f"di-star {argv[0]}: error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
