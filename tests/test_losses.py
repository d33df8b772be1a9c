"""The DI* losses against theory (``docs/math.md`` §10).

The Gaussian toy: generator g_θ(z) = μ + A·z (θ = μ, A) in 2D, reference N(m, I), SDXL's discrete VP schedule. Then
p_θ,t = N(α_t μ, α_t² AAᵀ + σ_t² I) and p_ref,t = N(α_t m, I) have exact scores, and the exact assistant is
s_ψ := s_{p_sg[θ],t}. Gradient checks compare *per-sample* gradients of two estimators on the same (z, ε, t): the
parameters are expanded to one leaf per sample, so one backward gives B gradient samples, their paired difference
has a standard error SE = std/sqrt(B), and "equal within Monte-Carlo error" means |mean difference| < 5·SE in every
coordinate (a false alarm has probability < 1e-5 for six coordinates). Each test also checks that SE is small next
to the gradient, and the Theorem 3.1 test shows a wrong variant (d'(y) detached) fails by far more than 5·SE, so
the tolerance is tight enough to catch the mistakes that matter.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffusers_di_star.losses import (
    DEFAULT_T_MAX,
    DEFAULT_T_MIN,
    assistant_dsm_loss,
    cfg_eps,
    implicit_cfg_reward_loss,
    kl_divergence_loss,
    reward_loss,
    sample_timesteps,
    score_distance,
    score_distance_grad,
    score_divergence_loss,
    time_weighting,
)
from diffusers_di_star.one_step import diffuse, schedule_coefficients
from diffusers_di_star.testing import get_sdxl_scheduler

ALPHAS_CUMPROD = get_sdxl_scheduler().alphas_cumprod.double()
MU = torch.tensor([0.3, -0.2], dtype=torch.float64)
A = torch.tensor([[1.3, 0.4], [-0.2, 0.7]], dtype=torch.float64)
M_REF = torch.tensor([-0.5, 0.8], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)
N_SAMPLES = 100_000
Z_TOL = 5.0


def _draw(n: int, seed: int):
    """(z, ε, α_t [n,1], σ_t [n,1], t) for the Gaussian toy, t ~ π(t) = U{20, …, 980}."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = sample_timesteps(n, generator=g)
    alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD, t, z)
    return z, eps, alpha_t, sigma_t, t


def _per_sample_params(n: int, mu=MU, a=A):
    """θ = (μ, A) repeated as one leaf per sample, so ``loss.sum().backward()`` yields per-sample gradients."""
    mu_b = mu.expand(n, 2).clone().requires_grad_(True)
    a_b = a.expand(n, 2, 2).clone().requires_grad_(True)
    return mu_b, a_b


def _generate(mu_b, a_b, z):
    return mu_b + (a_b @ z.unsqueeze(-1)).squeeze(-1)


def _gaussian_eps(mean_t: torch.Tensor, cov_t: torch.Tensor, sigma_t: torch.Tensor):
    """Exact ε-predictor of N(mean_t, cov_t): ε̂(x) = −σ_t·s(x) = σ_t·cov_t⁻¹(x − mean_t)."""
    return lambda x: sigma_t * torch.linalg.solve(cov_t, x - mean_t)


def _unit_gaussian_eps(mean_t: torch.Tensor, sigma_t: torch.Tensor):
    """Exact ε-predictor of N(mean_t, I): ε̂(x) = σ_t·(x − mean_t)."""
    return lambda x: sigma_t * (x - mean_t)


def _generator_cov(a: torch.Tensor, alpha_t, sigma_t):
    """Σ_θ,t = α_t² AAᵀ + σ_t² I, batched over samples."""
    return alpha_t.unsqueeze(-1) ** 2 * (a @ a.transpose(-1, -2)) + sigma_t.unsqueeze(-1) ** 2 * EYE


def _exact_networks(alpha_t, sigma_t):
    """ε-predictors of the exact assistant s_{p_sg[θ],t} and of the reference N(α_t m, I)."""
    eps_assistant = _gaussian_eps(alpha_t * MU, _generator_cov(A, alpha_t, sigma_t), sigma_t)
    eps_reference = _unit_gaussian_eps(alpha_t * M_REF, sigma_t)
    return eps_assistant, eps_reference


