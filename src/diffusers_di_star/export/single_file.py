"""Single-file checkpoints (ComfyUI "Load Checkpoint", A1111/Forge, kohya) <-> Diffusers components, for SDXL and
SD1.x/2.x.

A full checkpoint holds the UNet, the VAE and the text encoder(s) under their original prefixes
(:mod:`.original_keys`): SDXL's CLIP-L and bigG under ``conditioner.embedders.{0,1}``, SD1.x's CLIP-L or SD2.x's
OpenCLIP ViT-H under ``cond_stage_model``, chosen by :func:`.original_keys.unet_version` as ComfyUI chooses the text
encoder by the UNet. A UNet-only file holds the ``model.diffusion_model.*`` part alone, with the prefix (Diffusers'
``UNet2DConditionModel.from_single_file`` needs it) or without (every ComfyUI UNet loader reads that): see
:func:`.exporters.export_comfyui_unet`.
"""

from __future__ import annotations

import torch

from .files import ExportError
from .loading import assign_weights, build_empty_component
from .original_keys import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    SD1_CLIP_PREFIX,
    SD2_CLIP_PREFIX,
    clip_g_from_original,
    clip_g_to_original,
    clip_l_from_original,
    clip_l_to_original,
    unet_from_original,
    unet_to_original,
    unet_version,
    vae_from_original,
    vae_to_original,
)

__all__ = ["unet_checkpoint_state_dict", "checkpoint_state_dict", "components_from_checkpoint"]

#: The activation of each text-encoder layout: OpenAI's CLIP-L uses quick GELU, open_clip's models exact GELU.
_CLIP_ACTIVATIONS = {"sd1": "quick_gelu", "sd2": "gelu"}


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


def _check_text_encoder(version: str, text_encoder) -> None:
    # A loader builds SD1.x's encoder with quick GELU and SD2.x's with GELU, whatever the file's weights were.
    activation = text_encoder.config.hidden_act
    if activation != _CLIP_ACTIVATIONS[version]:
        layout = {"sd1": "SD1.x (CLIP-L)", "sd2": "SD2.x (OpenCLIP)"}[version]
        raise ExportError(
            f"the UNet has the {layout} layout, but the text encoder uses hidden_act={activation!r} where "
            f"{layout} loaders use {_CLIP_ACTIVATIONS[version]!r}: ComfyUI/A1111 would compute other embeddings."
        )


def unet_checkpoint_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Diffusers SDXL or SD1.x/2.x UNet -> the ``model.diffusion_model.*`` state dict (same tensors, original
    names)."""
    return unet_to_original(_plain_state_dict(unet, "unet"), unet.config)


def checkpoint_state_dict(components) -> dict[str, torch.Tensor]:
    """Pipeline components (a pipeline, or a dict with ``unet``, ``vae``, ``text_encoder`` and, for SDXL,
    ``text_encoder_2``) -> one single-file state dict with every part, as ComfyUI's Load Checkpoint and A1111/Forge
    read it."""
    get = components.get if isinstance(components, dict) else lambda name: getattr(components, name, None)
    unet, vae, text_encoder = get("unet"), get("vae"), get("text_encoder")
    checkpoint = unet_checkpoint_state_dict(unet)
    checkpoint.update(vae_to_original(vae.state_dict(), vae.config))
    text_model = _plain_state_dict(_text_model(text_encoder), "text_encoder")
    version = unet_version(unet.config)
    if version == "sdxl":
        text_encoder_2 = get("text_encoder_2")
        checkpoint.update(clip_l_to_original(text_model))
        text_model_2 = _plain_state_dict(_text_model(text_encoder_2), "text_encoder_2")
        checkpoint.update(clip_g_to_original(text_model_2, text_encoder_2.text_projection.weight))
        return checkpoint
    _check_text_encoder(version, text_encoder)
    if version == "sd1":
        checkpoint.update(clip_l_to_original(text_model, SD1_CLIP_PREFIX))
    else:
        checkpoint.update(clip_g_to_original(text_model, None, SD2_CLIP_PREFIX))
    return checkpoint


def components_from_checkpoint(
    checkpoint: dict[str, torch.Tensor], base_model: str | None = None, torch_dtype: torch.dtype | None = None
) -> dict[str, torch.nn.Module]:
    """A full single-file state dict -> Diffusers ``unet``, ``vae``, ``text_encoder`` (and SDXL's
    ``text_encoder_2``).

    Architectures come from ``base_model`` (a Diffusers folder or Hub id; default: the bundled SDXL base configs,
    so an SD1.x/2.x file needs it); every tensor must find its parameter and every parameter its tensor.
    """
    sdxl = any(k.startswith(CLIP_G_PREFIX) for k in checkpoint)
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if sdxl else ("unet", "vae", "text_encoder")
    components = {name: build_empty_component(name, base_model) for name in names}
    unet, text_model = components["unet"], _text_model(components["text_encoder"])
    try:
        assign_weights(unet, unet_from_original(checkpoint, unet.config), "unet")
        assign_weights(components["vae"], vae_from_original(checkpoint, components["vae"].config), "vae")
        if not sdxl and unet_version(unet.config) == "sd2":
            assign_weights(text_model, clip_g_from_original(checkpoint, SD2_CLIP_PREFIX)[0], "text_encoder")
        else:
            prefix = CLIP_L_PREFIX if sdxl else SD1_CLIP_PREFIX
            assign_weights(text_model, clip_l_from_original(checkpoint, prefix), "text_encoder")
        if sdxl:
            text_model_2, projection = clip_g_from_original(checkpoint)
            text_encoder_2 = components["text_encoder_2"]
            assign_weights(text_encoder_2.text_model, text_model_2, "text_encoder_2")
            assign_weights(text_encoder_2.text_projection, {"weight": projection}, "text_encoder_2.text_projection")
    except (ValueError, KeyError) as err:
        raise ExportError(f"not a single-file checkpoint of this architecture: {err}") from err
    return components if torch_dtype is None else {k: v.to(torch_dtype) for k, v in components.items()}
