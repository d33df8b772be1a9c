#!/usr/bin/env python
# Copyright 2026 The diffusers-di-star authors. Licensed under the Apache License, Version 2.0.
"""Diff-Instruct* (DI*) post-training of a one-step SDXL generator, LoRA or full, with accelerate.

The math and the model setup live in ``diffusers_di_star.training`` (tested there); this script owns the command
line, the accelerate loop, logging, checkpoints and the final export. See ``docs/training.md`` and
``examples/README.md`` for recipes, e.g.::

    accelerate launch examples/train_di_star_sdxl.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_generator tianweiy/DMD2 --pretrained_generator_weight_name dmd2_sdxl_1step_unet_fp16.bin \\
        --train_data_file prompts.txt --reward pickscore --reward_scale 100 --output_dir di-star-sdxl
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

# First: importing the package installs its log filters (quiet.py) before diffusers imports transformers.
import diffusers_di_star  # noqa: F401

# isort: split
# The flags are parsed and checked with these torch-free modules; torch, diffusers and accelerate are imported below,
# after the check: a mistyped flag fails in about a second (docs/training.md).
from diffusers_di_star.defaults import DEFAULT_CONDITIONING_TIMESTEP, DEFAULT_LORA_TARGET_MODULES, TRAINED_ROLES
from diffusers_di_star.errors import DIStarError, ModelLoadError, is_disk_full
from diffusers_di_star.hub import VALIDATION_GRID, create_hub_repo, push_folder, write_model_card
from diffusers_di_star.sources import local_path_problem, reward_load_failure, reward_option_problem
from diffusers_di_star.training.checkpointing import (
    CheckpointWriteError,
    check_run_folder,
    checkpoint_dirs,
    load_checkpoint,
    on_main_process,
    resolve_resume,
    save_checkpoint,
)
from diffusers_di_star.training.config import DIStarConfig, add_config_arguments
from diffusers_di_star.training.resume import check_step_bound, resume_settings
from diffusers_di_star.training.run_folder import acquire_run_lock, check_process_group, clear_previous_run
from diffusers_di_star.training.signals import EXIT_TERMINATED, StopRequest

#: diffusers' schedules (``diffusers.optimization.SchedulerType``, named here so the flag is checked before diffusers
#: loads; a test keeps them equal) that need nothing beyond warm-up and length (piecewise_constant needs step rules).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
#: The flags that only mean something with --use_lora.
LORA_FLAGS = ("rank",) + tuple(
    f"{role}_lora_{key}" for role in TRAINED_ROLES for key in ("rank", "alpha", "target_modules")
)
MIN_VALUES = {
    "train_batch_size": 1,
    "max_train_steps": 1,
    "num_train_epochs": 1,
    "gradient_accumulation_steps": 1,
    "checkpointing_steps": 1,
    "checkpoints_total_limit": 1,
    "validation_steps": 1,
    "max_skipped_steps": 1,
    "lr_warmup_steps": 0,
    "adam_weight_decay": 0,
    "adam_epsilon": 0,
    "max_grad_norm": 0,
    "rank": 1,
}
#: Exclusive bounds.
OPEN_RANGES = {"learning_rate": (0, math.inf), "assistant_learning_rate": (0, math.inf), "ema_decay": (0, 1)}
#: The DIStarConfig fields that are flags as they are (the LoRA ones are resolved from --rank in check_args;
#: conditioning_timestep is a family's default, resolved in check_models).
CONFIG_FLAGS = (
    "reward_scale", "cfg_mode", "guidance_scale", "cfg_reward_scale", "divergence", "huber_c", "weighting",
    "min_timestep", "max_timestep", "assistant_updates_per_step", "resolution",
)  # fmt: skip
LORA_RANK_DEFAULT = DIStarConfig.generator_lora_rank
T = TypeVar("T")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    models = parser.add_argument_group("models")
    models.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The reference model (Hub id or Diffusers folder); its family (SDXL, SD1.5/2.x, ...) is read from its "
        "model_index.json.",
    )
    models.add_argument("--pretrained_vae_model_name_or_path", default=None, help="e.g. madebyollin/sdxl-vae-fp16-fix")
    models.add_argument("--revision", default=None)
    models.add_argument("--variant", default=None, help="e.g. fp16")
    models.add_argument(
        "--pretrained_generator",
        default=None,
        help="Generator init UNet (DMD2 / DI*): Hub id or folder (UNet or pipeline layout), or a local weights file "
        "(.safetensors, single-file, or DMD2's .bin via weights_only=True). Default: the reference UNet.",
    )
    models.add_argument(
        "--pretrained_generator_weight_name",
        default=None,
        help="One file inside --pretrained_generator, e.g. dmd2_sdxl_1step_unet_fp16.bin for tianweiy/DMD2.",
    )
    models.add_argument(
        "--conditioning_timestep",
        type=timestep_number,
        default=None,
        help="t* of the one-step map. Default: the family's (SDXL, SD: 399; SD3, FLUX: the flow time σ* = 1.0).",
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of full UNets.")
    lora.add_argument("--rank", type=int, default=None, help="Both LoRA ranks (Diffusers' examples' flag).")
    for role in TRAINED_ROLES:
        lora.add_argument(
            f"--{role}_lora_rank", type=int, default=None, help=f"Default: --rank, else {LORA_RANK_DEFAULT}."
        )
        lora.add_argument(f"--{role}_lora_alpha", type=float, default=None, help="Default: the rank (scale 1).")
        lora.add_argument(
            f"--{role}_lora_target_modules",
            default=None,
            help="Comma separated, matched as peft does. Default: the model family's (SD/SDXL: "
            f"{','.join(DEFAULT_LORA_TARGET_MODULES)}; SD3: also the text stream's add_*_proj and to_add_out; "
            "FLUX: also the feed-forward layers).",
        )

    di_star = parser.add_argument_group("DI* objective")
    di_star.add_argument(
        "--reward", default="pickscore", help="Reward spec, e.g. 'pickscore' or 'pickscore:1,hpsv2:1'."
    )
    di_star.add_argument(
        "--reward_option",
        "--reward-option",
        action="append",
        default=[],
        metavar="NAME.OPTION=VALUE",
        help="A reward loader option, e.g. pickscore.model=/ckpt/PickScore_v1 for a local copy (as `di-star eval`).",
    )
    # The DI* settings, with the defaults, choices and descriptions of DIStarConfig (one set for both).
    add_config_arguments(di_star, CONFIG_FLAGS)
    di_star.add_argument("--assistant_learning_rate", type=float, default=None, help="Default: --learning_rate.")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=None, help="Hub dataset of prompts, or a `save_to_disk` folder.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument(
        "--train_data_file", default=None, help="Local .txt (one prompt a line) / .csv / .json / .parquet."
    )
    data.add_argument(
        "--prompt_column", "--caption_column", default=None, help="Default: 'text' for .txt, 'prompt' otherwise."
    )
    data.add_argument("--cache_dir", default=None)
    data.add_argument(
        "--precompute_prompt_embeddings",
        action="store_true",
        help="Encode every prompt once before training (--output_dir/prompt_embeddings.safetensors, reused on resume) "
        "and keep the text encoders on the CPU while training (e.g. SD3's T5-XXL).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="di-star-sdxl")
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds another run: what that run wrote is removed (checkpoints, "
        "weights, images, logs, model card); other files stay.",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=1, help="Per device.")
    train.add_argument("--max_train_steps", type=int, default=None, help="Default: 1000 (or from --num_train_epochs).")
    train.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help="Instead of --max_train_steps: passes over the prompts (steps = epochs × ⌈prompts / prompts per step⌉).",
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-5)
    train.add_argument("--scale_lr", action="store_true", help="lr × accumulation × batch size × processes.")
    train.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--use_8bit_adam", action="store_true")
    train.add_argument("--adam_beta1", type=float, default=0.0, help="DMD2 uses β1 = 0 for both networks.")
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument(
        "--max_skipped_steps", type=int, default=10, help="Stop after this many non-finite steps in a row."
    )
    train.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator; the output uses it.")
    train.add_argument("--ema_decay", type=float, default=0.999)
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    logs = parser.add_argument_group("logging, checkpoints, validation")
    logs.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    logs.add_argument("--logging_dir", default="logs")
    logs.add_argument("--checkpointing_steps", type=int, default=500)
    logs.add_argument("--checkpoints_total_limit", type=int, default=None)
    logs.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder or 'latest'.")
    logs.add_argument(
        "--allow_model_change",
        action="store_true",
        help="Resume although a model path names other configs than the checkpoint's (e.g. a re-downloaded copy).",
    )
    logs.add_argument("--validation_prompts", nargs="*", default=None)
    logs.add_argument(
        "--validation_prompt", action="append", default=None, help="One validation prompt (repeatable; Diffusers)."
    )
    logs.add_argument("--validation_steps", type=int, default=500)

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None)
    hub.add_argument("--hub_token", default=None, help="Prefer `hf auth login`: the token is never logged or saved.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error (or DI_STAR_DEBUG=1).")

    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Flag errors that need no model, and the defaults that depend on other flags: before anything heavy loads."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}.")
    for name, low in MIN_VALUES.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}.")
    for name, (low, high) in OPEN_RANGES.items():
        if getattr(args, name) is not None and not low < getattr(args, name) < high:
            raise ValueError(f"--{name} must be in ({low}, {high}), got {getattr(args, name)}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}.")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}.")
    if args.max_train_steps is not None and args.num_train_epochs is not None:
        raise ValueError("--max_train_steps and --num_train_epochs both set the run's length: pass one.")
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.max_train_steps = 1000
    lora_flags = [f"--{name}" for name in LORA_FLAGS if getattr(args, name) is not None]
    if lora_flags and not args.use_lora:
        raise ValueError(
            f"{', '.join(lora_flags)} only apply to LoRA training: add --use_lora, or drop them for a full finetune."
        )
    for role in TRAINED_ROLES:
        rank = getattr(args, f"{role}_lora_rank") or args.rank or LORA_RANK_DEFAULT
        setattr(args, f"{role}_lora_rank", rank)
        setattr(args, f"{role}_lora_alpha", getattr(args, f"{role}_lora_alpha") or float(rank))
    args.validation_prompts = [*(args.validation_prompts or ()), *(args.validation_prompt or ())] or None
    args.reward_options = parse_reward_options(args.reward_option)
    if problem := reward_option_problem(args.reward_options, "--reward_option"):
        raise ValueError(problem)
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError("--overwrite_output_dir starts a new run, --resume_from_checkpoint continues one: pass one.")
    check_run_folder(args.output_dir, args.resume_from_checkpoint is not None, args.overwrite_output_dir)
    if args.hub_token is not None and args.report_to == "wandb":
        raise ValueError("--hub_token with --report_to=wandb would expose the token; use `hf auth login` instead.")
    if args.report_to in ("tensorboard", "wandb") and importlib.util.find_spec(args.report_to) is None:
        raise ValueError(
            f"--report_to {args.report_to} needs the {args.report_to} package: `pip install {args.report_to}` "
            "(tensorboard comes with diffusers-di-star[train]), or pass --report_to none."
        )
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ValueError("--enable_xformers_memory_efficient_attention: install diffusers-di-star[xformers].")
    make_config(args)


def timestep_number(text: str) -> int | float:
    """An integer timestep (VP: 399) or a flow time (SD3: 1.0), as typed."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_reward_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``--reward_option NAME.OPTION=VALUE`` items as loader options, parsed as ``di-star eval`` parses them."""
    from diffusers_di_star.cli import CLIError, _parse_reward_options

    try:
        return _parse_reward_options(items)
    except CLIError as error:
        raise ValueError(str(error).replace("--reward-option", "--reward_option")) from None


