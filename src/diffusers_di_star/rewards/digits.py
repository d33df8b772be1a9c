"""``boldness``: a differentiable preference for bold strokes, the reward of the MNIST mini study (docs/mini_study.md).

r(x) = mean over pixels of σ((g − ½)/τ), g the grey level (mean of the RGB channels) and τ = 0.1: the fraction of the
image covered by ink, softly thresholded so the gradient reaches every pixel. Bright strokes on a dark background,
as MNIST. It needs no weights. Like a learned preference score it can be hacked: a white square scores 1; the mini
study's judges (a digit classifier and its feature space) show whether a regulariser stops that.
"""

from __future__ import annotations

import torch

from .base import RewardModel

__all__ = ["BoldnessReward"]


class BoldnessReward(RewardModel):
    """r(x) = mean σ((grey(x) − threshold)/temperature) ∈ (0, 1); higher = more ink."""

    def __init__(self, threshold: float = 0.5, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.threshold, self.temperature = float(threshold), float(temperature)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        grey = images.float().mean(dim=1)
        return torch.sigmoid((grey - self.threshold) / self.temperature).mean(dim=(1, 2))
