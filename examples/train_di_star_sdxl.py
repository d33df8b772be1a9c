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
import inspect
import json
import logging
import math
import os
import sys
import time

# First: importing the package installs its log filters (quiet.py) before diffusers imports transformers.
import diffusers_di_star  # noqa: F401

# isort: split
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from diffusers_di_star import DIStarSDXLPipeline
from diffusers_di_star.export import load_generator_unet
from diffusers_di_star.hub import create_hub_repo, push_folder, write_model_card
from diffusers_di_star.runtime import ModelLoadError
from diffusers_di_star.training import (
    CFG_MODES,
    DEFAULT_LORA_TARGET_MODULES,
    DIVERGENCES,
    ROLES,
    DIStarConfig,
    assistant_loss,
    encode_prompts,
    generator_loss,
    load_prompts,
    prompt_batch,
    setup_networks,
)
from diffusers_di_star.training.checkpointing import (
    check_run_folder,
    checkpoint_dirs,
    load_checkpoint,
    on_main_process,
    remove_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from diffusers_di_star.training.ema import ShardedEMA
from diffusers_di_star.training.engine import (
    ROLE_DIRS,
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
from diffusers_di_star.training.preflight import check_lora_targets, is_hub_id, load_unet_config
from diffusers_di_star.training.throughput import iteration_flops, peak_flops

logger = get_logger(__name__)

#: diffusers' schedules that need nothing beyond warm-up and length (piecewise_constant needs step rules).
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
#: The flags that only mean something with --use_lora.
LORA_FLAGS = ("rank",) + tuple(
    f"{role}_lora_{key}" for role in ("generator", "assistant") for key in ("rank", "alpha", "target_modules")
)
#: What a resume must repeat, because it decides the networks' shapes, the optimiser state or the objective.
RESUME_FLAGS = (
    "pretrained_model_name_or_path",
    "pretrained_generator",
    "pretrained_generator_weight_name",
    "use_lora",
    "use_ema",
    "divergence",
    "cfg_mode",
    "use_8bit_adam",
)
LORA_RESUME_FLAGS = LORA_FLAGS[1:]
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_model_name_or_path", required=True, help="SDXL reference (Hub id or folder).")
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
    models.add_argument("--conditioning_timestep", type=int, default=399, help="t* of the one-step map.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of full UNets.")
    lora.add_argument("--rank", type=int, default=None, help="Both LoRA ranks (Diffusers' examples' flag).")
    for role in ("generator", "assistant"):
        lora.add_argument(f"--{role}_lora_rank", type=int, default=None, help="Default: --rank, else 64.")
        lora.add_argument(f"--{role}_lora_alpha", type=float, default=None, help="Default: the rank (scale 1).")
        lora.add_argument(
            f"--{role}_lora_target_modules",
            default=None,
            help=f"Comma separated, matched as peft does. Default: {','.join(DEFAULT_LORA_TARGET_MODULES)}.",
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
    di_star.add_argument("--reward_scale", type=float, default=100.0, help="α_rew (paper: 100 with PickScore).")
    di_star.add_argument("--cfg_mode", choices=CFG_MODES, default="inner")
    di_star.add_argument("--guidance_scale", type=float, default=7.5, help="γ of the CFG-enhanced reference (inner).")
    di_star.add_argument("--cfg_reward_scale", type=float, default=1.0, help="α_cfg of the implicit CFG reward.")
    di_star.add_argument("--divergence", choices=DIVERGENCES, default="pseudo_huber")
    di_star.add_argument("--huber_c", type=float, default=1.0)
    di_star.add_argument("--weighting", default="sigma", help="w(t): constant, sigma or sigma_squared.")
    di_star.add_argument("--min_timestep", type=int, default=20)
    di_star.add_argument("--max_timestep", type=int, default=980)
    di_star.add_argument("--assistant_updates_per_step", type=int, default=1, help="K_TA (DMD2: 5).")
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
    data.add_argument("--resolution", type=int, default=1024)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="di-star-sdxl")
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds another run (its checkpoints are deleted).",
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
    for role in ("generator", "assistant"):
        rank = getattr(args, f"{role}_lora_rank") or args.rank or 64
        setattr(args, f"{role}_lora_rank", rank)
        setattr(args, f"{role}_lora_alpha", getattr(args, f"{role}_lora_alpha") or float(rank))
        modules = getattr(args, f"{role}_lora_target_modules") or ",".join(DEFAULT_LORA_TARGET_MODULES)
        setattr(args, f"{role}_lora_target_modules", modules)
    args.validation_prompts = [*(args.validation_prompts or ()), *(args.validation_prompt or ())] or None
    args.reward_options = parse_reward_options(args.reward_option)
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


def parse_reward_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``--reward_option NAME.OPTION=VALUE`` items as loader options, parsed as ``di-star eval`` parses them."""
    from diffusers_di_star.cli import CLIError, _parse_reward_options

    try:
        return _parse_reward_options(items)
    except CLIError as error:
        raise ValueError(str(error).replace("--reward-option", "--reward_option")) from None


def resolve_max_train_steps(args: argparse.Namespace, num_prompts: int, num_processes: int) -> None:
    """``--num_train_epochs`` as steps: one epoch is ⌈prompts / (batch × accumulation × processes)⌉ steps, the
    prompts that ``prompt_batch`` draws in one seeded permutation."""
    if args.num_train_epochs is not None:
        per_step = args.train_batch_size * args.gradient_accumulation_steps * num_processes
        args.max_train_steps = args.num_train_epochs * math.ceil(num_prompts / per_step)
        logger.info(f"--num_train_epochs {args.num_train_epochs}: {args.max_train_steps} steps")


def resume_settings(args: argparse.Namespace) -> dict:
    """The flags a resume must repeat (:data:`RESUME_FLAGS`), as recorded in each checkpoint; local paths absolute."""
    flags = RESUME_FLAGS + (LORA_RESUME_FLAGS if args.use_lora else ())
    settings = {flag: getattr(args, flag) for flag in flags}
    for flag in ("pretrained_model_name_or_path", "pretrained_generator"):
        if settings[flag] is not None and os.path.exists(settings[flag]):
            settings[flag] = os.path.abspath(settings[flag])
    for flag in flags:
        if flag.endswith("_target_modules"):
            settings[flag] = [name.strip() for name in settings[flag].split(",")]
    return settings


def make_config(args: argparse.Namespace) -> DIStarConfig:
    return DIStarConfig(
        reward_scale=args.reward_scale,
        cfg_mode=args.cfg_mode,
        guidance_scale=args.guidance_scale,
        cfg_reward_scale=args.cfg_reward_scale,
        divergence=args.divergence,
        huber_c=args.huber_c,
        weighting=args.weighting,
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
        conditioning_timestep=args.conditioning_timestep,
        assistant_updates_per_step=args.assistant_updates_per_step,
        resolution=args.resolution,
        use_lora=args.use_lora,
        **{
            f"{role}_lora_{key}": getattr(args, f"{role}_lora_{key}")
            for role in ("generator", "assistant")
            for key in ("rank", "alpha")
        },
        generator_lora_target_modules=[m.strip() for m in args.generator_lora_target_modules.split(",") if m.strip()],
        assistant_lora_target_modules=[m.strip() for m in args.assistant_lora_target_modules.split(",") if m.strip()],
    )


def load_reward(spec: str, **options):
    """The reward model from its spec string (``diffusers_di_star.rewards`` registry) and loader options, frozen.

    A checkpoint that is neither local nor reachable names its Hub repos and the ``--reward_option`` for a local copy.
    """
    from diffusers_di_star.rewards import load_reward as load_from_registry
    from diffusers_di_star.rewards.registry import REWARDS, parse_reward_spec

    try:
        return load_from_registry(spec, **options).freeze()
    except OSError as error:
        sources = [
            (f"{name}.{option}", default)
            for name in parse_reward_spec(spec)
            for option, default in _loader_defaults(REWARDS[name].loader).items()
            if isinstance(default, str) and is_hub_id(default) and "/" in default
        ]
        raise ValueError(
            f"--reward {spec!r}: a checkpoint is not in the local Hugging Face cache and the Hub is unreachable "
            f"({_first_line(error)}). Download {', '.join(sorted({repo for _, repo in sources}))} on a connected "
            "machine, or pass local copies: "
            + " ".join(f"--reward_option {option}=PATH" for option, _ in sources)
        ) from error


def _loader_defaults(loader) -> dict:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(loader).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_models(args: argparse.Namespace) -> None:
    """The reference model is reachable and the LoRA targets exist in its UNet (from its config, no weights)."""
    config = load_unet_config(args.pretrained_model_name_or_path, revision=args.revision)
    for flag in ("pretrained_vae_model_name_or_path", "pretrained_generator"):
        name = getattr(args, flag)
        if name is not None and not is_hub_id(name) and not os.path.exists(name):
            raise ModelLoadError(f"--{flag} {name!r}: no such file or folder.")
    if args.use_lora:
        di_star = make_config(args)
        targets = {f"--{r}_lora_target_modules": getattr(di_star, f"{r}_lora_target_modules") for r in ROLE_DIRS}
        check_lora_targets(config, targets)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. only non-finite steps); printed as one line, exit 1."""


def non_finite_message(output_dir: str, skipped: int) -> str:
    complete = checkpoint_dirs(output_dir)  # skipped steps change no weight: the newest checkpoint is finite
    saved = (
        f"the last checkpoint, {complete[-1]}, is intact (--resume_from_checkpoint latest)"
        if complete
        else "no checkpoint was saved yet"
    )
    return (
        f"{skipped} non-finite steps in a row: stopping; {saved}. Lower the learning rate or the reward scale, "
        "or try --mixed_precision bf16."
    )


def hub_repo_id(args: argparse.Namespace) -> str:
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def load_text_models(args):
    tokenizers = [
        AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=sub, revision=args.revision)
        for sub in ("tokenizer", "tokenizer_2")
    ]
    kwargs = {"revision": args.revision, "variant": args.variant}
    text_encoders = [
        CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", **kwargs),
        CLIPTextModelWithProjection.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="text_encoder_2", **kwargs
        ),
    ]
    return tokenizers, text_encoders