def make_config(args: argparse.Namespace) -> DIStarConfig:
    lora = {f"{r}_lora_{key}": getattr(args, f"{r}_lora_{key}") for r in TRAINED_ROLES for key in ("rank", "alpha")}
    # Target modules: as given, else the family's (resolve_family_defaults), else DIStarConfig's until it has run.
    modules = {
        name: [m.strip() for m in getattr(args, name).split(",") if m.strip()]
        for name in (f"{role}_lora_target_modules" for role in TRAINED_ROLES)
        if getattr(args, name) is not None
    }
    return DIStarConfig(
        **{name: getattr(args, name) for name in CONFIG_FLAGS},
        conditioning_timestep=(
            DEFAULT_CONDITIONING_TIMESTEP if args.conditioning_timestep is None else args.conditioning_timestep
        ),  # None until check_models reads the family's default
        use_lora=args.use_lora,
        **lora,
        **modules,
    )


class TrainingStopped(DIStarError, RuntimeError):
    """The run cannot go on (e.g. only non-finite steps); printed as one line, exit 1."""


#: Errors the user causes and can fix: one line ``train_di_star_sdxl.py: error: …`` and exit 2 (as the `di-star`
#: commands): the package's DIStarError, and ValueError for bad input checked by libraries (argparse-free checks in
#: DIStarConfig, load_prompts, the reward registry) and ImportError for a missing optional package.
USER_ERRORS = (DIStarError, ValueError, ImportError)


