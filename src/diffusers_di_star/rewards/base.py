"""The one interface every reward implements, and the weighted sum of rewards (itself a reward)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["RewardModel", "WeightedSumReward"]


class RewardModel(nn.Module, ABC):
    """A frozen scorer ``r(images, prompts) -> Tensor[B]``; higher is better.

    ``images`` is a float tensor in ``[0, 1]``, shape ``(B, 3, H, W)``, any ``H`` and ``W``: every reward does its own
    resizing, cropping and normalisation on tensors, so when :attr:`differentiable` is true the gradient of the score
    reaches the pixels (and through the VAE decoder, the generator). ``prompts`` is a list of ``B`` strings.

    Parameters are frozen and the module stays in eval mode (``.train()`` is a no-op), so dropout never fires inside a
    training loop that calls ``.train()`` on everything. ``.to(device, dtype)`` works as for any module; scores are
    returned in float32. Subclasses implement :meth:`score`.
    """

    #: Whether gradients of the score reach the input pixels; a reward that is not is run under ``torch.no_grad()``.
    differentiable: bool = True

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores for already validated inputs, shape ``(B,)``."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _check_inputs(images, prompts)
        if self.differentiable:
            return self.score(images, prompts).float()
        with torch.no_grad():
            return self.score(images, prompts).float()

    def freeze(self) -> RewardModel:
        """Turn off gradients for every parameter and switch to eval mode; returns ``self``."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> RewardModel:
        # A reward is never trained: keep dropout off even when a parent module is put in training mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), torch.empty(0)).dtype


class WeightedSumReward(RewardModel):
    """``sum_i weight_i * reward_i(images, prompts)``, e.g. ``{"pickscore": (100.0, pickscore), ...}``.

    Differentiable only when every component is. :meth:`components` returns the unweighted scores by name, for logging.
    """

    def __init__(self, rewards: Mapping[str, tuple[float, RewardModel]]):
        super().__init__()
        if not rewards:
            raise ValueError("WeightedSumReward needs at least one reward, got an empty mapping.")
        self.weights = {name: float(weight) for name, (weight, _) in rewards.items()}
        # A list, not a ModuleDict: reward names such as "hpsv2.1" are not valid module names.
        self.rewards = nn.ModuleList(reward for _, reward in rewards.values())
        self.differentiable = all(reward.differentiable for reward in self.rewards)

    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Unweighted score of every component, by name."""
        return {name: reward(images, prompts) for name, reward in zip(self.weights, self.rewards, strict=True)}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.components(images, prompts)
        return sum(self.weights[name] * value for name, value in scores.items())

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())


def _check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a float tensor of shape (B, 3, H, W) with values in [0, 1], got {shape}.")
    if not images.is_floating_point():
        raise ValueError(f"`images` must be floating point in [0, 1], got dtype {images.dtype}: divide uint8 by 255.")
    if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError(f"`prompts` must be a list of strings, one per image, got {prompts!r}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"Got {images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image.")
    return list(prompts)
