"""`di-star demo` / `make demo`: the main job end to end, offline, on a tiny SDXL built locally.

1. build a tiny SDXL (random weights, locally trained tokenizers) and save it as an SDXL-layout folder;
2. load it back with `DIStarSDXLPipeline.from_pretrained`, exactly as a notebook loads a Hub checkpoint;
3. generate a grid of one-step images and write it to the output folder;
4. export it for ComfyUI: a single-file SDXL checkpoint (Load Checkpoint) and a UNet-only file (Load Diffusion Model).
"""

import os

import torch
from diffusers.utils import make_image_grid

from .export import export_comfyui_checkpoint, export_comfyui_unet
from .pipeline_di_star_sdxl import DIStarSDXLPipeline
from .testing import TINY_PROMPTS, save_tiny_sdxl_pipeline


def run(out_dir: str, num_prompts: int = 4, images_per_prompt: int = 2, seed: int = 0) -> dict[str, str]:
    """Run the demo into `out_dir`; returns the paths it wrote (and prints them)."""
    os.makedirs(out_dir, exist_ok=True)
    model_dir = save_tiny_sdxl_pipeline(os.path.join(out_dir, "tiny-sdxl"), seed=seed)
    pipe = DIStarSDXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(TINY_PROMPTS[:num_prompts])
    images = pipe(
        prompts,
        num_images_per_prompt=images_per_prompt,
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(seed),
    ).images
    grid_path = os.path.join(out_dir, "grid.png")
    make_image_grid(images, rows=len(prompts), cols=images_per_prompt).save(grid_path)
    t_star = pipe.conditioning_timestep
    comfyui_dir = os.path.join(out_dir, "comfyui")
    checkpoint = export_comfyui_checkpoint(
        pipe, os.path.join(comfyui_dir, "tiny-sdxl.safetensors"), "fp16", conditioning_timestep=t_star, overwrite=True
    )
    unet_file = export_comfyui_unet(
        pipe, os.path.join(comfyui_dir, "tiny-sdxl-unet.safetensors"), "fp16", conditioning_timestep=t_star,
        overwrite=True,
    )
    print(f"tiny SDXL pipeline: {model_dir}")
    print(f"one-step images ({len(prompts)} prompts × {images_per_prompt}, t*={t_star}): {grid_path}")
    print(f"ComfyUI checkpoint (models/checkpoints): {checkpoint}")
    print(f"ComfyUI UNet-only file (models/diffusion_models): {unet_file}")
    return {"model": model_dir, "grid": grid_path, "comfyui_checkpoint": checkpoint, "comfyui_unet": unet_file}