def report_user_errors(argv: list[str], run: Callable[[], T]) -> T | int:
    """``run()``, or a user error's exit status (2; 1 for :class:`TrainingStopped`) after printing it as one line;
    ``--debug`` or ``DI_STAR_DEBUG=1`` re-raises it."""
    try:
        return run()
    except USER_ERRORS as error:
        if "--debug" in argv or os.environ.get("DI_STAR_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{os.path.basename(__file__)}: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, TrainingStopped) else 2


def cli(argv: list[str] | None = None) -> int:
    """``main(parse_args(argv))`` with user errors as one line (:func:`report_user_errors`)."""
    argv = sys.argv[1:] if argv is None else argv
    return report_user_errors(argv, lambda: main(parse_args(argv)))


if __name__ == "__main__":  # every flag is checked before the imports below load torch, diffusers and accelerate
    ARGS = report_user_errors(sys.argv[1:], lambda: parse_args(sys.argv[1:]))
    if not isinstance(ARGS, argparse.Namespace):
        sys.exit(ARGS)

# isort: split
# The heavy imports, once the flags are known to be good.
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid
from safetensors import SafetensorError
from tqdm.auto import tqdm

from diffusers_di_star.training import (
    ROLES,
    assistant_loss,
    generator_loss,
    load_prompts,
    prompt_batch,
    setup_networks,
)
from diffusers_di_star.training.ema import ShardedEMA
from diffusers_di_star.training.engine import (
    backward,
    check_accelerator,
    check_engine,
    dtype_policy,
    gather_unet,
    load_state,
    local_main_first,
    optimisation_step,
    prepare_networks,
    register_checkpoint_hooks,
)
from diffusers_di_star.training.preflight import check_lora_targets, detect_model_family, load_network_config
from diffusers_di_star.training.prompt_cache import PromptEmbeddingCache
from diffusers_di_star.training.throughput import iteration_flops, peak_flops

logger = get_logger(__name__)


def resolve_max_train_steps(args: argparse.Namespace, num_prompts: int, num_processes: int) -> None:
    """``--num_train_epochs`` as steps: one epoch is ⌈prompts / (batch × accumulation × processes)⌉ steps, the
    prompts that ``prompt_batch`` draws in one seeded permutation."""
    if args.num_train_epochs is not None:
        per_step = args.train_batch_size * args.gradient_accumulation_steps * num_processes
        args.max_train_steps = args.num_train_epochs * math.ceil(num_prompts / per_step)
        logger.info(f"--num_train_epochs {args.num_train_epochs}: {args.max_train_steps} steps")


def load_reward(spec: str, **options):
    """The reward model from its spec string (``diffusers_di_star.rewards`` registry) and loader options, frozen.

    A checkpoint that is neither local nor reachable names its Hub repos and the ``--reward_option`` for a local copy.
    """
    from diffusers_di_star.rewards import load_reward as load_from_registry

    try:
        return load_from_registry(spec, **options).freeze()
    except OSError as error:
        raise ValueError(reward_load_failure(spec, options, error, "--reward_option")) from error


def resolve_family_defaults(args: argparse.Namespace):
    """The model family's defaults for what was not given (t*, LoRA target modules), t* and the resolution checked;
    returns the family.

    Reads only the model's ``model_index.json``: resuming compares these settings before anything loads.
    """
    family_class = detect_model_family(args.pretrained_model_name_or_path, revision=args.revision)
    if args.conditioning_timestep is None:
        args.conditioning_timestep = family_class.default_conditioning_timestep
    args.conditioning_timestep = family_class.check_conditioning_timestep(args.conditioning_timestep)
    family_class.check_resolution(args.resolution)
    for role in TRAINED_ROLES:
        if getattr(args, f"{role}_lora_target_modules") is None:
            setattr(args, f"{role}_lora_target_modules", ",".join(family_class.lora_target_modules))
    return family_class


def check_models(args: argparse.Namespace):
    """The reference model's family (from its ``model_index.json``); it is reachable and the LoRA targets exist in its
    network (from its config, no weights)."""
    family_class = resolve_family_defaults(args)
    config = load_network_config(family_class, args.pretrained_model_name_or_path, revision=args.revision)
    for flag in ("pretrained_vae_model_name_or_path", "pretrained_generator"):
        name = getattr(args, flag)
        if name is not None and (problem := local_path_problem(f"--{flag}", name, "a local file or folder")):
            raise ModelLoadError(problem)
    if args.use_lora:
        di_star = make_config(args)
        targets = {f"--{r}_lora_target_modules": getattr(di_star, f"{r}_lora_target_modules") for r in TRAINED_ROLES}
        check_lora_targets(config, targets, family_class.network_class())
    return family_class


def last_checkpoint_note(output_dir: str) -> str:
    complete = checkpoint_dirs(output_dir)
    if not complete:
        return "no checkpoint was saved yet"
    return f"the last checkpoint, {complete[-1]}, is intact (--resume_from_checkpoint latest)"


def non_finite_message(output_dir: str, skipped: int) -> str:
    # skipped steps change no weight: the newest checkpoint is finite
    return (
        f"{skipped} non-finite steps in a row: stopping; {last_checkpoint_note(output_dir)}. Lower the learning rate "
        "or the reward scale, or try --mixed_precision bf16."
    )


def disk_full_message(output_dir: str, lost: str, on_rank: str = "") -> str:
    return (
        f"disk full at {output_dir}{on_rank}: {lost}; {last_checkpoint_note(output_dir)}. Free some space (or use "
        "--checkpoints_total_limit)."
    )


def hub_repo_id(args: argparse.Namespace) -> str:
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def load_vae(args) -> AutoencoderKL:
    if args.pretrained_vae_model_name_or_path is not None:
        return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=args.revision)
    return AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
    )


