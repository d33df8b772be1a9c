"""SDXL (ε- or v-prediction UNet, two CLIP text encoders, micro-conditioning): the first family (docs/math.md §1).

The prediction type is the checkpoint's ``scheduler_config.json`` ``prediction_type``: SDXL base and DMD2 are
``epsilon``; SDXL v-prediction finetunes say ``v_prediction``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..export import load_generator_unet
from .base import ModelFamily, TensorConditioning, token_ids

__all__ = ["SDXLConditioning", "SDXLFamily", "encode_prompts"]


@dataclass
class SDXLConditioning(TensorConditioning):
    """c of docs/math.md §1: SDXL prompt embeddings, pooled embeddings and micro-conditioning ``add_time_ids``."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    time_ids: torch.Tensor

    def unconditional(self) -> SDXLConditioning:
        """∅: zero prompt and pooled embeddings, same ``add_time_ids`` (SDXL's force_zeros_for_empty_prompt, DMD2)."""
        return SDXLConditioning(
            torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled_prompt_embeds), self.time_ids
        )

    def network_kwargs(self) -> dict:
        added = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.prompt_embeds, "added_cond_kwargs": added}


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], resolution: int
) -> SDXLConditioning:
    """SDXL text conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` computes it without CFG or clip skip.

    Penultimate hidden states of both encoders concatenated, the projected pooled output of the second, and
    ``add_time_ids = (H, W, 0, 0, H, W)`` for square ``resolution`` training images without cropping.
    """
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        input_ids = token_ids(tokenizer, prompts, tokenizer.model_max_length, text_encoder.device)
        output = text_encoder(input_ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled = output[0]
    prompt_embeds = torch.cat(hidden_states, dim=-1)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=prompt_embeds.device)
    return SDXLConditioning(prompt_embeds, pooled, time_ids.to(prompt_embeds.dtype).repeat(len(prompts), 1))


class SDXLFamily(ModelFamily):
    """SDXL base and its finetunes (ε or v), DMD2 and DI* generators: ``StableDiffusionXLPipeline`` folders."""

    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    pipeline_name = "DIStarSDXLPipeline"
    network_class_name = "UNet2DConditionModel"
    display_name = "SDXL"
    hub_tag = "stable-diffusion-xl"
    license = ("openrail++", "CreativeML Open RAIL++-M, the licence of SDXL, which these weights derive from")

    @classmethod
    def load_text_models(cls, name: str, revision: str | None = None, variant: str | None = None):
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        subfolders = ("tokenizer", "tokenizer_2")
        tokenizers = [AutoTokenizer.from_pretrained(name, subfolder=sub, revision=revision) for sub in subfolders]
        kwargs = {"revision": revision, "variant": variant}
        text_encoders = [
            CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kwargs),
            CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **kwargs),
        ]
        return tokenizers, text_encoders

    @classmethod
    def load_generator(
        cls, name: str, base_model: str | None = None, weight_name: str | None = None, variant: str | None = None
    ):
        """Any published SDXL generator layout (DMD2 ``.bin``, single files, folders; :func:`load_generator_unet`)."""
        return load_generator_unet(name, base_model=base_model, weight_name=weight_name, variant=variant)

    def encode(self, prompts: Sequence[str], resolution: int) -> SDXLConditioning:
        return encode_prompts(prompts, self.tokenizers, self.text_encoders, resolution)

    def pipeline_kwargs(self) -> dict:
        (tokenizer, tokenizer_2), (text_encoder, text_encoder_2) = self.tokenizers, self.text_encoders
        return {
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2,
            "add_watermarker": False,
        }
