"""One assistant update and one generator update of DI* (paper Algorithm 1; docs/math.md §9).

Each function draws its own noise and timesteps, calls the networks in their roles, and returns the scalar loss to
backpropagate (mean over the batch) plus detached per-term values for logging. The caller (the example's accelerate
loop, or a test) runs the backward pass and the optimiser; it must backpropagate a loss before the next call, because
the UNet is left in the role whose parameters the loss trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..families import Conditioning, ModelFamily, SDXLFamily
from ..families.sdxl import SDXLConditioning, encode_prompts
from ..losses import (
    EpsPredictor,
    assistant_dsm_loss,
    implicit_cfg_reward_loss,
    kl_divergence_loss,
    reward_loss,
    score_divergence_loss,
    time_weighting,
)
from ..one_step import VPSchedule, decode_latents, diffuse
from .config import DIStarConfig
from .models import DIStarNetworks

__all__ = ["Conditioning", "SDXLConditioning", "as_family", "encode_prompts", "assistant_loss", "generator_loss"]


def as_family(family: ModelFamily | torch.Tensor) -> ModelFamily:
    """``family``; a bare ``alphas_cumprod`` tensor (this API before families) means SDXL with ε-prediction."""
    if isinstance(family, torch.Tensor):
        return SDXLFamily(VPSchedule(family, "epsilon"))
    return family


def _eps_predictor(
    networks: DIStarNetworks, family: ModelFamily, role: str, timesteps: torch.Tensor, cond: Conditioning
) -> EpsPredictor:
    # ε̂(x_t, t, c) of a frozen role (the bare network, or the prepared unit under sharding: DIStarNetworks.unet).
    def eps(x_t: torch.Tensor) -> torch.Tensor:
        return family.eps(networks.unet(role), x_t, timesteps, cond)

    return eps


def _reference_predictor(
    networks: DIStarNetworks, family: ModelFamily, timesteps: torch.Tensor, cond: Conditioning, guidance_scale: float
) -> EpsPredictor:
    # ε̂_ref^γ (§4 Choice 2) as the family forms it (ModelFamily.guided_eps); plain ε̂_ref(x_t, c) at γ = 1.
    def eps(x_t: torch.Tensor) -> torch.Tensor:
        return family.guided_eps(networks.unet("reference"), x_t, timesteps, cond, guidance_scale)

    return eps


def _noise(family: ModelFamily, cond: Conditioning, resolution: int, generator: torch.Generator | None):
    # z ~ N(0, I) in latent shape; ``generator`` must live on the conditioning's device.
    return torch.randn(family.latent_shape(cond.batch_size, resolution), generator=generator, device=cond.device)


def _diffused(x0: torch.Tensor, config: DIStarConfig, family: ModelFamily, generator: torch.Generator | None):
    # t ~ π(t), ε ~ N(0, I), x_t = α_t x0 + σ_t ε.
    t = family.sample_timesteps(x0.shape[0], config, generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha_t, sigma_t = family.coefficients(t, x0)
    return t, eps, alpha_t, sigma_t, diffuse(x0, eps, alpha_t, sigma_t)


def assistant_loss(
    networks: DIStarNetworks,
    config: DIStarConfig,
    cond: Conditioning,
    family: ModelFamily | torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Algorithm 1 step 1: ‖ε̂_ψ(x_t) − ε‖² with x0 = sg[g_θ(z, c)]; the gradient reaches ψ only.

    ``family`` converts the networks' outputs to ε̂ and gives the schedule (:func:`as_family`).
    """
    family = as_family(family)
    with torch.no_grad():
        x0 = family.generate_x0(
            networks.unet("generator"),
            _noise(family, cond, config.resolution, generator),
            cond,
            config.conditioning_timestep,
        )
    t, eps, _, _, x_t = _diffused(x0.float(), config, family, generator)
    assistant = networks.unet("assistant", train=True)

    def eps_assistant(x: torch.Tensor) -> torch.Tensor:
        return family.eps(assistant, x, t, cond)

    loss = assistant_dsm_loss(x_t, eps, eps_assistant).mean()
    return loss, {"assistant_loss": loss.detach()}


