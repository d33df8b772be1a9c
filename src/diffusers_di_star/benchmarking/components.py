"""SDXL modules with random weights, built from the shipped configs: full size for GPUs, a reduced size for CPUs.

Speed and memory do not depend on weight values, so no checkpoint is needed. ``full`` is SDXL base exactly
(:mod:`diffusers_di_star.configs`), plus TAESDXL's architecture (diffusers' default ``AutoencoderTiny``) and the
CLIP ViT-H/14 that PickScore fine-tunes. ``reduced`` overrides the widths and depths of the same configs (UNet
channels ÷10, VAE and tiny-VAE channels ÷16, text encoders 2 and 4 layers) so that a 256² image runs on a small CPU
with about the same UNet : VAE FLOP proportion as full size; it measures ratios, never absolute speed. Tokenizers
are the package's tiny offline CLIP BPEs, padded to 77 tokens, so the text encoders do the real amount of work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..configs import load_sdxl_config
from ..rewards import PickScoreReward
from ..rewards.preprocessing import ClipImageTransform
from ..rewards.testing import get_tiny_clip_config, get_tiny_clip_tokenizer
from ..testing import get_tiny_tokenizer

__all__ = [
    "CLIP_VIT_H_14",
    "SIZES",
    "ModelSize",
    "build_pickscore_reward",
    "build_scheduler",
    "build_sdxl_components",
    "build_text_encoders",
    "build_tiny_vae",
    "build_unet",
    "build_vae",
    "component_config",
]

#: laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the tower PickScore and HPSv2 fine-tune (its published config).
CLIP_VIT_H_14 = {
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "image_size": 224,
        "hidden_act": "gelu",
    },
    "projection_dim": 1024,
}
_PICKSCORE_IMAGE_SIZE = 224

_REDUCED_TIME_EMBED_DIM, _REDUCED_TEXT_WIDTHS = 32, (64, 128)
_REDUCED_OVERRIDES = {
    "unet": {
        "block_out_channels": [32, 64, 128],
        "attention_head_dim": [1, 2, 4],
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": sum(_REDUCED_TEXT_WIDTHS),
        "addition_time_embed_dim": _REDUCED_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * _REDUCED_TIME_EMBED_DIM + _REDUCED_TEXT_WIDTHS[1],
        "sample_size": 32,
    },
    "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 256},
    "text_encoder": {
        "hidden_size": _REDUCED_TEXT_WIDTHS[0],
        "intermediate_size": 4 * _REDUCED_TEXT_WIDTHS[0],
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
    },
    "text_encoder_2": {
        "hidden_size": _REDUCED_TEXT_WIDTHS[1],
        "intermediate_size": 4 * _REDUCED_TEXT_WIDTHS[1],
        "num_attention_heads": 2,
        "num_hidden_layers": 4,
        "projection_dim": _REDUCED_TEXT_WIDTHS[1],
    },
    "tiny_vae": {"encoder_block_out_channels": [4, 4, 4, 4], "decoder_block_out_channels": [4, 4, 4, 4]},
}


@dataclass(frozen=True)
class ModelSize:
    """A benchmark model size: its native resolution, the LoRA rank its training uses, and config overrides."""

    name: str
    resolution: int
    lora_rank: int
    overrides: dict[str, dict] = field(default_factory=dict)


SIZES = {
    "full": ModelSize("full", resolution=1024, lora_rank=64),
    "reduced": ModelSize("reduced", resolution=256, lora_rank=4, overrides=_REDUCED_OVERRIDES),
}


def component_config(size: ModelSize, name: str) -> dict:
    """The config of one SDXL component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) at ``size``."""
    return load_sdxl_config(name) | size.overrides.get(name, {})


def _ready(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(dtype=dtype).eval().requires_grad_(False)


def build_unet(size: ModelSize, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """SDXL's UNet at ``size`` with random weights, created directly on ``device`` (frozen, eval mode)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return _ready(UNet2DConditionModel.from_config(component_config(size, "unet")), dtype)


def build_tiny_vae(size: ModelSize, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """TAESDXL's architecture (diffusers' default ``AutoencoderTiny``) at ``size``, for previews."""
    torch.manual_seed(seed)
    with torch.device(device):
        return _ready(AutoencoderTiny(**size.overrides.get("tiny_vae", {})), dtype)


def build_vae(size: ModelSize, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> AutoencoderKL:
    """SDXL's VAE at ``size`` (``force_upcast=True``, as published), random weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        return _ready(AutoencoderKL.from_config(component_config(size, "vae")), dtype)


def build_text_encoders(size: ModelSize, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """``(tokenizers, text_encoders)``: SDXL's CLIP-L and bigG text encoders at ``size``, with tiny offline BPEs."""
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**component_config(size, "text_encoder")))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**component_config(size, "text_encoder_2")))
    tokenizers = (get_tiny_tokenizer(), get_tiny_tokenizer(pad_token="!"))  # SDXL's second tokenizer pads with "!"
    return tokenizers, (_ready(text_encoder, dtype), _ready(text_encoder_2, dtype))


def build_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(load_sdxl_config("scheduler"))


def build_sdxl_components(size: ModelSize, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Keyword arguments of ``StableDiffusionXLPipeline`` (and ours): every SDXL module at ``size``, random weights."""
    (tokenizer, tokenizer_2), (text_encoder, text_encoder_2) = build_text_encoders(size, device, dtype, seed)
    return {
        "vae": build_vae(size, device, dtype, seed),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": build_unet(size, device, dtype, seed),
        "scheduler": build_scheduler(),
    }


def build_pickscore_reward(size: ModelSize, device: torch.device | str, seed: int = 0) -> PickScoreReward:
    """PickScore (CLIP ViT-H/14 at full size, the package's tiny CLIP at reduced size), random weights, float32."""
    tokenizer = get_tiny_clip_tokenizer()
    if size.overrides:  # a reduced size: the package's tiny CLIP
        config = get_tiny_clip_config(len(tokenizer))
    else:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = CLIPConfig(
            text_config=CLIP_VIT_H_14["text_config"] | ids | {"pad_token_id": tokenizer.pad_token_id},
            vision_config=CLIP_VIT_H_14["vision_config"],
            projection_dim=CLIP_VIT_H_14["projection_dim"],
        )
    transform = ClipImageTransform(size=_PICKSCORE_IMAGE_SIZE, crop_size=(_PICKSCORE_IMAGE_SIZE,) * 2)
    torch.manual_seed(seed)
    with torch.device(device):
        clip = CLIPModel(config)
    return PickScoreReward(clip, tokenizer, transform, scale=None)
