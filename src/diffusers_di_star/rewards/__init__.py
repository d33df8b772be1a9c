"""Human-preference rewards behind one interface: ``reward(images in [0, 1], prompts) -> Tensor[B]``.

Example::

    reward = load_reward("pickscore:1,hpsv2.1:1", device="cuda", dtype=torch.bfloat16)
    scores = reward(images, prompts)        # images (B, 3, H, W) in [0, 1] -> (B,)

See ``docs/rewards.md`` for every reward, its scale, its checkpoint licence and how to add one.
"""

from .aesthetic import AestheticReward
from .base import RewardModel, WeightedSumReward
from .clip_score import ClipScoreReward
from .clip_similarity import ClipSimilarityReward
from .hpsv2 import HPSv2Reward
from .image_reward import ImageReward
from .open_clip_conversion import convert_open_clip_state_dict
from .pickscore import PickScoreReward
from .preprocessing import ClipImageTransform, LetterboxImageTransform
from .registry import REWARDS, available_rewards, load_reward, parse_reward_spec, register_reward

__all__ = [
    "REWARDS",
    "AestheticReward",
    "ClipImageTransform",
    "ClipScoreReward",
    "ClipSimilarityReward",
    "HPSv2Reward",
    "ImageReward",
    "LetterboxImageTransform",
    "PickScoreReward",
    "RewardModel",
    "WeightedSumReward",
    "available_rewards",
    "convert_open_clip_state_dict",
    "load_reward",
    "parse_reward_spec",
    "register_reward",
]