def _grads(mu_b, a_b):
    return torch.cat([mu_b.grad, a_b.grad.flatten(1)], dim=1)


def _mc_z_scores(per_sample_a: torch.Tensor, per_sample_b: torch.Tensor):
    """(mean difference / SE per coordinate, SE, mean of a) for paired per-sample gradients [B, P]."""
    diff = per_sample_a - per_sample_b
    se = diff.std(0) / diff.shape[0] ** 0.5
    return diff.mean(0) / se, se, per_sample_a.mean(0)


# ---- Theorem 3.1: ∇_θ D with π_t frozen == ∇_θ L_DI* with the exact assistant ------------------------------------


def _true_divergence_grads(distance, huber_c, weighting, seed):
    """Per-sample ∇_θ of w(t)·d(s_θ,t(x_t) − s_ref,t(x_t)) at x_t ~ p_sg[θ],t (autograd through s_θ only)."""
    z, eps, alpha_t, sigma_t, _ = _draw(N_SAMPLES, seed)
    x_t = diffuse(MU + z @ A.T, eps, alpha_t, sigma_t)  # a sample of the frozen π_t: no graph
    mu_b, a_b = _per_sample_params(N_SAMPLES)
    score_theta = -torch.linalg.solve(_generator_cov(a_b, alpha_t, sigma_t), x_t - alpha_t * mu_b)
    score_ref = -(x_t - alpha_t * M_REF)
    weight = time_weighting(weighting, alpha_t, sigma_t).squeeze(-1)
    (weight * score_distance(score_theta - score_ref, distance, huber_c)).sum().backward()
    return _grads(mu_b, a_b)


def _di_star_grads(distance, huber_c, weighting, seed, detach_distance_grad=False):
    """Per-sample ∇_θ of L_DI* (:func:`score_divergence_loss`) on the same draws, optionally with sg[d'(y)]."""
    z, eps, alpha_t, sigma_t, _ = _draw(N_SAMPLES, seed)
    mu_b, a_b = _per_sample_params(N_SAMPLES)
    x_t = diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t)
    eps_assistant, eps_reference = _exact_networks(alpha_t, sigma_t)
    weight = time_weighting(weighting, alpha_t, sigma_t)
    if detach_distance_grad:  # the tempting mistake: treat d'(y_t) as a constant
        y_t = -(eps_assistant(x_t) - eps_reference(x_t)) / sigma_t
        residual = -(eps_assistant(x_t) - eps) / sigma_t
        loss = -weight.squeeze(-1) * (score_distance_grad(y_t, distance, huber_c).detach() * residual).sum(1)
    else:
        loss = score_divergence_loss(x_t, eps, sigma_t, eps_assistant, eps_reference, weight, distance, huber_c)
    loss.sum().backward()
    return _grads(mu_b, a_b)


@pytest.mark.parametrize(
    ("distance", "huber_c", "weighting"), [("pseudo_huber", 0.5, "sigma"), ("l2", 1.0, "sigma_squared")]
)
def test_theorem_3_1_score_divergence_gradient(distance, huber_c, weighting):
    true_grads = _true_divergence_grads(distance, huber_c, weighting, seed=0)
    di_star_grads = _di_star_grads(distance, huber_c, weighting, seed=0)
    z_scores, se, mean_grad = _mc_z_scores(true_grads, di_star_grads)
    assert z_scores.abs().max() < Z_TOL, (z_scores, mean_grad)
    assert (se < 0.03 * mean_grad.norm()).all(), (se, mean_grad)  # the check has power: SE ≪ |∇D|
    assert mean_grad.norm() > 0.1  # and the gradient is not trivially zero

    wrong_grads = _di_star_grads(distance, huber_c, weighting, seed=0, detach_distance_grad=True)
    wrong_z, _, _ = _mc_z_scores(true_grads, wrong_grads)
    assert wrong_z.abs().max() > 4 * Z_TOL, wrong_z  # detaching d'(y_t) is detectably wrong


