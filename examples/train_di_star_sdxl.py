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
import json
import logging
import math
import os
import shutil
import sys

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from diffusers_di_star import DIStarSDXLPipeline
from diffusers_di_star.export import load_generator_unet
from diffusers_di_star.hub import push_folder, write_model_card
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

logger = get_logger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROLE_DIRS = {"generator": "generator", "assistant": "assistant"}


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
    for role in ("generator", "assistant"):
        lora.add_argument(f"--{role}_lora_rank", type=int, default=64)
        lora.add_argument(f"--{role}_lora_alpha", type=float, default=64.0)
        lora.add_argument(
            f"--{role}_lora_target_modules", default=",".join(DEFAULT_LORA_TARGET_MODULES), help="comma separated"
        )

    di_star = parser.add_argument_group("DI* objective")
    di_star.add_argument(
        "--reward", default="pickscore", help="Reward spec, e.g. 'pickscore' or 'pickscore:1,hpsv2:1'."
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
    data.add_argument("--dataset_name", default=None, help="Hub dataset of prompts.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument(
        "--train_data_file", default=None, help="Local .txt (one prompt a line) / .csv / .json / .parquet."
    )
    data.add_argument("--prompt_column", default=None, help="Default: 'text' for .txt, 'prompt' otherwise.")
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--resolution", type=int, default=1024)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="di-star-sdxl")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=1, help="Per device.")
    train.add_argument("--max_train_steps", type=int, default=1000)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-5)
    train.add_argument("--scale_lr", action="store_true", help="lr × accumulation × batch size × processes.")
    train.add_argument("--lr_scheduler", default="constant")
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
    logs.add_argument("--validation_steps", type=int, default=500)

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None)
    hub.add_argument("--hub_token", default=None, help="Prefer `hf auth login`: the token is never logged or saved.")

    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Flag errors that need no model: raised before anything heavy is loaded."""
    for name in (
        "train_batch_size",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "max_skipped_steps",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if args.learning_rate <= 0 or (args.assistant_learning_rate is not None and args.assistant_learning_rate <= 0):
        raise ValueError("--learning_rate and --assistant_learning_rate must be > 0.")
    if not 0 < args.ema_decay < 1:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    if args.hub_token is not None and args.report_to == "wandb":
        raise ValueError("--hub_token with --report_to=wandb would expose the token; use `hf auth login` instead.")
    if args.enable_xformers_memory_efficient_attention:
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--enable_xformers_memory_efficient_attention: install diffusers-di-star[xformers].")
    make_config(args)


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
        generator_lora_target_modules=args.generator_lora_target_modules.split(","),
        assistant_lora_target_modules=args.assistant_lora_target_modules.split(","),
    )


def load_reward(spec: str):
    """The reward model from its spec string (``diffusers_di_star.rewards`` registry), frozen."""
    from diffusers_di_star.rewards import load_reward as load_from_registry

    return load_from_registry(spec).freeze()


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


def register_checkpoint_hooks(accelerator: Accelerator, networks) -> None:
    """Checkpoints hold the generator and assistant as LoRA (``save_lora_weights`` format) or full UNets."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for role, folder in ROLE_DIRS.items():
                path = os.path.join(output_dir, folder)
                if networks.use_lora:
                    state_dict, metadata = networks.lora_state_dict(role)
                    StableDiffusionXLPipeline.save_lora_weights(
                        path, unet_lora_layers=state_dict, unet_lora_adapter_metadata=metadata
                    )
                else:
                    networks.bare_unet(role).save_pretrained(path)
        weights.clear()  # accelerate would otherwise save the prepared modules a second time

    def load_hook(models, input_dir):
        models.clear()
        for role, folder in ROLE_DIRS.items():
            path = os.path.join(input_dir, folder)
            if networks.use_lora:
                state_dict, _ = StableDiffusionXLPipeline.lora_state_dict(path)
                state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
                incompatible = set_peft_model_state_dict(
                    networks.bare_unet(role),
                    convert_unet_state_dict_to_peft(state_dict),
                    adapter_name=networks.adapter(role),
                )
                if getattr(incompatible, "unexpected_keys", None):
                    raise ValueError(f"{path}: unexpected LoRA keys {incompatible.unexpected_keys[:3]}")
            else:
                saved = UNet2DConditionModel.from_pretrained(path)
                networks.bare_unet(role).load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dirs(output_dir: str) -> list[str]:
    """``checkpoint-<step>`` folders, oldest first (half-written ``.tmp`` folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return sorted(names, key=lambda d: int(d.split("-", 1)[1]))


def save_checkpoint(accelerator: Accelerator, args, global_step: int) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed when complete; old ones beyond the limit removed."""
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        existing = checkpoint_dirs(args.output_dir)
        if args.checkpoints_total_limit is not None and len(existing) >= args.checkpoints_total_limit:
            for name in existing[: len(existing) - args.checkpoints_total_limit + 1]:
                logger.info(f"removing checkpoint {name} (checkpoints_total_limit={args.checkpoints_total_limit})")
                shutil.rmtree(os.path.join(args.output_dir, name))
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def resolve_resume(args) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder.")
        return args.resume_from_checkpoint
    existing = checkpoint_dirs(args.output_dir)
    if not existing:
        logger.info(f"no checkpoint in {args.output_dir}: starting a new run")
        return None
    return os.path.join(args.output_dir, existing[-1])


