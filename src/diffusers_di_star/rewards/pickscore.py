"""PickScore (Kirstain et al., 2023, "Pick-a-Pic"): a CLIP-H fine-tuned on human preferences between generations."""

from __future__ import annotations

import os

from transformers import CLIPModel

from .clip_similarity import ClipSimilarityReward, load_clip_tokenizer_and_transform

__all__ = ["LAION_CLIP_VIT_H_14", "PickScoreReward"]

#: The OpenCLIP ViT-H/14 that PickScore and HPSv2 fine-tune; its processor (tokenizer + image preprocessing) is theirs.
LAION_CLIP_VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(ClipSimilarityReward):
    """``logit_scale.exp() * cos(text, image)``, as in the official snippet (typically 18-23 for SDXL images)."""

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "yuvalkirstain/PickScore_v1",
        processor: str | os.PathLike = LAION_CLIP_VIT_H_14,
    ) -> PickScoreReward:
        """``model``: a CLIPModel Hub id or folder; ``processor``: the CLIP processor it was trained with."""
        tokenizer, transform = load_clip_tokenizer_and_transform(processor)
        return cls(CLIPModel.from_pretrained(model), tokenizer, transform, scale=None)
