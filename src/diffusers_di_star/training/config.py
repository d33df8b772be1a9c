"""The DI* training settings (docs/math.md, docs/training.md), validated on construction.

Imports nothing heavy (its constants come from ``defaults.py``): the trainer builds and checks its flags from here
before torch is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from ..defaults import (
    DEFAULT_CONDITIONING_TIMESTEP,
    DEFAULT_LORA_TARGET_MODULES,
    DEFAULT_T_MAX,
    DEFAULT_T_MIN,
    DISTANCES,
    MAX_IMAGE_PIXELS,
    TIME_WEIGHTING_NAMES,
)

__all__ = [
    "CHOICES",
    "CFG_MODES",
    "DEFAULT_LORA_TARGET_MODULES",
    "DIVERGENCES",
    "DIStarConfig",
    "add_config_arguments",
]

#: The regularisers: the score divergence with pseudo-Huber or L2 distance (DI*, eq. 3.2), or the integral KL (DI++).
DIVERGENCES = (*DISTANCES, "kl")

#: Where classifier-free guidance enters (§4): the CFG-enhanced reference ("inner", DI*-In) or the implicit reward.
CFG_MODES = ("inner", "reward")


@dataclass
class DIStarConfig:
    """Everything one DI* training step needs besides the networks and the data.

    Args:
        reward_scale: α_rew of eq. 3.1 (paper: 100 with PickScore); 0 skips the reward and the VAE decode (SIM).
        cfg_mode: ``"inner"`` uses ε̂_ref^γ in y_t (§4 Choice 2); ``"reward"`` adds the implicit CFG reward (Choice 1).
        guidance_scale: γ of the CFG-enhanced reference (paper: 7.5); only used with ``cfg_mode="inner"``.
        cfg_reward_scale: α_cfg of the implicit CFG reward; only used with ``cfg_mode="reward"``.
        divergence: ``"pseudo_huber"`` (DI*), ``"l2"`` (Fisher divergence) or ``"kl"`` (Diff-Instruct / DI++).
        huber_c: c of the pseudo-Huber distance.
        weighting: w(t) by name (:data:`~diffusers_di_star.losses.TIME_WEIGHTINGS`).
        min_timestep, max_timestep: the range of π(t) = U{min, …, max} (DMD2: 20, 980).
        conditioning_timestep: t* of the one-step map.
        assistant_updates_per_step: K_TA, assistant updates before each generator update (DMD2: 5).
        resolution: training image size in pixels (a multiple of 8).
        use_lora: generator and assistant as LoRA adapters (one shared UNet) instead of full copies.
        generator_lora_rank, assistant_lora_rank: LoRA ranks r.
        generator_lora_alpha, assistant_lora_alpha: LoRA alphas (scale alpha / r); None: the rank (scale 1).
        generator_lora_target_modules, assistant_lora_target_modules: module names the adapters wrap.
    """

    reward_scale: float = 100.0
    cfg_mode: str = "inner"
    guidance_scale: float = 7.5
    cfg_reward_scale: float = 1.0
    divergence: str = "pseudo_huber"
    huber_c: float = 1.0
    weighting: str = "sigma"
    min_timestep: int = DEFAULT_T_MIN
    max_timestep: int = DEFAULT_T_MAX
    conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP
    assistant_updates_per_step: int = 1
    resolution: int = 1024
    use_lora: bool = True
    generator_lora_rank: int = 64
    generator_lora_alpha: float | None = None
    assistant_lora_rank: int = 64
    assistant_lora_alpha: float | None = None
    generator_lora_target_modules: tuple[str, ...] = field(default=DEFAULT_LORA_TARGET_MODULES)
    assistant_lora_target_modules: tuple[str, ...] = field(default=DEFAULT_LORA_TARGET_MODULES)

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value}.")
        for role in ("generator", "assistant"):  # the trainer's rule too: alpha = rank unless given
            if getattr(self, f"{role}_lora_alpha") is None:
                setattr(self, f"{role}_lora_alpha", float(getattr(self, f"{role}_lora_rank")))
        self.generator_lora_target_modules = tuple(self.generator_lora_target_modules)
        self.assistant_lora_target_modules = tuple(self.assistant_lora_target_modules)
        for name, choices in CHOICES.items():
            _choice(name, getattr(self, name), choices)
        for name in ("reward_scale", "cfg_reward_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.guidance_scale < 1:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 = no guidance), got {self.guidance_scale}.")
        if self.huber_c <= 0:
            raise ValueError(f"`huber_c` must be > 0, got {self.huber_c}.")
        if not 0 <= self.min_timestep <= self.max_timestep <= 999:
            raise ValueError(
                f"need 0 <= min_timestep <= max_timestep <= 999, got {self.min_timestep} and {self.max_timestep}."
            )
        if not 0 <= self.conditioning_timestep <= 999:
            raise ValueError(f"`conditioning_timestep` must be in [0, 999], got {self.conditioning_timestep}.")
        if self.assistant_updates_per_step < 1:
            raise ValueError(f"`assistant_updates_per_step` must be >= 1, got {self.assistant_updates_per_step}.")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"`resolution` must be a positive multiple of 8 (the VAE factor), got {self.resolution}.")
        if self.resolution**2 > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"`resolution` {self.resolution} is {self.resolution**2:,} pixels, above the limit of "
                f"{MAX_IMAGE_PIXELS:,} (4096×4096) that `di-star generate` also applies; pass a smaller resolution."
            )
        for role in ("generator", "assistant"):
            rank, alpha = getattr(self, f"{role}_lora_rank"), getattr(self, f"{role}_lora_alpha")
            if rank < 1 or alpha <= 0:
                raise ValueError(f"`{role}_lora_rank` must be >= 1 and `{role}_lora_alpha` > 0, got {rank}, {alpha}.")
            if not getattr(self, f"{role}_lora_target_modules"):
                raise ValueError(f"`{role}_lora_target_modules` is empty: name at least one module, e.g. to_q.")


#: The fields that take one of a few names.
CHOICES = {"cfg_mode": CFG_MODES, "divergence": DIVERGENCES, "weighting": TIME_WEIGHTING_NAMES}


def field_help() -> dict[str, str]:
    """Each field's description, read from the Args section of :class:`DIStarConfig`'s docstring."""
    helps, name = {}, None
    for line in DIStarConfig.__doc__.split("Args:")[1].splitlines():
        head, colon, text = line.strip().partition(": ")
        if colon and line.startswith(" " * 8) and not line.startswith(" " * 9):
            names = [n.strip() for n in head.split(",")]
            for name in names:
                helps[name] = text.strip()
        elif name and line.strip():
            for other in names:
                helps[other] += " " + line.strip()
    return helps


def add_config_arguments(group, names) -> None:
    """``--<field>`` for each named :class:`DIStarConfig` field, with its default, type, choices and docstring help:
    the command line and the library share one set of defaults."""
    helps = field_help()
    for f in fields(DIStarConfig):
        if f.name in names:
            kind = {"float": float, "int": int, "str": str}[f.type.split(" ")[0]]
            text = re.sub(r":\w+:`~?[\w.]*?(\w+)`", r"\1", helps[f.name]).replace("``", "")
            help = text.replace("%", "%%") + " (default: %(default)s)"
            group.add_argument(f"--{f.name}", type=kind, default=f.default, choices=CHOICES.get(f.name), help=help)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
