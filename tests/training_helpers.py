"""Tiny stand-ins shared by the training tests: a differentiable reward and the tiny SDXL's conditioning."""

import torch

from diffusers_di_star.rewards.base import RewardModel
from diffusers_di_star.testing import TINY_PROMPTS
from diffusers_di_star.training import encode_prompts

PROMPTS = list(TINY_PROMPTS[:2])
RESOLUTION = 64


class PatternReward(RewardModel):
    """r = cosine similarity of the centred image and a fixed ±1 pattern: learnable through the tiny VAE.

    (The tiny VAE's group norms make the mean colour of its output almost independent of the latent, so a plain
    brightness reward would give no learning signal; the spatial pattern does.)
    """

    def __init__(self, size: int = RESOLUTION, seed: int = 0):
        super().__init__()
        pattern = torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed)).sign()
        self.register_buffer("pattern", pattern)

    def score(self, images, prompts):
        centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
        return torch.nn.functional.cosine_similarity(centred.flatten(1), self.pattern.flatten()[None], dim=1)


def tiny_conditioning(components, prompts=PROMPTS):
    return encode_prompts(
        prompts,
        [components["tokenizer"], components["tokenizer_2"]],
        [components["text_encoder"], components["text_encoder_2"]],
        RESOLUTION,
    )