def load_vae(args) -> AutoencoderKL:
    if args.pretrained_vae_model_name_or_path is not None:
        return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=args.revision)
    return AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
    )


def build_pipeline(args, generator_unet, tokenizers, text_encoders, vae, scheduler) -> DIStarSDXLPipeline:
    return DIStarSDXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=generator_unet,
        scheduler=scheduler,
        add_watermarker=False,
        conditioning_timestep=args.conditioning_timestep,
    )


def validate(args, pipeline, folder: str) -> list[str]:
    """One image per validation prompt with a fixed seed, saved as PNG; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, prompt in enumerate(args.validation_prompts or ()):
        generator = torch.Generator(pipeline.device).manual_seed(args.seed)
        with torch.no_grad():
            image = pipeline(prompt, height=args.resolution, width=args.resolution, generator=generator).images[0]
        paths.append(os.path.join(folder, f"{i:03d}.png"))
        image.save(paths[-1])
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
    config = make_config(args)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
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
    if args.overwrite_output_dir:
        on_main_process(accelerator, remove_checkpoints, args.output_dir)
    resume = resolve_resume(accelerator, args.output_dir, args.resume_from_checkpoint, resume_settings(args))
    if args.push_to_hub:
        args.hub_model_id = on_main_process(accelerator, create_hub_repo, hub_repo_id(args), args.hub_token)
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
    resolve_max_train_steps(args, len(prompts), accelerator.num_processes)
    check_models(args)
    reward_model = load_reward(args.reward, **args.reward_options) if config.reward_scale > 0 else None
    set_seed(args.seed)  # the same on every rank: LoRA's random init must be identical everywhere
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    tokenizers, text_encoders = load_text_models(args)
    vae = load_vae(args)
    dtypes = dtype_policy(accelerator.mixed_precision, sharded, vae.config.force_upcast)
    scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    reference_unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
    )
    generator_unet = None
    if args.pretrained_generator is not None:
        generator_unet = load_generator_unet(
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
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False).to(accelerator.device, dtype=dtypes.weight)
    if reward_model is not None:
        reward_model.to(accelerator.device)
    for unet in {id(u): u for u in (networks.bare_unet(r) for r in ROLES)}.values():
        unet.to(accelerator.device)
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)

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
    register_checkpoint_hooks(accelerator, networks)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, (list, dict))}
        accelerator.init_trackers("di-star-sdxl", config=tracker_config)

    global_step = 0
    if resume is not None:
        load = functools.partial(load_state, accelerator, networks, optimisation)
        global_step = load_checkpoint(accelerator, resume, load, ema)
        logger.info(f"resumed from {resume} at step {global_step}")

    def conditioning_batches(step):
        for micro in range(args.gradient_accumulation_steps):
            index = step * args.gradient_accumulation_steps + micro
            batch = prompt_batch(prompts, index, args.train_batch_size, args.seed, accelerator.process_index, world)
            yield batch, encode_prompts(batch, tokenizers, text_encoders, args.resolution)

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
        flops_per_image = iteration_flops(networks, config, cond, alphas_cumprod, vae)
    while global_step < args.max_train_steps:
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
                    loss, terms = assistant_loss(networks, config, cond, alphas_cumprod, rng)
                    backward(accelerator, loss, gas)
                    losses.append(terms["assistant_loss"])
                norm = optimisation_step(accelerator, optimisation["assistant"], losses, args.max_grad_norm)
                ok = ok and norm is not None
                logs.update(
                    assistant_loss=torch.stack(losses).mean().item(), assistant_grad_norm=float(norm or math.nan)
                )
            losses = []
            for prompts_batch, cond in batches:
                loss, terms = generator_loss(
                    networks, config, cond, prompts_batch, alphas_cumprod, vae, reward_model, rng
                )
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
            save_checkpoint(
                accelerator,
                args.output_dir,
                global_step,
                accelerator.save_state,
                resume_settings(args),
                args.checkpoints_total_limit,
                ema,
            )
        if args.validation_prompts and global_step % args.validation_steps == 0:
            generator = gather_unet(accelerator, networks, "generator")  # all ranks: a gather under FSDP
            if accelerator.is_main_process:
                pipeline = build_pipeline(args, generator, tokenizers, text_encoders, vae, scheduler)
                paths = validate(args, pipeline, os.path.join(args.output_dir, "validation", f"step-{global_step}"))
                log_validation_images(accelerator.trackers, paths, args.validation_prompts, global_step)
    progress.close()

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to()
    generator = gather_unet(accelerator, networks, "generator")
    status = 0
    if accelerator.is_main_process:
        status = export(args, networks, generator, tokenizers, text_encoders, vae, scheduler)
    accelerator.end_training()
    return status


def export(args, networks, generator_unet, tokenizers, text_encoders, vae, scheduler) -> int:
    """The final folder: LoRA weights or a full pipeline, validation images, model card; optionally pushed.

    ``generator_unet`` holds g_θ's full weights (:func:`gather_unet`, with the EMA copied in when ``--use_ema``).
    """
    pipeline = build_pipeline(args, generator_unet, tokenizers, text_encoders, vae, scheduler)
    if networks.use_lora:
        state_dict, metadata = networks.lora_state_dict("generator", generator_unet)
        StableDiffusionXLPipeline.save_lora_weights(
            args.output_dir, unet_lora_layers=state_dict, unet_lora_adapter_metadata=metadata
        )
    else:
        pipeline.save_pretrained(args.output_dir)
    images = validate(args, pipeline, os.path.join(args.output_dir, "images"))
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
    )
    logger.info(f"saved the trained generator to {args.output_dir}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        if not push_folder(args.output_dir, repo_id, token=args.hub_token):
            return 1
    return 0


#: Errors the user causes and can fix: one line ``train_di_star_sdxl.py: error: …`` and exit 2 (as the `di-star`
#: commands); ValueError is this codebase's bad-input error (check_args, DIStarConfig, load_prompts, the registry).
USER_ERRORS = (ValueError, ModelLoadError, ImportError)


def cli(argv: list[str] | None = None) -> int:
    """``main(parse_args(argv))`` with user errors as one line; ``--debug`` or ``DI_STAR_DEBUG=1`` re-raises them."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("DI_STAR_DEBUG", "") not in ("", "0")
    try:
        return main(parse_args(argv))
    except (*USER_ERRORS, TrainingStopped) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{os.path.basename(__file__)}: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, TrainingStopped) else 2


if __name__ == "__main__":
    sys.exit(cli())