# ---- KL (Diff-Instruct / DI++) and the implicit CFG reward -----------------------------------------------------


def test_kl_divergence_gradient_matches_integral_kl():
    z, eps, alpha_t, sigma_t, _ = _draw(N_SAMPLES, seed=1)
    weight = time_weighting("sigma_squared", alpha_t, sigma_t)

    mu_b, a_b = _per_sample_params(N_SAMPLES)  # closed form: KL(N(α μ, Σ_θ,t) ‖ N(α m, I)), per sample of t
    cov = _generator_cov(a_b, alpha_t, sigma_t)
    mean_gap = alpha_t * (mu_b - M_REF)
    kl = 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + mean_gap.pow(2).sum(-1) - 2 - torch.logdet(cov))
    (weight.squeeze(-1) * kl).sum().backward()
    true_grads = _grads(mu_b, a_b)

    mu_b, a_b = _per_sample_params(N_SAMPLES)
    x_t = diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t)
    kl_divergence_loss(x_t, sigma_t, *_exact_networks(alpha_t, sigma_t), weight).sum().backward()
    z_scores, se, mean_grad = _mc_z_scores(true_grads, _grads(mu_b, a_b))
    assert z_scores.abs().max() < Z_TOL, (z_scores, mean_grad)
    assert (se < 0.03 * mean_grad.norm()).all(), (se, mean_grad)


M_COND, M_OTHER = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([-1.5, 0.0], dtype=torch.float64)


def _cfg_reference(alpha_t, sigma_t):
    """p_ref(x|c) = N(m_c, I), p_ref(x|∅) = ½N(m_c, I) + ½N(m_o, I): exact log-densities and ε at every t."""
    means = torch.stack([M_COND, M_OTHER])  # the diffused components are N(α_t m_i, I)

    def log_cond(x):
        return -0.5 * (x - alpha_t * M_COND).pow(2).sum(-1)

    def log_uncond(x):
        return torch.logsumexp(-0.5 * (x.unsqueeze(1) - alpha_t.unsqueeze(1) * means).pow(2).sum(-1), dim=1)

    def eps_cond(x):
        return sigma_t * (x - alpha_t * M_COND)

    def eps_uncond(x):
        resp = torch.softmax(-0.5 * (x.unsqueeze(1) - alpha_t.unsqueeze(1) * means).pow(2).sum(-1), dim=1)
        return sigma_t * (x - alpha_t * (resp @ means))

    return log_cond, log_uncond, eps_cond, eps_uncond


def test_implicit_cfg_reward_gradient_matches_log_density_ratio():
    n, cfg_scale = 2_000, 2.5
    z, eps, alpha_t, sigma_t, _ = _draw(n, seed=2)
    weight = time_weighting("sigma", alpha_t, sigma_t)
    log_cond, log_uncond, eps_cond, eps_uncond = _cfg_reference(alpha_t, sigma_t)

    mu_b, a_b = _per_sample_params(n)  # ∇_θ E[−α_cfg w(t) (log p_t(x_t|c) − log p_t(x_t|∅))], pathwise
    x_t = diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t)
    (-cfg_scale * weight.squeeze(-1) * (log_cond(x_t) - log_uncond(x_t))).sum().backward()
    true_grads = _grads(mu_b, a_b)

    mu_b, a_b = _per_sample_params(n)
    x_t = diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t)
    implicit_cfg_reward_loss(x_t, sigma_t, eps_cond, eps_uncond, cfg_scale, weight).sum().backward()
    # Per sample the two are the same pathwise derivative, so they agree to rounding, not just in expectation.
    torch.testing.assert_close(_grads(mu_b, a_b), true_grads, rtol=1e-9, atol=1e-12)
    assert true_grads.mean(0).norm() > 0.1


# ---- Signs: a few steps on each term alone move the toy the expected way ----------------------------------------


