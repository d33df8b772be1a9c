"""Interop: take DI* (and DMD2-style) one-step SDXL and SD1.x/2.x generators to ComfyUI, A1111/Forge and kohya
tools, and back; SD3 / FLUX.1 LoRAs to ComfyUI with their alphas.

* :func:`export_comfyui_checkpoint` — full single-file checkpoint (UNet, VAE, text encoder(s)).
* :func:`export_comfyui_unet` — the UNet alone: bare ``input_blocks.*`` keys (every ComfyUI UNet loader) or, with
  ``unet_keys="single-file"``, ``model.diffusion_model.*`` keys (Diffusers' ``from_single_file``).
* :func:`export_kohya_lora` — a Diffusers/PEFT UNet LoRA in kohya format with its true alpha.
* :func:`export_comfyui_lora` — an SD3 / FLUX.1 LoRA with its true alphas (``<module>.alpha``), which ComfyUI reads.
* :func:`export_diffusers` — any of those files (or a DMD2 ``.bin``) back to Diffusers folders.
* :func:`load_generator_unet` — a generator UNet from any published layout, for inference and training.

The key mappings live in :mod:`.original_keys` (UNet/VAE/CLIP layouts) and :mod:`.lora` (LoRA names and alphas); file
safety (safetensors or ``torch.load(weights_only=True)``, atomic writes) in :mod:`.files`. See ``docs/export.md``.
"""

from .exporters import (
    FORMATS,
    export_comfyui_checkpoint,
    export_comfyui_lora,
    export_comfyui_unet,
    export_diffusers,
    export_kohya_lora,
    export_model,
)
from .files import ExportError, load_state_dict_file
from .loading import SDXL_BASE_MODEL_ID, checkpoint_kind, load_generator_unet, load_pipeline_components
from .lora import kohya_lora_to_peft, peft_lora_to_kohya
from .original_keys import unet_from_original, unet_to_original
from .single_file import checkpoint_state_dict, components_from_checkpoint, unet_checkpoint_state_dict

__all__ = [
    "ExportError",
    "FORMATS",
    "SDXL_BASE_MODEL_ID",
    "checkpoint_kind",
    "checkpoint_state_dict",
    "components_from_checkpoint",
    "export_comfyui_checkpoint",
    "export_comfyui_lora",
    "export_comfyui_unet",
    "export_diffusers",
    "export_kohya_lora",
    "export_model",
    "kohya_lora_to_peft",
    "load_generator_unet",
    "load_pipeline_components",
    "load_state_dict_file",
    "peft_lora_to_kohya",
    "unet_checkpoint_state_dict",
    "unet_from_original",
    "unet_to_original",
]
