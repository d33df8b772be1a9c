"""SD1.5 and SD2.x (ε- or v-prediction UNet, one CLIP text encoder, no added conditioning; docs/math.md §12).

As DMD2 runs SD1.5 through its SDXL code path, only the conditioning differs: the UNet sees the text encoder's last
hidden states, and ∅ is the encoding of the empty prompt (what ``StableDiffusionPipeline`` uses for CFG).
SD1.5 is ``epsilon``; SD2.x-768 (e.g. SD2.1) is ``v_prediction``; both are read from the scheduler config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import ModelFamily, TensorConditioning, token_ids

__all__ = ["SDConditioning", "SDFamily", "encode_sd_prompts"]


@dataclass
class SDConditioning(TensorConditioning):
    """c: the prompts' text-encoder hidden states ``[B, 77, D]``; ∅: the empty prompt's, one row per sample."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor

    def unconditional(self) -> SDConditioning:
        return SDConditioning(self.negative_prompt_embeds, self.negative_prompt_embeds)

    def network_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.prompt_embeds}


@torch.no_grad()
def encode_sd_prompts(prompts: Sequence[str], tokenizer, text_encoder: torch.nn.Module) -> SDConditioning:
    """As ``StableDiffusionPipeline.encode_prompt`` without clip skip: the last hidden states of the prompts and of
    "" (∅), padded to the tokenizer's length; one text-encoder call."""
    input_ids = token_ids(tokenizer, [*prompts, ""], tokenizer.model_max_length, text_encoder.device)
    embeds = text_encoder(input_ids)[0]
    return SDConditioning(embeds[:-1], embeds[-1:].expand(len(prompts), -1, -1))


class SDFamily(ModelFamily):
    """SD1.x and SD2.x folders (``StableDiffusionPipeline``), ε or v."""

    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_name = "DIStarSDPipeline"
    network_class_name = "UNet2DConditionModel"
    display_name = "Stable Diffusion 1.x/2.x"
    hub_tag = "stable-diffusion"
    license = ("other", "the licence of the base model (CreativeML Open RAIL-M for SD1.x, Open RAIL++-M for SD2.x)")

    @classmethod
    def load_text_models(cls, name: str, revision: str | None = None, variant: str | None = None):
        from transformers import AutoTokenizer, CLIPTextModel

        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(
            name, subfolder="text_encoder", revision=revision, variant=variant
        )
        return [tokenizer], [text_encoder]

    def encode(self, prompts: Sequence[str], resolution: int) -> SDConditioning:
        return encode_sd_prompts(prompts, self.tokenizers[0], self.text_encoders[0])

    def pipeline_kwargs(self) -> dict:
        return {
            "text_encoder": self.text_encoders[0],
            "tokenizer": self.tokenizers[0],
            "safety_checker": None,
            "feature_extractor": None,
        }