def generator_loss(
    networks: DIStarNetworks,
    config: DIStarConfig,
    cond: Conditioning,
    prompts: Sequence[str],
    family: ModelFamily | torch.Tensor,
    vae: torch.nn.Module | None = None,
    reward_model: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Algorithm 1 step 2: L = −α_rew r(decode(x0), c) + L_reg (+ L_cfg with ``cfg_mode="reward"``), batch mean.

    x0 = g_θ(z, c) keeps its graph; ψ and the reference are frozen, their inputs are not (Theorem 3.1). L_reg is the
    score divergence (eq. 3.3) or the integral KL (DI++), L_cfg the implicit CFG reward (Theorem 3.2). ``vae`` and
    ``reward_model`` are needed when ``config.reward_scale > 0``. Logs hold each term's batch mean and the reward.
    ``family`` converts the networks' outputs to ε̂ and gives the schedule (:func:`as_family`).
    """
    family = as_family(family)
    x0 = family.generate_x0(
        networks.unet("generator", train=True),
        _noise(family, cond, config.resolution, generator),
        cond,
        config.conditioning_timestep,
    ).float()
    terms, logs = {}, {}
    if config.reward_scale > 0:
        if vae is None or reward_model is None:
            raise ValueError(
                "reward_scale > 0 needs a `vae` and a `reward_model`; set reward_scale=0 to train without."
            )
        images = (decode_latents(vae, x0.to(vae.dtype)).float() / 2 + 0.5).clamp(0, 1)
        reward = reward_model(images, list(prompts))
        terms["reward_loss"] = reward_loss(reward, config.reward_scale)
        logs["reward"] = reward.detach().mean()

    t, eps, alpha_t, sigma_t, x_t = _diffused(x0, config, family, generator)
    weight = time_weighting(config.weighting, alpha_t, sigma_t)
    eps_assistant = _eps_predictor(networks, family, "assistant", t, cond)
    guidance_scale = config.guidance_scale if config.cfg_mode == "inner" else 1.0
    eps_reference = _reference_predictor(networks, family, t, cond, guidance_scale)
    if config.divergence == "kl":
        terms["kl_loss"] = kl_divergence_loss(x_t, sigma_t, eps_assistant, eps_reference, weight)
    else:
        terms["divergence_loss"] = _score_divergence_through_inputs(
            networks, x_t, eps, sigma_t, eps_assistant, eps_reference, weight, config
        )
    if config.cfg_mode == "reward" and config.cfg_reward_scale > 0:
        eps_uncond = _reference_predictor(networks, family, t, cond.unconditional(), 1.0)
        eps_cond = _reference_predictor(networks, family, t, cond, 1.0)
        terms["cfg_reward_loss"] = implicit_cfg_reward_loss(
            x_t, sigma_t, eps_cond, eps_uncond, config.cfg_reward_scale, weight
        )
    networks.activate("generator")  # the backward pass of this loss updates θ: leave g_θ's adapter active
    loss = sum(term.mean() for term in terms.values())
    logs.update({name: term.detach().mean() for name, term in terms.items()})
    logs["generator_loss"] = loss.detach()
    return loss, logs


def _score_divergence_through_inputs(
    networks: DIStarNetworks,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    sigma_t: torch.Tensor,
    eps_assistant: EpsPredictor,
    eps_reference: EpsPredictor,
    weight: torch.Tensor,
    config: DIStarConfig,
) -> torch.Tensor:
    """:func:`~diffusers_di_star.losses.score_divergence_loss` with its x_t-gradient taken network by network.

    The loss depends on θ only through x_t, so ∇_θ L = (∂L/∂x_t)ᵀ ∂x_t/∂θ. ∂L/∂x_t is computed here. With LoRA each
    UNet's vector-Jacobian product is taken under its own adapter (a shared UNet may not switch adapters between a
    forward and its backward, and gradient checkpointing recomputes under the active one); separate UNets take both in
    one backward (FSDP1 unshards a unit once per backward: a second backward through the same forward would find its
    parameters freed). Returned per sample: the loss's value, with gradient sg[∂L/∂x_t]ᵀ x_t towards θ.
    """
    x_in = x_t.detach().requires_grad_(True)
    eps_hat_assistant = eps_assistant(x_in)
    eps_hat_reference = eps_reference(x_in)
    assistant_out = eps_hat_assistant.detach().requires_grad_(True)
    reference_out = eps_hat_reference.detach().requires_grad_(True)
    loss = score_divergence_loss(
        x_in, eps, sigma_t, lambda _: assistant_out, lambda _: reference_out, weight, config.divergence, config.huber_c
    )
    grad_assistant, grad_reference = torch.autograd.grad(loss.sum(), [assistant_out, reference_out])
    if networks.use_lora:
        networks.activate("reference")
        grad_x = torch.autograd.grad(eps_hat_reference, x_in, grad_reference)[0]
        networks.activate("assistant")
        grad_x = grad_x + torch.autograd.grad(eps_hat_assistant, x_in, grad_assistant)[0]
    else:
        grad_x = torch.autograd.grad([eps_hat_reference, eps_hat_assistant], x_in, [grad_reference, grad_assistant])[0]
    surrogate = (grad_x.detach().to(x_t.dtype) * x_t).flatten(1).sum(1)
    return loss.detach() + surrogate - surrogate.detach()
