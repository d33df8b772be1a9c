"""ImageReward (Xu et al., 2023): BLIP image-text encoder + MLP head, trained on human rankings of generations.

Ported onto transformers' BLIP modules instead of depending on the ``image-reward`` package, which pins old timm and
fairscale (timm pulls torchvision, which breaks this project's CPU torch) and imports helpers that transformers 5 no
longer has. The official checkpoint ``THUDM/ImageReward/ImageReward.pt`` is a plain state dict of
``blip.visual_encoder.*`` (a timm-style ViT-L/16), ``blip.text_encoder.*`` (BLIP's BERT with cross-attention, the
same names as transformers' ``BlipTextModel``) and ``mlp.*``; the image tower converts by renaming only.

``score = (MLP(text_encoder(prompt, cross-attending to ViT(image))[CLS]) - 0.167) / 1.033``, as ``ImageReward.score``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import torch
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from ..weights import load_state_dict_file
from .base import RewardModel
from .checkpoints import build_pretrained, resolve_checkpoint_file
from .mlp_head import PreferenceMLP
from .preprocessing import ClipImageTransform

__all__ = ["ImageReward", "convert_image_reward_state_dict", "image_reward_configs"]

#: Normalisation of the raw MLP output, fixed in ImageReward's code.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
#: Prompts are padded or truncated to 35 BERT tokens, as in ImageReward's code.
IMAGE_REWARD_MAX_TOKENS = 35
#: BLIP's ViTs (base 768/12, large 1024/16) use 64-dimensional attention heads; the state dict does not say.
_BLIP_HEAD_DIM = 64

_VISION_NAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]
#: BLIP's contrastive projections and BERT's position-id buffer: saved in the checkpoint, unused by the score.
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")


class ImageReward(RewardModel):
    """ImageReward score of each (image, prompt) pair, roughly -2 to 2 (normalised by fixed constants)."""

    def __init__(
        self,
        vision: BlipVisionModel,
        text: BlipTextModel,
        head: PreferenceMLP,
        tokenizer,
        transform: ClipImageTransform,
    ):
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenizer = tokenizer
        self.transform = transform
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "THUDM/ImageReward",
        tokenizer: str | os.PathLike = "google-bert/bert-base-uncased",
    ) -> ImageReward:
        """Load the official checkpoint.

        Args:
            model: the Hub repo or a folder holding ``ImageReward.pt`` and ``med_config.json``, or the ``.pt`` file
                itself with ``med_config.json`` beside it.
            tokenizer: BLIP's BERT tokenizer (bert-base-uncased).
        """
        model = os.fspath(model)
        checkpoint = load_state_dict_file(resolve_checkpoint_file(model, "ImageReward.pt"))
        config_location = os.path.dirname(model) if os.path.isfile(model) else model
        with open(resolve_checkpoint_file(config_location, "med_config.json"), encoding="utf-8") as file:
            med_config = json.load(file)
        weights = convert_image_reward_state_dict(checkpoint)
        vision_config, text_config = image_reward_configs(weights["vision"], med_config)
        vision = build_pretrained(BlipVisionModel, vision_config, weights["vision"])
        text = build_pretrained(BlipTextModel, text_config, weights["text"], add_pooling_layer=False)
        # ImageReward preprocesses with torchvision: Resize(224, bicubic) + CenterCrop(224) + OpenAI CLIP mean/std.
        transform = ClipImageTransform.torchvision(vision_config.image_size)
        head = PreferenceMLP.from_state_dict(weights["head"])
        return cls(vision, text, head, AutoTokenizer.from_pretrained(tokenizer), transform)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixel_values = self.transform(images).to(self.dtype)
        image_states = self.vision(pixel_values=pixel_values).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGE_REWARD_MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        text_states = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return (self.head(text_states[:, 0]) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def convert_image_reward_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split ImageReward's checkpoint into ``BlipVisionModel``, ``BlipTextModel`` and MLP-head state dicts."""
    parts = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for name, tensor in state_dict.items():
        if _UNUSED.match(name):
            continue
        if name.startswith("blip.visual_encoder."):
            vision_name = _rename_vision(name.removeprefix("blip.visual_encoder."))
            if vision_name is None:
                unknown.append(name)
            else:
                parts["vision"][vision_name] = tensor
        elif name.startswith("blip.text_encoder."):
            parts["text"][name.removeprefix("blip.text_encoder.")] = tensor
        elif name.startswith("mlp."):
            parts["head"][name.removeprefix("mlp.")] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Unexpected weights in the ImageReward checkpoint: {unknown[:8]} ({len(unknown)} in all).")
    return parts


def image_reward_configs(
    vision_state_dict: Mapping[str, torch.Tensor], med_config: Mapping
) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """The BLIP configurations: the image tower's read from its (converted) weights, the text encoder's from
    ``med_config.json``, whose ``encoder_width`` BLIP overrides with the image tower's width."""
    width = vision_state_dict["embeddings.class_embedding"].shape[-1]
    patch_size = vision_state_dict["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision_state_dict["embeddings.position_embedding"].shape[1] - 1)
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(
            {name.split(".")[2] for name in vision_state_dict if name.startswith("encoder.layers.")}
        ),
        num_attention_heads=width // _BLIP_HEAD_DIM,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # timm's ViT in BLIP
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config["hidden_act"],
        layer_norm_eps=med_config["layer_norm_eps"],
        pad_token_id=med_config["pad_token_id"],
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; the forward pass runs bidirectionally (is_decoder=False)
    )
    return vision_config, text_config


def _rename_vision(name: str) -> str | None:
    for pattern, replacement in _VISION_NAMES:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return None