def build_pipeline(args, generator_unet, family, vae):
    """The family's one-step pipeline (e.g. ``DIStarSDXLPipeline``) around the generator."""
    if args.precompute_prompt_embeddings:  # the text encoders waited on the CPU
        family.to(generator_unet.device)
    return family.build_pipeline(generator_unet, vae, args.conditioning_timestep)


def precompute_prompt_embeddings(args, family, prompts) -> PromptEmbeddingCache:
    """Every prompt's conditioning, encoded once (or read back on resume); the text encoders then go to the CPU."""
    path = os.path.join(args.output_dir, "prompt_embeddings.safetensors")
    model = resume_settings(args)["pretrained_model_name_or_path"]
    cache = PromptEmbeddingCache.load_or_build(path, family, prompts, args.resolution, model)
    family.to("cpu")
    logger.info(f"prompt embeddings of {len(cache.index)} prompts in {path}; text encoders on the CPU")
    return cache


def validate(args, pipeline, folder: str, weight_dtype: torch.dtype = torch.float32) -> list[str]:
    """One image per validation prompt with a fixed seed, saved as PNG, and ``grid.png``: the prompts side by side
    (one picture per validation step; the model card stacks them into the progression). Returns the image paths."""
    os.makedirs(folder, exist_ok=True)
    paths, images = [], []
    # A full finetune keeps g_θ in float32 beside frozen text encoders in the weight dtype: render under autocast to
    # that dtype, as the training steps run (accelerate's autocast); a no-op without mixed precision.
    autocast = torch.autocast(pipeline.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    for i, prompt in enumerate(args.validation_prompts or ()):
        generator = torch.Generator(pipeline.device).manual_seed(args.seed)
        with torch.no_grad(), autocast:
            image = pipeline(prompt, height=args.resolution, width=args.resolution, generator=generator).images[0]
        paths.append(os.path.join(folder, f"{i:03d}.png"))
        image.save(paths[-1])
        images.append(image)
    if images:
        make_image_grid(images, rows=1, cols=len(images)).save(os.path.join(folder, VALIDATION_GRID))
    return paths


def log_validation_images(trackers, paths: list[str], prompts: list[str], step: int) -> None:
    """The validation PNGs to the trackers too (as in Diffusers' examples): tensorboard as a batch, wandb captioned."""
    if not paths:
        return
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            captioned = [wandb.Image(image, caption=p) for image, p in zip(images, prompts, strict=True)]
            tracker.log({"validation": captioned}, step=step)


def make_optimizer(args, params, lr):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def main(args: argparse.Namespace) -> int:
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    check_process_group(accelerator.num_processes)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # accelerate logs every file of every save at INFO; checkpointing.py logs one line per checkpoint instead.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A mode the engine cannot run fails now, in one line (DeepSpeed; LoRA or EMA under FSDP).
    sharded = check_engine(
        accelerator.distributed_type,
        use_lora=args.use_lora,
        use_ema=args.use_ema,
        fsdp_plugin=getattr(accelerator.state, "fsdp_plugin", None),
    )
    check_accelerator(accelerator)
    # The run folder, the checkpoint to resume (settings checked) and the Hub repo are settled before anything loads,
    # decided by the main process for every rank: a mismatch or a bad token fails in seconds, not after the run.
    # One owner per run folder: the main process takes the lock, every rank gets its outcome.
    run_lock = on_main_process(accelerator, acquire_run_lock, args.output_dir)
    if args.overwrite_output_dir:
        on_main_process(accelerator, clear_previous_run, args.output_dir, args.logging_dir)
    resume = None
    if args.resume_from_checkpoint is not None:
        resolve_family_defaults(args)  # t* and LoRA targets (model_index.json only): resuming compares them
        resume = resolve_resume(
            accelerator, args.output_dir, args.resume_from_checkpoint, resume_settings(args), args.allow_model_change
        )
    if args.push_to_hub:
        args.hub_model_id = on_main_process(accelerator, create_hub_repo, hub_repo_id(args), args.hub_token)
    logger.info(accelerator.state, main_process_only=False)  # after the refusals above: they stay one line
    # Data and reward first: a bad file, column or reward spec fails before the UNets are loaded. A Hub dataset is
    # downloaded once per node, the other ranks read the cache.
    prompts = local_main_first(
        accelerator,
        lambda: load_prompts(
            args.dataset_name,
            args.train_data_file,
            args.prompt_column,
            args.dataset_config_name,
            cache_dir=args.cache_dir,
        ),
    )
    logger.info(f"{len(prompts)} training prompts")
    family_class = check_models(args)
    resolve_max_train_steps(args, len(prompts), accelerator.num_processes)
    config = make_config(args)  # after check_models: t* defaults to the family's
    reward_model = load_reward(args.reward, **args.reward_options) if config.reward_scale > 0 else None
    set_seed(args.seed)  # the same on every rank: LoRA's random init must be identical everywhere
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    family = family_class.from_pretrained(args.pretrained_model_name_or_path, args.revision, args.variant)
    logger.info(f"model family {family.name}, prediction type {family.prediction_type}")
    vae = load_vae(args)
    dtypes = dtype_policy(accelerator.mixed_precision, sharded, vae.config.force_upcast)
    reference_unet = family.load_network(args.pretrained_model_name_or_path, args.revision, args.variant)
    generator_unet = None
    if args.pretrained_generator is not None:
        generator_unet = family.load_generator(
            args.pretrained_generator,
            base_model=args.pretrained_model_name_or_path,
            weight_name=args.pretrained_generator_weight_name,
            variant=args.variant,
        )
    networks = setup_networks(
        config, reference_unet, generator_unet, dtypes.unet, args.gradient_checkpointing, separate_bases=sharded
    )
    set_seed(args.seed, device_specific=True)
    vae.requires_grad_(False).to(accelerator.device, dtype=dtypes.vae)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    family.to(accelerator.device, dtype=dtypes.weight)
    prompt_encoder = family
    if args.precompute_prompt_embeddings:
        prompt_encoder = local_main_first(accelerator, lambda: precompute_prompt_embeddings(args, family, prompts))
        prompt_encoder.to(accelerator.device)
    if reward_model is not None:
        reward_model.to(accelerator.device)
    for unet in {id(u): u for u in (networks.bare_unet(r) for r in ROLES)}.values():
        unet.to(accelerator.device)
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()

    world = accelerator.num_processes
    generator_lr, assistant_lr = args.learning_rate, args.assistant_learning_rate or args.learning_rate
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * world
        generator_lr, assistant_lr = generator_lr * factor, assistant_lr * factor
    generator_optimizer = make_optimizer(args, networks.trainable_parameters("generator"), generator_lr)
    assistant_optimizer = make_optimizer(args, networks.trainable_parameters("assistant"), assistant_lr)
    generator_lr_scheduler = get_scheduler(
        args.lr_scheduler,
        generator_optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=args.max_train_steps * world,
    )
    assistant_lr_scheduler = get_scheduler(
        args.lr_scheduler,
        assistant_optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=args.max_train_steps * args.assistant_updates_per_step * world,
    )
    # Optimisers, schedules and the parameters to clip as prepared (a sharding engine replaces or re-views them).
    optimisation = prepare_networks(
        accelerator,
        networks,
        {"generator": generator_optimizer, "assistant": assistant_optimizer},
        {"generator": generator_lr_scheduler, "assistant": assistant_lr_scheduler},
        sharded,
    )
    ema = None
    if args.use_ema:
        # Each rank averages its own shards (FSDP2); checkpointed as safetensors by save_checkpoint, not pickled.
        ema = ShardedEMA(networks.trainable_parameters("generator"), decay=args.ema_decay)
    register_checkpoint_hooks(accelerator, networks, family)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, (list, dict))}
        accelerator.init_trackers("di-star-sdxl", config=tracker_config)

    global_step = 0
    if resume is not None:
        load = functools.partial(load_state, accelerator, networks, optimisation)
        global_step = load_checkpoint(accelerator, resume, load, ema)
        logger.info(f"resumed from {resume} at step {global_step}")
        check_step_bound(global_step, args.max_train_steps, resume)  # (--num_train_epochs: known only now)
    saved_step = global_step  # the step of the newest checkpoint on disk (0: none needed yet)

    def save(step):
        settings = resume_settings(args)
        try:
            save_checkpoint(
                accelerator, args.output_dir, step, accelerator.save_state, settings, args.checkpoints_total_limit, ema
            )
        except CheckpointWriteError as error:  # raised on every rank alike, naming the rank whose write failed
            if not error.disk_full:
                raise
            lost = f"checkpoint-{step} was not written ({error.cause})"
            raise TrainingStopped(disk_full_message(args.output_dir, lost, error.on_rank)) from None
        return step

    def conditioning_batches(step):
        for micro in range(args.gradient_accumulation_steps):
            index = step * args.gradient_accumulation_steps + micro
            batch = prompt_batch(prompts, index, args.train_batch_size, args.seed, accelerator.process_index, world)
            yield batch, prompt_encoder.encode(batch, args.resolution)

    progress = tqdm(
        range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process, desc="DI*"
    )
    skipped = 0
    gas = args.gradient_accumulation_steps
    # Throughput (docs/training.md, "Throughput"): images/s always; MFU on a GPU whose peak is known, from the model
    # FLOPs of one iteration counted on the meta device.
    images_per_step = args.train_batch_size * gas * world
    peak = peak_flops(accelerator.device, accelerator.mixed_precision)
    flops_per_image = None
    if peak is not None and accelerator.is_main_process:
        cond = next(conditioning_batches(global_step))[1]
        flops_per_image = iteration_flops(networks, config, cond, family, vae)
    stop = StopRequest()  # SIGTERM: finish the step, then every rank saves and exits together
    while global_step < args.max_train_steps:
        if stop.agreed(accelerator):
            break
        step_start = time.perf_counter()
        batches = list(conditioning_batches(global_step))
        # Noise and timesteps from a pure function of (seed, step, process): a resumed run draws the same ones.
        rng = torch.Generator(accelerator.device).manual_seed(
            (args.seed * 1_000_003 + global_step) * 1_009 + accelerator.process_index
        )
        logs, ok = {}, True
        with accelerator.autocast():
            for _ in range(config.assistant_updates_per_step):
                losses = []
                for _, cond in batches:
                    loss, terms = assistant_loss(networks, config, cond, family, rng)
                    backward(accelerator, loss, gas)
                    losses.append(terms["assistant_loss"])
                norm = optimisation_step(accelerator, optimisation["assistant"], losses, args.max_grad_norm)
                ok = ok and norm is not None
                logs.update(
                    assistant_loss=torch.stack(losses).mean().item(), assistant_grad_norm=float(norm or math.nan)
                )
            losses = []
            for prompts_batch, cond in batches:
                loss, terms = generator_loss(networks, config, cond, prompts_batch, family, vae, reward_model, rng)
                backward(accelerator, loss, gas)
                losses.append(terms["generator_loss"])
                for name, value in terms.items():
                    logs[name] = logs.get(name, 0.0) + value.item() / gas
            norm = optimisation_step(accelerator, optimisation["generator"], losses, args.max_grad_norm)
        if norm is None or not ok:
            skipped += 1
            logger.warning(f"step {global_step}: non-finite loss or gradient, update skipped ({skipped} in a row)")
            if skipped >= args.max_skipped_steps:
                raise TrainingStopped(non_finite_message(args.output_dir, skipped))
            continue
        skipped = 0
        if ema is not None:
            ema.step()
        global_step += 1
        progress.update(1)
        seconds = time.perf_counter() - step_start
        logs["images_per_second"] = images_per_step / seconds
        if flops_per_image is not None:
            logs["mfu"] = flops_per_image * images_per_step / (seconds * peak * world)
        logs.update(
            generator_grad_norm=float(norm),
            lr=optimisation["generator"].lr_scheduler.get_last_lr()[0],
            assistant_lr=optimisation["assistant"].lr_scheduler.get_last_lr()[0],
        )
        progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items() if k in ("generator_loss", "reward")})
        accelerator.log(logs, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            saved_step = save(global_step)
        if args.validation_prompts and global_step % args.validation_steps == 0:
            generator = gather_unet(accelerator, networks, "generator")  # all ranks: a gather under FSDP
            if accelerator.is_main_process:
                pipeline = build_pipeline(args, generator, family, vae)
                paths = validate(
                    args, pipeline, os.path.join(args.output_dir, "validation", f"step-{global_step}"), dtypes.weight
                )
                log_validation_images(accelerator.trackers, paths, args.validation_prompts, global_step)
                if args.precompute_prompt_embeddings:
                    family.to("cpu")
    progress.close()
    stop.restore()
    if global_step < args.max_train_steps:  # stopped by a SIGTERM on some rank: every rank is here
        if global_step > saved_step:
            saved_step = save(global_step)
        if accelerator.is_main_process:
            where = f"checkpoint-{saved_step} is saved" if saved_step else "no step was done, nothing to save"
            print(
                f"{os.path.basename(__file__)}: SIGTERM: stopped after step {global_step}; {where}. Continue with "
                f"--resume_from_checkpoint latest.",
                file=sys.stderr,
            )
        accelerator.end_training()
        if accelerator.is_main_process:
            run_lock.release()
        return EXIT_TERMINATED

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to()
    generator = gather_unet(accelerator, networks, "generator")
    status = 0
    if accelerator.is_main_process:
        try:
            status = export(args, networks, generator, family, vae, dtypes.weight)
        except (OSError, SafetensorError) as error:
            if not is_disk_full(error):
                raise
            lost = "the final weights were not all written"
            raise TrainingStopped(disk_full_message(args.output_dir, lost)) from None
    accelerator.end_training()
    if accelerator.is_main_process:
        run_lock.release()
    return status


def export(args, networks, generator_unet, family, vae, weight_dtype: torch.dtype = torch.float32) -> int:
    """The final folder: LoRA weights or a full pipeline, validation images, model card; optionally pushed.

    ``generator_unet`` holds g_θ's full weights (:func:`gather_unet`, with the EMA copied in when ``--use_ema``).
    """
    pipeline = build_pipeline(args, generator_unet, family, vae)
    if networks.use_lora:
        family.save_lora_weights(args.output_dir, *networks.lora_state_dict("generator", generator_unet))
    else:
        pipeline.save_pretrained(args.output_dir)
    images = validate(args, pipeline, os.path.join(args.output_dir, "images"), weight_dtype)
    hyperparameters = {
        k: v
        for k, v in vars(args).items()
        if k not in ("hub_token", "output_dir", "logging_dir", "resume_from_checkpoint", "validation_prompts")
    }
    with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
        json.dump(hyperparameters, f, indent=2, sort_keys=True)
    write_model_card(
        args.output_dir,
        base_model=args.pretrained_model_name_or_path,
        generator_init=args.pretrained_generator,
        generator_weight_name=args.pretrained_generator_weight_name,
        reward=args.reward if args.reward_scale > 0 else None,
        hyperparameters=hyperparameters,
        lora=networks.use_lora,
        repo_id=args.hub_model_id,
        images=images,
        family=type(family),
    )
    logger.info(f"saved the trained generator to {args.output_dir}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        if not push_folder(args.output_dir, repo_id, token=args.hub_token):
            return 1
    return 0



if __name__ == "__main__":
    sys.exit(report_user_errors(sys.argv[1:], lambda: main(ARGS)))
