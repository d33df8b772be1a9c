"""The one-step map, the schedules and the parameterisations every part of DI* shares (``docs/math.md`` §1–2, §12).

Notation (discrete VP schedule with ``alphas_cumprod`` = ᾱ_t, as SD1.5, SD2.x and SDXL):

* α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t); forward diffusion x_t = α_t·x0 + σ_t·ε.
* score s(x_t) = −ε̂/σ_t; data prediction x̂0 = (x_t − σ_t·ε̂)/α_t.
* a network's raw output converts to ε̂ and x̂0 by its *prediction type* (:data:`PREDICTION_TYPES`, read from the
  checkpoint's scheduler config): ``epsilon``, ``v_prediction``, ``sample`` (VP) or ``flow`` (rectified flow,
  x_t = (1 − σ)·x0 + σ·ε, velocity ε − x0). :func:`output_to_eps` and :func:`output_to_x0` are exact.
* one-step generator (DMD2 convention, diffusers' ``LCMScheduler`` with ``timesteps=[t*]``):
  x0 = g_θ(z, c) = x̂0(z, t*) of the generator's output at t*, e.g. (z − σ_{t*}·ε̂_θ(z, t*, c)) / α_{t*} for ε;
  z ~ N(0, I), t* = 399 by default.

The pipelines, the trainer, evaluation and the benchmarks all reach the one-step map through :func:`one_step_x0`
(:func:`generate_x0` is its UNet form); nothing else implements it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from .defaults import DEFAULT_CONDITIONING_TIMESTEP

__all__ = [
    "DEFAULT_CONDITIONING_TIMESTEP",
    "PREDICTION_TYPES",
    "VP_PREDICTION_TYPES",
    "FlowSchedule",
    "VPSchedule",
    "check_prediction_type",
    "output_to_eps",
    "output_to_x0",
    "prediction_target",
    "one_step_x0",
    "check_conditioning_timestep",
    "schedule_coefficients",
    "diffuse",
    "eps_to_score",
    "score_to_eps",
    "eps_to_x0",
    "x0_to_eps",
    "generate_x0",
    "decode_latents",
]


def check_conditioning_timestep(conditioning_timestep, num_train_timesteps: int = 1000) -> None:
    """Raise ``ValueError`` unless t* is an integer in [0, num_train_timesteps) (SDXL: 1000), naming the value."""
    if isinstance(conditioning_timestep, bool) or not isinstance(conditioning_timestep, int | np.integer):
        raise ValueError(
            f"`conditioning_timestep` must be an integer timestep, got {conditioning_timestep!r}. "
            f"DI* and DMD2 one-step generators use {DEFAULT_CONDITIONING_TIMESTEP}."
        )
    if not 0 <= conditioning_timestep < num_train_timesteps:
        raise ValueError(
            f"`conditioning_timestep` must be in [0, {num_train_timesteps}) (the scheduler's num_train_timesteps), "
            f"got {conditioning_timestep}. DI* and DMD2 one-step generators use {DEFAULT_CONDITIONING_TIMESTEP}."
        )


def schedule_coefficients(
    alphas_cumprod: torch.Tensor, timesteps: int | torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t = sqrt(ᾱ_t) and σ_t = sqrt(1 − ᾱ_t) (docs/math.md §1), shaped to broadcast against ``like``.

    ``timesteps`` is one integer timestep or a tensor ``[B]`` of them. The square roots are taken in float64 (or at
    least float32) and only then cast to ``like.dtype``, so bf16 inputs at extreme t stay finite and accurate.
    """
    precision = torch.float64 if like.dtype == torch.float64 else torch.float32
    acp = alphas_cumprod.to(device=like.device, dtype=precision)
    t = torch.as_tensor(timesteps, device=like.device, dtype=torch.long).reshape(-1)  # 1-d: no .item() (meta)
    acp_t = acp[t].reshape(-1, *([1] * (like.ndim - 1)))
    return acp_t.sqrt().to(like.dtype), (1 - acp_t).sqrt().to(like.dtype)


