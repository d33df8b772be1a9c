"""open_clip ``CLIP`` state dict (ViT image tower, default text tower) -> transformers ``CLIPModel`` state dict.

HPSv2/HPSv2.1 are released as open_clip ViT-H-14 state dicts; open_clip pulls torchvision, which this project keeps
out of its default install. The two architectures compute the same function (pre-LayerNorm transformer blocks,
class-token pooling after ``ln_post``, causal text transformer pooled at the end-of-text token, bias-free projections);
only the names and three layouts differ:

* attention: open_clip's fused ``in_proj_weight`` / ``in_proj_bias`` are the q, k and v projections stacked in rows;
* projections: open_clip stores ``x @ proj`` matrices (``visual.proj``, ``text_projection``), transformers stores
  ``nn.Linear`` weights, the transpose;
* embeddings: open_clip's ``positional_embedding`` tensors become ``nn.Embedding`` weights, same values.

The activation is not in the state dict: open_clip ViT-H-14 uses GELU, so the config must say ``hidden_act="gelu"``
(laion/CLIP-ViT-H-14-laion2B-s32B-b79K's does). Layer scale, attention pooling and custom text towers are not
supported and fail with their names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["convert_open_clip_state_dict"]

_TOWERS = {"visual.": "vision_model.", "": "text_model."}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RENAMED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def convert_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an open_clip ``CLIP`` state dict into transformers ``CLIPModel`` names."""
    converted, unknown = {}, []
    for name, tensor in state_dict.items():
        if name in _RENAMED:
            converted[_RENAMED[name]] = tensor
        elif name in _TRANSPOSED:
            converted[_TRANSPOSED[name]] = tensor.t().contiguous()
        elif (block := _BLOCK.match(name)) and (renamed := _convert_block_tensor(*block.groups(), tensor)):
            converted.update(renamed)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"Unsupported open_clip weights {unknown[:8]} ({len(unknown)} in all): only plain ViT CLIPs convert."
        )
    return converted


def _convert_block_tensor(tower: str | None, index: str, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"{_TOWERS[tower or '']}encoder.layers.{index}."
    module, _, kind = rest.rpartition(".")
    if module == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
        suffix = kind.removeprefix("in_proj_")
        q, k, v = tensor.chunk(3, dim=0)
        return {f"{prefix}self_attn.{proj}_proj.{suffix}": part for proj, part in zip("qkv", (q, k, v), strict=True)}
    if module in _BLOCK_NAMES:
        return {f"{prefix}{_BLOCK_NAMES[module]}.{kind}": tensor}
    return {}
