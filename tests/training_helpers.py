"""Tiny stand-ins shared by the training tests: a differentiable reward, the tiny SDXL's conditioning, and a LoRA
saved by the trainer's own path."""

import torch

from diffusers_di_star.rewards.base import RewardModel
from diffusers_di_star.testing import TINY_PROMPTS
from diffusers_di_star.training import encode_prompts
from diffusers_di_star.training.config import DIStarConfig
from diffusers_di_star.training.models import setup_networks

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


def save_trainer_lora(family, network, folder, lora_alpha: float | None = None) -> dict:
    """The generator's LoRA (rank 2, the family's target modules, noise on every LoRA weight) on ``network``, saved
    to ``folder`` by the trainer's path (``setup_networks``, ``lora_state_dict``, the family's ``save_lora_weights``);
    returns its PEFT-keyed weights."""
    targets = family.lora_target_modules
    config = DIStarConfig(resolution=RESOLUTION, generator_lora_target_modules=targets,
                          assistant_lora_target_modules=targets, generator_lora_rank=2, assistant_lora_rank=2,
                          generator_lora_alpha=lora_alpha)
    networks = setup_networks(config, network)
    with torch.no_grad():
        for parameter in networks.trainable_parameters("generator"):
            parameter.add_(torch.randn_like(parameter))
    saved, metadata = networks.lora_state_dict("generator")
    family.save_lora_weights(str(folder), saved, metadata)
    return saved
