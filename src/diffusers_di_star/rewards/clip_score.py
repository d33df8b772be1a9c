"""CLIP score (Hessel et al., 2021): ``100 * cos(text, image)`` with OpenAI CLIP ViT-L/14 by default."""

from __future__ import annotations

import os

from transformers import CLIPModel

from .clip_similarity import ClipSimilarityReward, load_clip_tokenizer_and_transform

__all__ = ["OPENAI_CLIP_VIT_L_14", "ClipScoreReward"]

OPENAI_CLIP_VIT_L_14 = "openai/clip-vit-large-patch14"


class ClipScoreReward(ClipSimilarityReward):
    """``100 * cos(text, image)``, the "CLIP Score" of the DI* tables (about 30-35 for prompt-faithful images).

    Not clamped at 0, unlike ``torchmetrics``' ``CLIPScore`` (``max(100 * cos, 0)``): the clamp would zero the
    gradient of badly aligned images, and the two agree whenever the cosine is positive, as it is for real pairs.
    The preprocessing is the model's own ``CLIPImageProcessor``, as in torchmetrics.
    """

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike = OPENAI_CLIP_VIT_L_14, processor: str | os.PathLike | None = None
    ) -> ClipScoreReward:
        """``model``: any CLIPModel Hub id or folder; ``processor`` defaults to the model's own."""
        tokenizer, transform = load_clip_tokenizer_and_transform(model if processor is None else processor)
        return cls(CLIPModel.from_pretrained(model), tokenizer, transform, scale=100.0)
