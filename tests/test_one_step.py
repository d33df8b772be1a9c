"""The VP-schedule algebra of ``one_step.py``: exact inverses, schedule values and shapes, bf16 at extreme t."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from diffusers_di_star.one_step import (
    diffuse,
    eps_to_score,
    eps_to_x0,
    generate_x0,
    schedule_coefficients,
    score_to_eps,
    x0_to_eps,
)
from diffusers_di_star.testing import get_sdxl_scheduler, get_tiny_unet

ALPHAS_CUMPROD = get_sdxl_scheduler().alphas_cumprod


def _draws(dtype=torch.float64, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, *shape, generator=g, dtype=torch.float64).to(dtype)
    alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD.double(), torch.tensor([0, 399, 999]), x0)
    return x0, eps, alpha_t, sigma_t


def test_eps_score_x0_round_trips_are_exact():
    x0, eps, alpha_t, sigma_t = _draws()
    x_t = diffuse(x0, eps, alpha_t, sigma_t)
    torch.testing.assert_close(score_to_eps(eps_to_score(eps, sigma_t), sigma_t), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_to_score(score_to_eps(x0, sigma_t), sigma_t), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_to_x0(x_t, eps, alpha_t, sigma_t), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0_to_eps(x_t, x0, alpha_t, sigma_t), eps, rtol=1e-12, atol=1e-12)


def test_eps_score_is_the_forward_kernel_score():
    # ∇_{x_t} log p_t(x_t | x0) = −(x_t − α_t x0)/σ_t² = −ε/σ_t (docs/math.md §1).
    x0, eps, alpha_t, sigma_t = _draws()
    x_t = diffuse(x0, eps, alpha_t, sigma_t)
    torch.testing.assert_close(eps_to_score(eps, sigma_t), -(x_t - alpha_t * x0) / sigma_t**2)


def test_schedule_coefficients_values():
    like = torch.zeros(1000, dtype=torch.float64)
    alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD, torch.arange(1000), like)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SDXL's scaled-linear betas
    torch.testing.assert_close(alpha_t**2, torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)
    torch.testing.assert_close(alpha_t**2 + sigma_t**2, torch.ones_like(like))
    assert sigma_t[399] == pytest.approx(0.7576, abs=1e-4) and sigma_t[999] == pytest.approx(0.9977, abs=1e-4)
    assert (alpha_t.diff() < 0).all() and (sigma_t.diff() > 0).all()


@pytest.mark.parametrize(
    ("timesteps", "like_shape", "expected_shape"),
    [
        (399, (2, 4, 8, 8), (1, 1, 1, 1)),
        (torch.tensor([0, 999]), (2, 4, 8, 8), (2, 1, 1, 1)),
        ([5, 6, 7], (3, 2), (3, 1)),
    ],
)
def test_schedule_coefficients_shapes(timesteps, like_shape, expected_shape):
    like = torch.zeros(like_shape, dtype=torch.float16)
    alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD, timesteps, like)
    assert alpha_t.shape == sigma_t.shape == expected_shape
    assert alpha_t.dtype == sigma_t.dtype == torch.float16


def test_bf16_finite_at_extreme_timesteps():
    x0, eps, alpha_t, sigma_t = _draws(torch.bfloat16)
    assert alpha_t.dtype == torch.bfloat16 and (sigma_t > 0).all() and (alpha_t > 0).all()
    torch.testing.assert_close(sigma_t[0].float(), torch.tensor([[[0.02916]]]), rtol=1e-2, atol=0)  # t = 0
    x_t = diffuse(x0, eps, alpha_t, sigma_t)
    for value in (
        x_t,
        eps_to_score(eps, sigma_t),
        eps_to_x0(x_t, eps, alpha_t, sigma_t),
        x0_to_eps(x_t, x0, alpha_t, sigma_t),
    ):
        assert value.dtype == torch.bfloat16 and torch.isfinite(value).all()
    torch.testing.assert_close(eps_to_x0(x_t, eps, alpha_t, sigma_t).float(), x0.float(), rtol=0.05, atol=0.2)


def test_generate_x0_equals_lcm_scheduler_step_at_399():
    unet = get_tiny_unet(seed=0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    prompt_embeds, pooled = torch.randn(2, 77, 96, generator=g), torch.randn(2, 64, generator=g)
    added_cond_kwargs = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        x0 = generate_x0(unet, noise, prompt_embeds, added_cond_kwargs, ALPHAS_CUMPROD, conditioning_timestep=399)
        scheduler = LCMScheduler.from_config(get_sdxl_scheduler().config)
        scheduler.set_timesteps(timesteps=[399])
        eps_hat = unet(noise, 399, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs).sample
        expected = scheduler.step(eps_hat, 399, noise, return_dict=False)[0]
    assert x0.shape == noise.shape
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)  # differs by c_skip(399)·(z − x0) ≈ 1.6e-8·z