def build_pipeline(args, networks, tokenizers, text_encoders, vae, scheduler) -> DIStarSDXLPipeline:
    networks.unet("generator")
    return DIStarSDXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=networks.bare_unet("generator"),
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


def all_finite(accelerator, *values) -> bool:
    """True on every process when all values are finite on every process (so all ranks skip together)."""
    bad = torch.tensor(
        [float(not torch.isfinite(torch.as_tensor(v)).all()) for v in values], device=accelerator.device
    )
    return bool(accelerator.reduce(bad.sum(), reduction="sum") == 0)


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
    # Data and reward first: a bad file, column or reward spec fails before the UNets are loaded.
    prompts = load_prompts(
        args.dataset_name, args.train_data_file, args.prompt_column, args.dataset_config_name, cache_dir=args.cache_dir
    )
    logger.info(f"{len(prompts)} training prompts")
    reward_model = load_reward(args.reward) if config.reward_scale > 0 else None
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    tokenizers, text_encoders = load_text_models(args)
    vae = load_vae(args)
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
    networks = setup_networks(config, reference_unet, generator_unet, weight_dtype, args.gradient_checkpointing)
    # Frozen modules in the weight dtype; SDXL's VAE overflows in fp16, so it stays fp32 there (diffusers' rule).
    vae_dtype = torch.float32 if weight_dtype == torch.float16 and vae.config.force_upcast else weight_dtype
    vae.requires_grad_(False).to(accelerator.device, dtype=vae_dtype)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    if reward_model is not None:
        reward_model.to(accelerator.device)
    trainable_unets = list({id(u): u for u in (networks.bare_unet(r) for r in ("generator", "assistant"))}.values())
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
    generator_params = networks.trainable_parameters("generator")
    assistant_params = networks.trainable_parameters("assistant")
    generator_optimizer = make_optimizer(args, generator_params, generator_lr)
    assistant_optimizer = make_optimizer(args, assistant_params, assistant_lr)
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
    ema = EMAModel(generator_params, decay=args.ema_decay) if args.use_ema else None

    prepared = accelerator.prepare(
        *trainable_unets, generator_optimizer, assistant_optimizer, generator_lr_scheduler, assistant_lr_scheduler
    )
    wrapped_unets = prepared[: len(trainable_unets)]
    generator_optimizer, assistant_optimizer, generator_lr_scheduler, assistant_lr_scheduler = prepared[
        len(trainable_unets) :
    ]
    for role in ("generator", "assistant"):
        networks.wrapped[role] = wrapped_unets[trainable_unets.index(networks.bare_unet(role))]
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    register_checkpoint_hooks(accelerator, networks)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, list)}
        accelerator.init_trackers("di-star-sdxl", config=tracker_config)

    global_step = 0
    resume = resolve_resume(args)
    if resume is not None:
        accelerator.load_state(resume)
        global_step = int(os.path.basename(os.path.normpath(resume)).split("-")[-1])
        logger.info(f"resumed from {resume} at step {global_step}")

    def conditioning_batches(step):
        for micro in range(args.gradient_accumulation_steps):
            index = step * args.gradient_accumulation_steps + micro
            batch = prompt_batch(prompts, index, args.train_batch_size, args.seed, accelerator.process_index, world)
            yield batch, encode_prompts(batch, tokenizers, text_encoders, args.resolution)

    def update(optimizer, lr_scheduler, params, losses):
        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        if not all_finite(accelerator, *losses, grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    progress = tqdm(
        range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process, desc="DI*"
    )
    skipped = 0
    gas = args.gradient_accumulation_steps
    while global_step < args.max_train_steps:
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
                    accelerator.backward(loss / gas)
                    losses.append(terms["assistant_loss"])
                norm = update(assistant_optimizer, assistant_lr_scheduler, assistant_params, losses)
                ok = ok and norm is not None
                logs.update(
                    assistant_loss=torch.stack(losses).mean().item(), assistant_grad_norm=float(norm or math.nan)
                )
            losses = []
            for prompts_batch, cond in batches:
                loss, terms = generator_loss(
                    networks, config, cond, prompts_batch, alphas_cumprod, vae, reward_model, rng
                )
                accelerator.backward(loss / gas)
                losses.append(terms["generator_loss"])
                for name, value in terms.items():
                    logs[name] = logs.get(name, 0.0) + value.item() / gas
            norm = update(generator_optimizer, generator_lr_scheduler, generator_params, losses)
        if norm is None or not ok:
            skipped += 1
            logger.warning(f"step {global_step}: non-finite loss or gradient, update skipped ({skipped} in a row)")
            if skipped >= args.max_skipped_steps:
                raise RuntimeError(
                    f"{skipped} non-finite steps in a row: stopping. The last good checkpoint in {args.output_dir} is "
                    "intact; lower the learning rate or the reward scale, or try --mixed_precision bf16."
                )
            continue
        skipped = 0
        if ema is not None:
            ema.step(generator_params)
        global_step += 1
        progress.update(1)
        logs.update(
            generator_grad_norm=float(norm),
            lr=generator_lr_scheduler.get_last_lr()[0],
            assistant_lr=assistant_lr_scheduler.get_last_lr()[0],
        )
        progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items() if k in ("generator_loss", "reward")})
        accelerator.log(logs, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, args, global_step)
        if args.validation_prompts and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            pipeline = build_pipeline(args, networks, tokenizers, text_encoders, vae, scheduler)
            validate(args, pipeline, os.path.join(args.output_dir, "validation", f"step-{global_step}"))
    progress.close()

    accelerator.wait_for_everyone()
    status = 0
    if accelerator.is_main_process:
        status = export(args, networks, ema, tokenizers, text_encoders, vae, scheduler)
    accelerator.end_training()
    return status


def export(args, networks, ema, tokenizers, text_encoders, vae, scheduler) -> int:
    """The final folder: LoRA weights or a full pipeline, validation images, model card; optionally pushed."""
    if ema is not None:
        ema.copy_to(networks.trainable_parameters("generator"))
    pipeline = build_pipeline(args, networks, tokenizers, text_encoders, vae, scheduler)
    if networks.use_lora:
        state_dict, metadata = networks.lora_state_dict("generator")
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
        reward=args.reward,
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


if __name__ == "__main__":
    sys.exit(main(parse_args()))
