"""``scale * cos(text embedding, image embedding)`` with a transformers ``CLIPModel``: PickScore, CLIP score, HPSv2."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from .base import RewardModel
from .preprocessing import ClipImageTransform

__all__ = [
    "CLIP_MAX_TOKENS",
    "TRUNCATIONS",
    "ClipSimilarityReward",
    "check_truncation",
    "clip_image_embeddings",
    "load_clip_tokenizer_and_transform",
]

#: CLIP's context length; longer prompts are truncated, as every CLIP-based scorer does.
CLIP_MAX_TOKENS = 77
#: The two ways of cutting a longer prompt (see :class:`ClipSimilarityReward`).
TRUNCATIONS = ("clip", "torchmetrics")


class ClipSimilarityReward(RewardModel):
    """``scale * cos(text_projection(text), visual_projection(image))`` for each (image, prompt) pair.

    Args:
        clip: the CLIP model (frozen here).
        tokenizer: its tokenizer.
        transform: the image preprocessing the scorer was trained with, ``(B, 3, H, W)`` in ``[0, 1]`` -> pixel values.
        scale: a constant factor, or ``None`` for the model's own ``logit_scale.exp()`` (PickScore).
        truncation: how a prompt over 77 tokens is cut. ``"clip"``: the tokenizer truncates and keeps the end-of-text
            token the pooling reads (CLIP's and open_clip's tokenizers, the PickScore snippet, hpsv2).
            ``"torchmetrics"``: the prompt is tokenised in full and ``input_ids`` cut to the first 77, so the
            end-of-text token is dropped and the pooling reads another token, as torchmetrics' ``CLIPScore`` does.
            Prompts of 77 tokens or fewer are unaffected.

    Text embeddings are computed without gradients (prompts are discrete) and not cached: the text tower costs about
    a tenth of the image tower's forward and backward, so a cache would mostly cost memory.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer,
        transform: Callable[[torch.Tensor], torch.Tensor],
        scale: float | None,
        truncation: Literal["clip", "torchmetrics"] = "clip",
    ):
        super().__init__()
        check_truncation(truncation)
        self.clip = clip
        self.tokenizer = tokenizer
        self.transform = transform
        self.scale = scale
        self.truncation = truncation
        self.freeze()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of ``images`` in ``[0, 1]``."""
        return clip_image_embeddings(self.clip, self.transform(images).to(self.dtype))

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings."""
        if self.truncation == "clip":
            tokens = self.tokenizer(
                prompts, padding=True, truncation=True, max_length=CLIP_MAX_TOKENS, return_tensors="pt"
            )
        else:  # torchmetrics' _get_features: tokenise in full, then input_ids[..., :77] (verbose: no length warning)
            tokens = self.tokenizer(prompts, padding=True, return_tensors="pt", verbose=False)
        input_ids = tokens.input_ids[:, :CLIP_MAX_TOKENS].to(self.device)
        attention_mask = tokens.attention_mask[:, :CLIP_MAX_TOKENS].to(self.device)
        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(pooled).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cosine = (self.embed_images(images) * self.embed_prompts(prompts)).sum(dim=-1)
        scale = self.clip.logit_scale.exp().float() if self.scale is None else self.scale
        return scale * cosine

    def extra_repr(self) -> str:
        scale = "logit_scale.exp()" if self.scale is None else self.scale
        return f"scale={scale}, truncation={self.truncation!r}, transform={self.transform}"


def check_truncation(truncation: str) -> None:
    """Raise a one-line error unless ``truncation`` is one of :data:`TRUNCATIONS`."""
    if truncation not in TRUNCATIONS:
        raise ValueError(
            f"truncation (how prompts over 77 tokens are cut) must be one of {TRUNCATIONS}, got {truncation!r}."
        )


def load_clip_tokenizer_and_transform(
    processor: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
):
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
