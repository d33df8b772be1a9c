"""CLIP score (Hessel et al., 2021): ``100 * cos(text, image)`` with OpenAI CLIP ViT-L/14 by default."""

from __future__ import annotations

import os
from typing import Literal

from transformers import CLIPModel

from .clip_similarity import ClipSimilarityReward, check_truncation, load_clip_tokenizer_and_transform

__all__ = ["OPENAI_CLIP_VIT_L_14", "ClipScoreReward"]

OPENAI_CLIP_VIT_L_14 = "openai/clip-vit-large-patch14"


class ClipScoreReward(ClipSimilarityReward):
    """``100 * cos(text, image)``, the "CLIP Score" of the DI* tables (about 30-35 for prompt-faithful images).

    As torchmetrics' ``CLIPScore`` computes it, which is what papers report: the model's own ``CLIPImageProcessor``,
    and prompts over 77 tokens cut as torchmetrics cuts them (``truncation="torchmetrics"``: the first 77 token ids,
    end-of-text dropped); ``truncation="clip"`` keeps the end-of-text token instead, as CLIP's tokenizer does.
    Not clamped at 0, unlike torchmetrics (``max(100 * cos, 0)``): the clamp would zero the gradient of badly aligned
    images; the two agree whenever the cosine is positive, as it is for real pairs.
    """

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = OPENAI_CLIP_VIT_L_14,
        processor: str | os.PathLike | None = None,
        truncation: Literal["clip", "torchmetrics"] = "torchmetrics",
    ) -> ClipScoreReward:
        """``model``: any CLIPModel Hub id or folder; ``processor`` defaults to the model's own; ``truncation``: how a
        prompt over 77 tokens is cut (see :class:`ClipSimilarityReward`)."""
        check_truncation(truncation)
        tokenizer, transform = load_clip_tokenizer_and_transform(model if processor is None else processor)
        return cls(CLIPModel.from_pretrained(model), tokenizer, transform, scale=100.0, truncation=truncation)