def _steps(loss_fn, n_steps=20, lr=0.05, mu=MU, a=A):
    """Plain gradient descent on θ = (μ, A) with fresh draws each step; the exact assistant follows sg[θ]."""
    mu, a = mu.clone().requires_grad_(True), a.clone().requires_grad_(True)
    for step in range(n_steps):
        z, eps, alpha_t, sigma_t, _ = _draw(4096, seed=100 + step)
        x0 = mu + z @ a.T
        loss = loss_fn(x0, z, eps, alpha_t, sigma_t, mu.detach(), a.detach()).mean()
        grad_mu, grad_a = torch.autograd.grad(loss, (mu, a))
        with torch.no_grad():
            mu -= lr * grad_mu
            a -= lr * grad_a
    return mu.detach(), a.detach()


def _exact_networks_at(mu, a, alpha_t, sigma_t, eps_reference=None):
    eps_assistant = _gaussian_eps(alpha_t * mu, _generator_cov(a, alpha_t, sigma_t), sigma_t)
    return eps_assistant, eps_reference or _unit_gaussian_eps(alpha_t * M_REF, sigma_t)


def _moves_toward_reference(mu, a):
    return (mu - M_REF).norm() < 0.9 * (MU - M_REF).norm() and (a @ a.T - EYE).norm() < (A @ A.T - EYE).norm()


@pytest.mark.parametrize(("distance", "lr"), [("pseudo_huber", 0.2), ("l2", 0.05)])
def test_score_divergence_steps_move_generator_to_reference(distance, lr):
    def loss_fn(x0, z, eps, alpha_t, sigma_t, mu, a):
        x_t = diffuse(x0, eps, alpha_t, sigma_t)
        networks = _exact_networks_at(mu, a, alpha_t, sigma_t)
        return score_divergence_loss(x_t, eps, sigma_t, *networks, sigma_t**2, distance, huber_c=1.0)

    assert _moves_toward_reference(*_steps(loss_fn, lr=lr))


def test_kl_steps_move_generator_to_reference():
    def loss_fn(x0, z, eps, alpha_t, sigma_t, mu, a):
        x_t = diffuse(x0, eps, alpha_t, sigma_t)
        return kl_divergence_loss(x_t, sigma_t, *_exact_networks_at(mu, a, alpha_t, sigma_t))

    assert _moves_toward_reference(*_steps(loss_fn))


def test_reward_steps_move_generator_up_the_reward():
    direction = torch.tensor([0.6, 0.8], dtype=torch.float64)

    def loss_fn(x0, z, eps, alpha_t, sigma_t, mu, a):
        return reward_loss(x0 @ direction, reward_scale=2.0)

    mu, _ = _steps(loss_fn, n_steps=5, lr=0.1)
    torch.testing.assert_close(mu - MU, 5 * 0.1 * 2.0 * direction)  # linear reward: exact steps along ∇r


def test_implicit_cfg_reward_steps_move_generator_to_conditional_mode():
    start = 0.5 * (M_COND + M_OTHER)  # between the conditional mode and the other one

    def loss_fn(x0, z, eps, alpha_t, sigma_t, mu, a):
        _, _, eps_cond, eps_uncond = _cfg_reference(alpha_t, sigma_t)
        x_t = diffuse(x0, eps, alpha_t, sigma_t)
        return implicit_cfg_reward_loss(x_t, sigma_t, eps_cond, eps_uncond, cfg_reward_scale=1.0)

    mu, _ = _steps(loss_fn, lr=0.5, mu=start, a=0.3 * EYE)
    assert (mu - M_COND).norm() < 0.8 * (start - M_COND).norm()
    assert (mu - M_OTHER).norm() > (start - M_OTHER).norm()


def test_cfg_enhanced_reference_pushes_past_the_conditional_mode():
    eps_uncond, eps_cond = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(cfg_eps(eps_uncond, eps_cond, 0.0), eps_uncond)
    torch.testing.assert_close(cfg_eps(eps_uncond, eps_cond, 1.0), eps_cond)
    torch.testing.assert_close(cfg_eps(eps_uncond, eps_cond, 7.5), torch.tensor([[16.0, 13.0]]))

    def loss_fn(x0, z, eps, alpha_t, sigma_t, mu, a):  # generator at p(x|c); reference guided with γ = 3
        _, _, eps_c, eps_u = _cfg_reference(alpha_t, sigma_t)
        networks = _exact_networks_at(mu, a, alpha_t, sigma_t, lambda x: cfg_eps(eps_u(x), eps_c(x), 3.0))
        x_t = diffuse(x0, eps, alpha_t, sigma_t)
        return score_divergence_loss(x_t, eps, sigma_t, *networks, sigma_t**2, "l2")

    mu, _ = _steps(loss_fn, lr=0.05, mu=M_COND, a=EYE)
    assert (mu - M_COND) @ (M_COND - M_OTHER) > 0.05  # guidance moves samples away from the other mode


