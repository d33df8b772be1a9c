"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): a linear MLP on CLIP ViT-L/14.

``score = MLP(normalize(clip_image_embedding))``, roughly 1-10 (the AVA rating scale); prompts are ignored.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPModel

from ..weights import load_state_dict_file
from .base import RewardModel
from .checkpoints import resolve_checkpoint_file
from .clip_score import OPENAI_CLIP_VIT_L_14
from .clip_similarity import clip_image_embeddings
from .mlp_head import PreferenceMLP
from .preprocessing import ClipImageTransform

__all__ = ["AESTHETIC_FILENAME", "AestheticReward"]

#: The v2 weights trained on SAC + LAION-Logos + AVA with an MSE loss, the ones everybody reports.
AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticReward(RewardModel):
    """Aesthetic score of each image; the prompt does not matter."""

    def __init__(self, clip: CLIPModel, head: PreferenceMLP, transform: ClipImageTransform):
        super().__init__()
        self.vision_model = clip.vision_model  # the text tower is not needed, and not kept
        self.visual_projection = clip.visual_projection
        self.head = head
        self.transform = transform
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "camenduru/improved-aesthetic-predictor",
        clip: str | os.PathLike = OPENAI_CLIP_VIT_L_14,
    ) -> AestheticReward:
        """Load the MLP head and the CLIP image tower it was trained on.

        Args:
            model: a Hub repo or folder holding ``sac+logos+ava1-l14-linearMSE.pth``, or a head state dict file.
                The original file is on GitHub only; the default repo is a Hub mirror of it.
            clip: the CLIP model whose normalised image embeddings the head reads (OpenAI ViT-L/14).
        """
        state_dict = load_state_dict_file(resolve_checkpoint_file(model, AESTHETIC_FILENAME))
        head = PreferenceMLP.from_state_dict(state_dict)
        clip_model = CLIPModel.from_pretrained(clip)
        # The predictor was trained on embeddings from the `clip` package's torchvision preprocessing.
        return cls(clip_model, head, ClipImageTransform.torchvision(clip_model.config.vision_config.image_size))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = clip_image_embeddings(self, self.transform(images).to(self.dtype))
        return self.head(embeddings.to(self.dtype))