def diffuse(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = α_t·x0 + σ_t·ε (docs/math.md §1)."""
    return alpha_t * x0 + sigma_t * eps


def eps_to_score(eps: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """s(x_t) = −ε̂/σ_t (docs/math.md §1)."""
    return -eps / sigma_t


def score_to_eps(score: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """ε̂ = −σ_t·s(x_t), the inverse of :func:`eps_to_score`."""
    return -sigma_t * score


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − σ_t·ε̂)/α_t (docs/math.md §1)."""
    return (x_t - sigma_t * eps) / alpha_t


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − α_t·x0)/σ_t, the inverse of :func:`eps_to_x0`."""
    return (x_t - alpha_t * x0) / sigma_t


#: The VP prediction types of diffusers' ``scheduler.config.prediction_type`` (docs/math.md §12).
VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: Every prediction type a family may declare: the VP ones and rectified-flow velocity.
PREDICTION_TYPES = (*VP_PREDICTION_TYPES, "flow")


def check_prediction_type(prediction_type, allowed: tuple[str, ...] = PREDICTION_TYPES) -> str:
    """Return ``prediction_type`` or raise ``ValueError`` naming it and the types this code reads."""
    if prediction_type not in allowed:
        raise ValueError(f"prediction type {prediction_type!r} is not one of {allowed}.")
    return prediction_type


def output_to_eps(
    output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """ε̂ from a network's raw output (docs/math.md §12); exact for each type.

    ``epsilon``: ε̂ = out; ``v_prediction``: ε̂ = α_t·out + σ_t·x_t (α² + σ² = 1); ``sample``: ε̂ = (x_t − α_t·out)/σ_t;
    ``flow`` (α_t = 1 − σ): ε̂ = x_t + (1 − σ)·out.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_t * output + sigma_t * x_t
    if prediction_type == "sample":
        return x0_to_eps(x_t, output, alpha_t, sigma_t)
    if prediction_type == "flow":
        return x_t + alpha_t * output
    raise ValueError(f"prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}.")