def test_dsm_steps_move_assistant_to_generator_mean():
    mean = torch.tensor([1.0, -1.0], dtype=torch.float64)  # data N(mean, I); assistant N(ν, I) with ν learnable
    nu = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([nu], lr=2.0)
    for step in range(30):
        z, eps, alpha_t, sigma_t, _ = _draw(4096, seed=200 + step)
        x_t = diffuse(mean + z, eps, alpha_t, sigma_t)
        optimizer.zero_grad()
        assistant_dsm_loss(x_t, eps, _unit_gaussian_eps(alpha_t * nu, sigma_t)).mean().backward()
        optimizer.step()
    torch.testing.assert_close(nu.detach(), mean, atol=0.1, rtol=0)


def test_dsm_loss_reaches_only_the_assistant():
    x_t = torch.randn(3, 4, requires_grad=True)
    weight = torch.tensor(2.0, requires_grad=True)
    loss = assistant_dsm_loss(x_t, torch.zeros(3, 4), lambda x: weight * x)
    loss.sum().backward()
    assert x_t.grad is None and weight.grad is not None
    torch.testing.assert_close(loss, (2 * x_t.detach()).pow(2).mean(1))


# ---- Values, zeros, dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2"])
def test_distance_grad_is_the_gradient_of_the_distance(distance):
    y = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    score_distance(y, distance, huber_c=0.7).sum().backward()
    torch.testing.assert_close(score_distance_grad(y.detach(), distance, huber_c=0.7), y.grad)


def test_distance_values():
    y = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(score_distance(y, "l2"), torch.tensor([25.0]))
    torch.testing.assert_close(score_distance(y, "pseudo_huber", huber_c=0.0), torch.tensor([5.0]))
    torch.testing.assert_close(score_distance(y, "pseudo_huber", huber_c=12.0), torch.tensor([1.0]))
    torch.testing.assert_close(score_distance_grad(y, "pseudo_huber", huber_c=12.0), y / 13)
    with pytest.raises(ValueError, match="'l1'"):
        score_distance(y, "l1")


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2"])
def test_regularisers_vanish_when_assistant_equals_reference(distance):
    z, eps, alpha_t, sigma_t, _ = _draw(64, seed=3)
    _, eps_reference = _exact_networks(alpha_t, sigma_t)
    for loss_fn in (
        lambda x_t: score_divergence_loss(x_t, eps, sigma_t, eps_reference, eps_reference, 1.0, distance),
        lambda x_t: kl_divergence_loss(x_t, sigma_t, eps_reference, eps_reference),
    ):
        mu_b, a_b = _per_sample_params(64)
        loss = loss_fn(diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t))
        assert torch.equal(loss, torch.zeros(64, dtype=torch.float64))
        grad_mu, grad_a = torch.autograd.grad(loss.sum(), (mu_b, a_b), allow_unused=True)
        assert grad_mu is None or not grad_mu.any()
        assert grad_a is None or not grad_a.any()


