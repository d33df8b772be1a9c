"""Rewards by name, and the spec string ``"pickscore:100,hpsv2.1:1"`` that loads their weighted sum.

Everything that can be wrong with a request (an unknown name, a bad weight, an option the loader does not take, a
missing optional package) is reported before the first model is loaded: loading ViT-H/14 takes a while.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from .aesthetic import AestheticReward
from .base import RewardModel, WeightedSumReward
from .clip_score import ClipScoreReward
from .digits import BoldnessReward
from .hpsv2 import HPSv2Reward
from .image_reward import ImageReward
from .pickscore import PickScoreReward

__all__ = ["REWARDS", "RewardEntry", "available_rewards", "load_reward", "parse_reward_spec", "register_reward"]


@dataclass(frozen=True)
class RewardEntry:
    """How to load a named reward: ``loader(**options) -> RewardModel``, and the modules it needs installed."""

    loader: Callable[..., RewardModel]
    requires: tuple[str, ...] = ()


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, loader: Callable[..., RewardModel], *, requires: tuple[str, ...] = ()) -> None:
    """Make ``name`` usable in spec strings. ``requires`` names importable modules (optional extras)."""
    if name != name.strip().lower() or any(char in name for char in ",:"):
        raise ValueError(f"Reward names are lower case without ',' or ':', got {name!r}.")
    REWARDS[name] = RewardEntry(loader, tuple(requires))


def available_rewards() -> list[str]:
    return sorted(REWARDS)


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"pickscore:100, hpsv2.1"`` -> ``{"pickscore": 100.0, "hpsv2.1": 1.0}``; a missing weight means 1."""
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, _, weight_text = item.strip().partition(":")
        name = name.strip().lower()
        if not name:
            raise ValueError(f"Empty reward name in spec {spec!r}: write 'name:weight' items separated by commas.")
        if name not in REWARDS:
            raise ValueError(
                f"Unknown reward {name!r} in spec {spec!r}; valid names: {', '.join(available_rewards())}."
            )
        if name in weights:
            raise ValueError(f"Reward {name!r} appears twice in spec {spec!r}: merge its weights.")
        weights[name] = _parse_weight(name, weight_text.strip() or "1", spec)
    return weights


def load_reward(
    spec: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **options: Mapping[str, object],
) -> WeightedSumReward:
    """Load the weighted sum of the rewards named in ``spec``, e.g. ``load_reward("pickscore:100,hpsv2.1:1")``.

    ``options`` maps a reward name to keyword arguments of its loader, e.g. local checkpoints::

        load_reward("pickscore:1,hpsv2.1:1", pickscore={"model": "ckpt/pickscore", "processor": "ckpt/clip-h"},
                    **{"hpsv2.1": {"checkpoint": "ckpt/HPS_v2.1_compressed.pt", "processor": "ckpt/clip-h"}})

    Each model is moved to ``device`` and ``dtype`` as soon as it is loaded.
    """
    weights = parse_reward_spec(spec)
    _check_options(weights, options)
    _check_requirements(weights)
    rewards = {}
    for name, weight in weights.items():
        reward = REWARDS[name].loader(**options.get(name, {}))
        rewards[name] = (weight, reward.to(device=device, dtype=dtype))
    return WeightedSumReward(rewards)


def _parse_weight(name: str, text: str, spec: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight == 0:
        raise ValueError(f"Bad weight {text!r} for reward {name!r} in spec {spec!r}: use a finite non-zero number.")
    return weight


def _check_options(weights: Mapping[str, float], options: Mapping[str, Mapping[str, object]]) -> None:
    for name, kwargs in options.items():
        if name not in weights:
            raise ValueError(f"Options given for {name!r}, which is not in the spec ({', '.join(weights)}).")
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"Options for {name!r} must be a dict of loader arguments, got {kwargs!r}.")
        loader = REWARDS[name].loader
        try:
            inspect.signature(loader).bind(**kwargs)
        except TypeError as error:
            accepted = ", ".join(inspect.signature(loader).parameters)
            raise ValueError(
                f"Bad options {dict(kwargs)} for reward {name!r} ({error}); it accepts: {accepted}."
            ) from None


def _check_requirements(weights: Mapping[str, float]) -> None:
    missing = {}
    for name in weights:
        if modules := [module for module in REWARDS[name].requires if not _is_installed(module)]:
            missing[name] = modules
    if missing:
        details = "; ".join(f"{name} needs {', '.join(modules)}" for name, modules in missing.items())
        raise ImportError(
            f"Missing packages for the requested rewards: {details}. Install them, or drop those rewards."
        )


def _is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


register_reward("pickscore", PickScoreReward.from_pretrained)
register_reward("clip", ClipScoreReward.from_pretrained)
register_reward("hpsv2", partial(HPSv2Reward.from_pretrained, version="2.0"))
register_reward("hpsv2.1", partial(HPSv2Reward.from_pretrained, version="2.1"))
register_reward("aesthetic", AestheticReward.from_pretrained)
register_reward("imagereward", ImageReward.from_pretrained)
register_reward("boldness", BoldnessReward)
