"""The one-step map and the VP-schedule algebra every part of DI* shares (``docs/math.md`` §1–2).

Notation (SDXL, ε-prediction, discrete VP schedule with ``alphas_cumprod`` = ᾱ_t):

* α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t); forward diffusion x_t = α_t·x0 + σ_t·ε.
* score s(x_t) = −ε̂/σ_t; data prediction x̂0 = (x_t − σ_t·ε̂)/α_t.
* one-step generator (DMD2 convention, diffusers' ``LCMScheduler`` with ``timesteps=[t*]``):
  x0 = g_θ(z, c) = (z − σ_{t*}·ε̂_θ(z, t*, c)) / α_{t*}, z ~ N(0, I), t* = 399 by default.

The pipeline, the trainer, evaluation and the benchmarks all call :func:`generate_x0`; nothing else implements the
one-step map.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "DEFAULT_CONDITIONING_TIMESTEP",
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

#: t* of DMD2 and the released DI* checkpoints.
DEFAULT_CONDITIONING_TIMESTEP = 399


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
    t = torch.as_tensor(timesteps, device=like.device, dtype=torch.long)
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


def generate_x0(
    unet: torch.nn.Module,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    cross_attention_kwargs: dict | None = None,
    timestep_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one-step map x0 = g_θ(z, c) = (z − σ_{t*}·ε̂_θ(z, t*, c)) / α_{t*} (docs/math.md §2).

    Args:
        unet: the generator g_θ, an ε-prediction ``UNet2DConditionModel`` (SDXL layout).
        noise: z ~ N(0, I) in latent shape ``[B, 4, H/8, W/8]``.
        encoder_hidden_states: SDXL prompt embeddings ``[B, 77, 2048]``.
        added_cond_kwargs: ``{"text_embeds": pooled [B, 1280], "time_ids": [B, 6]}``.
        alphas_cumprod: ᾱ of the generator's training schedule (``scheduler.alphas_cumprod``).
        conditioning_timestep: t*, the timestep the generator is conditioned on.
        cross_attention_kwargs: forwarded to the UNet (e.g. ``{"scale": 0.8}`` for LoRA).
        timestep_cond: the guidance embedding of a UNet with ``time_cond_proj_dim`` (LCM-distilled), else None.

    Gradients flow to the UNet's parameters and to every input; the caller chooses ``torch.no_grad`` or not.
    Equals diffusers' ``LCMScheduler`` step at ``timesteps=[t*]`` up to its boundary-condition term
    c_skip(t*)·z, which is 1.6e-8·z at t* = 399.
    """
    timestep = torch.full((noise.shape[0],), conditioning_timestep, device=noise.device, dtype=torch.long)
    eps_hat = unet(
        noise,
        timestep,
        encoder_hidden_states=encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        cross_attention_kwargs=cross_attention_kwargs,
        timestep_cond=timestep_cond,
        return_dict=False,
    )[0]
    alpha_t, sigma_t = schedule_coefficients(alphas_cumprod, conditioning_timestep, eps_hat)
    return eps_to_x0(noise.to(eps_hat.dtype), eps_hat, alpha_t, sigma_t)


def decode_latents(vae: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """Pixels in [−1, 1] from latents: ``vae.decode(x0 / scaling_factor)`` (docs/math.md §1).

    Honours ``latents_mean``/``latents_std`` when the VAE config has them, as diffusers' SDXL pipeline does.
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
    return vae.decode(x0, return_dict=False)[0]