def output_to_x0(
    output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x̂0 from a network's raw output (docs/math.md §12); exact for each type.

    ``epsilon``: x̂0 = (x_t − σ_t·out)/α_t; ``v_prediction``: x̂0 = α_t·x_t − σ_t·out; ``sample``: x̂0 = out;
    ``flow``: x̂0 = x_t − σ·out.
    """
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, output, alpha_t, sigma_t)
    if prediction_type == "v_prediction":
        return alpha_t * x_t - sigma_t * output
    if prediction_type == "sample":
        return output
    if prediction_type == "flow":
        return x_t - sigma_t * output
    raise ValueError(f"prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}.")


def prediction_target(
    x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What a perfect network of this type outputs at x_t = α_t·x0 + σ_t·ε: ε, v = α_t·ε − σ_t·x0, x0, or ε − x0."""
    targets = {
        "epsilon": lambda: eps,
        "v_prediction": lambda: alpha_t * eps - sigma_t * x0,
        "sample": lambda: x0,
        "flow": lambda: eps - x0,
    }
    return targets[check_prediction_type(prediction_type)]()


@dataclass(frozen=True)
class VPSchedule:
    """A discrete VP schedule ᾱ_t (SD1.5, SD2.x, SDXL) and how its network's output reads (docs/math.md §1, §12).

    Timesteps are integers in [0, len(ᾱ)); the network is called with them as they are.
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    #: dtype of the timestep tensors a network of this schedule takes.
    timestep_dtype: ClassVar[torch.dtype] = torch.long

    def __post_init__(self):
        check_prediction_type(self.prediction_type, VP_PREDICTION_TYPES)

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        """ᾱ and ``prediction_type`` of a diffusers DDPM-family scheduler (read, never assumed)."""
        prediction_type = scheduler.config.get("prediction_type")
        if prediction_type not in VP_PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler ({type(scheduler).__name__}) has prediction_type={prediction_type!r}; a VP model "
                f"needs one of {VP_PREDICTION_TYPES} in its scheduler/scheduler_config.json."
            )
        return cls(scheduler.alphas_cumprod, prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def coefficients(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) shaped to broadcast against ``like`` (:func:`schedule_coefficients`)."""
        return schedule_coefficients(self.alphas_cumprod, timesteps, like)

    def network_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def to(self, device) -> VPSchedule:
        return replace(self, alphas_cumprod=self.alphas_cumprod.to(device))


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (SD3, FLUX): t = σ ∈ [0, 1], x_t = (1 − σ)·x0 + σ·ε; velocity prediction (docs/math.md §12).

    The network is called with σ·``num_train_timesteps``, as diffusers' ``FlowMatchEulerDiscreteScheduler`` does.
    """

    num_train_timesteps: int = 1000
    prediction_type: ClassVar[str] = "flow"
    timestep_dtype: ClassVar[torch.dtype] = torch.float32

    def coefficients(self, sigmas, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (1 − σ, σ) shaped to broadcast against ``like``, computed in at least float32."""
        precision = torch.float64 if like.dtype == torch.float64 else torch.float32
        sigma = torch.as_tensor(sigmas, device=like.device, dtype=precision).reshape(-1, *([1] * (like.ndim - 1)))
        return (1 - sigma).to(like.dtype), sigma.to(like.dtype)

    def network_timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * self.num_train_timesteps

    def to(self, device) -> FlowSchedule:
        return self


def one_step_x0(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    conditioning_timestep,
    schedule: VPSchedule | FlowSchedule,
) -> torch.Tensor:
    """The one-step map x0 = g_θ(z, c) = x̂0 of the generator's output at t* (docs/math.md §2, §12).

    ``denoise(z, t)`` is the generator with its conditioning bound, called with ``t`` = t* repeated over the batch;
    its raw output converts to x̂0 by ``schedule.prediction_type``. For ε-prediction this is
    (z − σ_{t*}·ε̂_θ(z, t*, c)) / α_{t*}.
    """
    timesteps = torch.full(
        (noise.shape[0],), conditioning_timestep, device=noise.device, dtype=schedule.timestep_dtype
    )
    output = denoise(noise, timesteps)
    alpha_t, sigma_t = schedule.coefficients(conditioning_timestep, output)
    return output_to_x0(output, noise.to(output.dtype), alpha_t, sigma_t, schedule.prediction_type)


def generate_x0(
    unet: torch.nn.Module,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    alphas_cumprod: torch.Tensor,
    conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    cross_attention_kwargs: dict | None = None,
    prediction_type: str = "epsilon",
    timestep_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`one_step_x0` for a ``UNet2DConditionModel`` on a VP schedule (docs/math.md §2).

    Args:
        unet: the generator g_θ, a ``UNet2DConditionModel`` (SDXL or SD layout).
        noise: z ~ N(0, I) in latent shape ``[B, 4, H/8, W/8]``.
        encoder_hidden_states: prompt embeddings (SDXL ``[B, 77, 2048]``).
        added_cond_kwargs: SDXL's ``{"text_embeds": pooled [B, 1280], "time_ids": [B, 6]}``; ``None`` for SD1.5/2.x.
        alphas_cumprod: ᾱ of the generator's training schedule (``scheduler.alphas_cumprod``).
        conditioning_timestep: t*, the timestep the generator is conditioned on.
        cross_attention_kwargs: forwarded to the UNet (e.g. ``{"scale": 0.8}`` for LoRA).
        prediction_type: how the UNet's output reads (``scheduler.config.prediction_type``).
        timestep_cond: the guidance embedding of a UNet with ``time_cond_proj_dim`` (LCM-distilled), else None.

    Gradients flow to the UNet's parameters and to every input; the caller chooses ``torch.no_grad`` or not.
    Equals diffusers' ``LCMScheduler`` step at ``timesteps=[t*]`` up to its boundary-condition term
    c_skip(t*)·z, which is 1.6e-8·z at t* = 399.
    """

    def denoise(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return unet(
            x,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs=cross_attention_kwargs,
            timestep_cond=timestep_cond,
            return_dict=False,
        )[0]

    return one_step_x0(denoise, noise, conditioning_timestep, VPSchedule(alphas_cumprod, prediction_type))


def decode_latents(vae: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """Pixels in [−1, 1] from latents: ``vae.decode(x0 / scaling_factor)`` (docs/math.md §1).

    Honours ``latents_mean``/``latents_std`` when the VAE config has them, as diffusers' SDXL pipeline does, and
    ``shift_factor`` (SD3, FLUX: ``x0 / scaling_factor + shift_factor``) as diffusers' SD3 pipeline does.
    Gradients flow to ``x0``; dtype handling (fp16 upcast) is the caller's.
    """
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        channels = x0.shape[1]
        mean = torch.tensor(config.latents_mean, device=x0.device, dtype=x0.dtype).view(1, channels, 1, 1)
        std = torch.tensor(config.latents_std, device=x0.device, dtype=x0.dtype).view(1, channels, 1, 1)
        x0 = x0 * std / config.scaling_factor + mean
    else:
        x0 = x0 / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            x0 = x0 + config.shift_factor
    return vae.decode(x0, return_dict=False)[0]