def test_losses_finite_in_bf16_at_extreme_timesteps():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 2, 4, 8, 8, generator=g)
    t = torch.tensor([0, 999])

    def all_losses(dtype):
        alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD, t, x0.to(dtype))
        x_t = diffuse(x0.to(dtype), eps.to(dtype), alpha_t, sigma_t)
        eps_assistant, eps_reference = (lambda x: 0.9 * x + 0.1), (lambda x: 0.5 * x - 0.2)
        weight = time_weighting("constant", alpha_t, sigma_t)
        return torch.stack(
            [
                assistant_dsm_loss(x_t, eps.to(dtype), eps_assistant),
                score_divergence_loss(x_t, eps.to(dtype), sigma_t, eps_assistant, eps_reference, weight),
                score_divergence_loss(x_t, eps.to(dtype), sigma_t, eps_assistant, eps_reference, weight, "l2"),
                kl_divergence_loss(x_t, sigma_t, eps_assistant, eps_reference, weight),
                implicit_cfg_reward_loss(x_t, sigma_t, eps_assistant, eps_reference, 7.5, weight),
                reward_loss(x_t.flatten(1).mean(1), 100.0),
            ]
        )

    bf16, reference = all_losses(torch.bfloat16), all_losses(torch.float64)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    # Inputs and network outputs are bf16-rounded (2^-8 relative) and ε̂ − ε cancels at t = 999: 10% is that noise;
    # an overflow, a division by a bf16 σ_0 or a bf16 sum over C·H·W would miss by far more or give inf/NaN.
    torch.testing.assert_close(bf16.double(), reference, rtol=0.1, atol=0.05)


def test_time_sampler_and_weightings():
    t = sample_timesteps(20_000, generator=torch.Generator().manual_seed(5))
    assert t.dtype == torch.long and t.min() == DEFAULT_T_MIN and t.max() == DEFAULT_T_MAX
    assert abs(t.double().mean().item() - 500) < 5
    with pytest.raises(ValueError, match="t_min=500"):
        sample_timesteps(4, t_min=500, t_max=100)

    alpha_t, sigma_t = torch.tensor([[0.6]]), torch.tensor([[0.8]])
    torch.testing.assert_close(time_weighting("constant", alpha_t, sigma_t), torch.tensor([[1.0]]))
    torch.testing.assert_close(time_weighting("sigma", alpha_t, sigma_t), torch.tensor([[0.8]]))
    torch.testing.assert_close(time_weighting("sigma_squared", alpha_t, sigma_t), torch.tensor([[0.64]]))
    with pytest.raises(ValueError, match="'snr'"):
        time_weighting("snr", alpha_t, sigma_t)


def test_score_divergence_value_by_hand():
    # One sample, σ_t = 0.5: y = −(ε̂_ψ − ε̂_ref)/σ = (−2, 0), residual = −(ε̂_ψ − ε)/σ = (−2, −2),
    # d'(y) = 2y = (−4, 0) for L2, so the loss is −w·(8) = −24 with w = 3; pseudo-Huber c = 0: d'(y) = (−1, 0) → −6.
    x_t, eps, sigma_t = torch.zeros(1, 2), torch.tensor([[0.0, -1.0]]), torch.tensor([[0.5]])

    def eps_assistant(x):
        return x + torch.tensor([[1.0, 0.0]])

    def eps_reference(x):
        return x

    l2 = score_divergence_loss(x_t, eps, sigma_t, eps_assistant, eps_reference, 3.0, "l2")
    huber = score_divergence_loss(x_t, eps, sigma_t, eps_assistant, eps_reference, 3.0, "pseudo_huber", huber_c=0.0)
    torch.testing.assert_close(l2, torch.tensor([-24.0]))
    torch.testing.assert_close(huber, torch.tensor([-6.0]))


# ---- the 2D toy study runs Algorithm 1 on these losses ----------------------------------------------------------


def test_toy_2d_example_writes_table_and_figure(tmp_path, monkeypatch):
    path = Path(__file__).parents[1] / "examples" / "toy_2d.py"
    spec = importlib.util.spec_from_file_location("toy_2d", path)
    toy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_2d", toy)  # dataclasses look their module up there
    spec.loader.exec_module(toy)
    rows = toy.main(["--quick", "--steps", "2", "--out", str(tmp_path)])
    assert [method for _, method, _ in rows[2:]] == list(toy.METHODS)
    assert rows[1][2][0]["modes"] == 8  # the regression init covers every mode of the reference
    table = (tmp_path / "results.md").read_text()
    assert table.count("| 1 | ") == len(toy.METHODS)
    assert (tmp_path / "toy_study.png").stat().st_size > 10_000
