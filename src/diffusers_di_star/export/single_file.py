"""SDXL single-file checkpoints (ComfyUI "Load Checkpoint", A1111/Forge, kohya) <-> Diffusers components.

A full checkpoint holds four parts under their original prefixes (:mod:`.sdxl_keys`); a UNet-only file holds the
``model.diffusion_model.*`` part alone, with the prefix (Diffusers' ``UNet2DConditionModel.from_single_file`` needs
it) or without (every ComfyUI UNet loader reads that): see :func:`.exporters.export_comfyui_unet`.
"""

from __future__ import annotations

import torch

from .files import ExportError
from .loading import assign_weights, build_empty_component
from .sdxl_keys import (
    clip_g_from_original,
    clip_g_to_original,
    clip_l_from_original,
    clip_l_to_original,
    unet_from_original,
    unet_to_original,
    vae_from_original,
    vae_to_original,
)

__all__ = ["unet_checkpoint_state_dict", "sdxl_checkpoint_state_dict", "sdxl_components_from_checkpoint"]


def _text_model(encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel; CLIPTextModelWithProjection still wraps a `text_model`.
    return getattr(encoder, "text_model", encoder)


def _plain_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    if getattr(model, "peft_config", None):
        raise ExportError(
            f"the {name} carries unfused PEFT adapters {sorted(model.peft_config)}: fuse them first "
            f"(pipe.fuse_lora(); pipe.unload_lora_weights()) or export the LoRA itself with --format kohya-lora."
        )
    return model.state_dict()


def unet_checkpoint_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Diffusers SDXL UNet -> the ``model.diffusion_model.*`` state dict (same tensors, original names)."""
    return unet_to_original(_plain_state_dict(unet, "unet"), unet.config)


def sdxl_checkpoint_state_dict(components) -> dict[str, torch.Tensor]:
    """SDXL components (a pipeline, or a dict with ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) -> one
    single-file state dict with all four parts, as ComfyUI's Load Checkpoint and A1111/Forge read it."""
    get = components.get if isinstance(components, dict) else lambda name: getattr(components, name)
    vae, text_encoder, text_encoder_2 = get("vae"), get("text_encoder"), get("text_encoder_2")
    checkpoint = unet_checkpoint_state_dict(get("unet"))
    checkpoint.update(vae_to_original(vae.state_dict(), vae.config))
    checkpoint.update(clip_l_to_original(_plain_state_dict(_text_model(text_encoder), "text_encoder")))
    text_model_2 = _plain_state_dict(_text_model(text_encoder_2), "text_encoder_2")
    checkpoint.update(clip_g_to_original(text_model_2, text_encoder_2.text_projection.weight))
    return checkpoint


def sdxl_components_from_checkpoint(
    checkpoint: dict[str, torch.Tensor], base_model: str | None = None, torch_dtype: torch.dtype | None = None
) -> dict[str, torch.nn.Module]:
    """A full single-file state dict -> Diffusers ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``.

    Architectures come from ``base_model`` (a Diffusers SDXL folder or Hub id; default: the bundled SDXL base
    configs); every tensor must find its parameter and every parameter its tensor.
    """
    unet = build_empty_component("unet", base_model)
    vae = build_empty_component("vae", base_model)
    text_encoder = build_empty_component("text_encoder", base_model)
    text_encoder_2 = build_empty_component("text_encoder_2", base_model)
    try:
        assign_weights(unet, unet_from_original(checkpoint, unet.config), "unet")
        assign_weights(vae, vae_from_original(checkpoint, vae.config), "vae")
        text_model_2, projection = clip_g_from_original(checkpoint)
    except (ValueError, KeyError) as err:
        raise ExportError(f"not an SDXL single-file checkpoint: {err}") from err
    assign_weights(_text_model(text_encoder), clip_l_from_original(checkpoint), "text_encoder")
    assign_weights(text_encoder_2.text_model, text_model_2, "text_encoder_2")
    assign_weights(text_encoder_2.text_projection, {"weight": projection}, "text_encoder_2.text_projection")
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return components if torch_dtype is None else {k: v.to(torch_dtype) for k, v in components.items()}
