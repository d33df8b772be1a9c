"""Human Preference Score v2 / v2.1 (Wu et al., 2023): an OpenCLIP ViT-H/14 fine-tuned on human preferences.

The official scorer (``hpsv2.score``) returns ``cos(text, image)`` of the open_clip model, about 0.25-0.35; papers and
the HPSv2 benchmark report it times 100 (DI*-SDXL-1step: 31.19 on HPSv2.1), and so does this reward. Images are
preprocessed as ``hpsv2.score`` does it (:class:`~.preprocessing.LetterboxImageTransform`: longest side to 224, zero
padding to a square), not with the shortest-side resize and centre crop of the other CLIP scorers.
"""

from __future__ import annotations

import os

from transformers import CLIPConfig, CLIPModel

from ..weights import load_state_dict_file
from .checkpoints import build_pretrained, resolve_checkpoint_file
from .clip_similarity import ClipSimilarityReward, load_clip_tokenizer_and_transform
from .open_clip_conversion import convert_open_clip_state_dict
from .pickscore import LAION_CLIP_VIT_H_14
from .preprocessing import LetterboxImageTransform

__all__ = ["HPS_CHECKPOINTS", "HPSv2Reward"]

#: File names in the Hub repo xswu/HPSv2, by version.
HPS_CHECKPOINTS = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}


class HPSv2Reward(ClipSimilarityReward):
    """``100 * cos(text, image)`` of the HPSv2 (or v2.1) model, converted from open_clip to transformers' CLIP."""

    @classmethod
    def from_pretrained(
        cls,
        version: str = "2.1",
        checkpoint: str | os.PathLike = "xswu/HPSv2",
        processor: str | os.PathLike = LAION_CLIP_VIT_H_14,
    ) -> HPSv2Reward:
        """Load HPS ``version`` ("2.0" or "2.1").

        Args:
            checkpoint: the Hub repo, a folder holding ``HPS_CHECKPOINTS[version]``, or the ``.pt`` /
                ``.safetensors`` file itself (an open_clip state dict, optionally wrapped as ``{"state_dict": ...}``).
            processor: the CLIP ViT-H/14 folder or Hub repo giving the architecture (``config.json``) and tokenizer.
        """
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"Unknown HPS version {version!r}: choose one of {sorted(HPS_CHECKPOINTS)}.")
        config = CLIPConfig.from_pretrained(processor)
        activations = {config.text_config.hidden_act, config.vision_config.hidden_act}
        if activations != {"gelu"}:
            raise ValueError(
                f"HPS checkpoints are open_clip ViT-H-14 models with GELU, but {processor} says {activations}."
            )
        state_dict = load_state_dict_file(resolve_checkpoint_file(checkpoint, HPS_CHECKPOINTS[version]))
        clip = build_pretrained(CLIPModel, config, convert_open_clip_state_dict(state_dict))
        # hpsv2.score's light_augmentation transform: longest side to 224, zero padding, OpenAI CLIP mean/std.
        image_size = config.vision_config.image_size
        tokenizer, transform = load_clip_tokenizer_and_transform(processor, LetterboxImageTransform(image_size))
        return cls(clip, tokenizer, transform, scale=100.0)
