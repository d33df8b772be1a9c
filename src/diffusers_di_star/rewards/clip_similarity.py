"""``scale * cos(text embedding, image embedding)`` with a transformers ``CLIPModel``: PickScore, CLIP score, HPSv2."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from .base import RewardModel
from .preprocessing import ClipImageTransform

__all__ = ["CLIP_MAX_TOKENS", "ClipSimilarityReward", "clip_image_embeddings", "load_clip_tokenizer_and_transform"]

#: CLIP's context length; longer prompts are truncated, as every CLIP-based scorer does.
CLIP_MAX_TOKENS = 77


class ClipSimilarityReward(RewardModel):
    """``scale * cos(text_projection(text), visual_projection(image))`` for each (image, prompt) pair.

    Args:
        clip: the CLIP model (frozen here).
        tokenizer: its tokenizer; prompts are truncated to 77 tokens.
        transform: the image preprocessing the scorer was trained with.
        scale: a constant factor, or ``None`` for the model's own ``logit_scale.exp()`` (PickScore).

    Text embeddings are computed without gradients (prompts are discrete) and not cached: the text tower costs about
    a tenth of the image tower's forward and backward, so a cache would mostly cost memory.
    """

    def __init__(self, clip: CLIPModel, tokenizer, transform: ClipImageTransform, scale: float | None):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.transform = transform
        self.scale = scale
        self.freeze()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of ``images`` in ``[0, 1]``."""
        return clip_image_embeddings(self.clip, self.transform(images).to(self.dtype))

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=CLIP_MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        pooled = self.clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(pooled).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cosine = (self.embed_images(images) * self.embed_prompts(prompts)).sum(dim=-1)
        scale = self.clip.logit_scale.exp().float() if self.scale is None else self.scale
        return scale * cosine

    def extra_repr(self) -> str:
        return f"scale={'logit_scale.exp()' if self.scale is None else self.scale}, transform={self.transform}"


def load_clip_tokenizer_and_transform(processor: str | os.PathLike, transform: ClipImageTransform | None = None):
    """The tokenizer of a CLIP processor folder or Hub repo, and its image preprocessing as a tensor transform.

    ``transform`` replaces the processor's own image preprocessing, for scorers trained with torchvision's.
    """
    tokenizer = AutoTokenizer.from_pretrained(processor)
    if transform is None:
        transform = ClipImageTransform.from_image_processor(CLIPImageProcessor.from_pretrained(processor))
    return tokenizer, transform


def clip_image_embeddings(clip: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised ``CLIPModel.get_image_features`` in float32, for any module with CLIP's ``vision_model`` and
    ``visual_projection`` (whose return type changed in transformers 5)."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(clip.visual_projection(pooled).float(), dim=-1)
