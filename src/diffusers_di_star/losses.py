"""The DI* objective, one pure function per term (arXiv 2410.20898; ``docs/math.md`` §3–9).

Every loss takes the randomness (ε, t through α_t/σ_t) and the networks from the caller and returns the per-sample,
unreduced loss ``[B]`` in at least float32; the caller reduces, weights against other terms and logs.

Networks enter as *ε-predictors*: callables ``eps_fn(x_t) -> eps_hat`` with the timestep and the conditioning already
bound (e.g. ``functools.partial`` over a UNet call). Each loss decides where gradients may flow, so a caller cannot
get a stop-gradient wrong:

* :func:`score_divergence_loss` evaluates the assistant and the reference at x_t *with* its graph, because Theorem 3.1
  differentiates through their inputs (their parameters stay frozen: the caller excludes them from the optimiser
  and sets ``requires_grad_(False)`` while the generator steps);
* :func:`assistant_dsm_loss` evaluates the assistant at sg[x_t], so gradients reach ψ only;
* :func:`kl_divergence_loss` and :func:`implicit_cfg_reward_loss` evaluate the networks at sg[x_t] under
  ``torch.no_grad``, as their equations' stop-gradients say.

Scores and ε-predictions convert with :mod:`diffusers_di_star.one_step` (s = −ε̂/σ_t).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .defaults import DEFAULT_T_MAX, DEFAULT_T_MIN, DISTANCES
from .one_step import eps_to_score

__all__ = [
    "EpsPredictor",
    "DISTANCES",
    "TIME_WEIGHTINGS",
    "DEFAULT_T_MIN",
    "DEFAULT_T_MAX",
    "sample_timesteps",
    "time_weighting",
    "score_distance",
    "score_distance_grad",
    "assistant_dsm_loss",
    "score_divergence_loss",
    "kl_divergence_loss",
    "reward_loss",
    "cfg_eps",
    "implicit_cfg_reward_loss",
]

#: ``eps_fn(x_t) -> eps_hat``: an ε-prediction network with its timestep and conditioning bound.
EpsPredictor = Callable[[torch.Tensor], torch.Tensor]

#: Named time weightings w(t), as functions of (α_t, σ_t); see :func:`time_weighting`. The command lines offer these
#: names before torch is imported, from :data:`~diffusers_di_star.defaults.TIME_WEIGHTING_NAMES` (a test keeps the two
#: equal). ``DISTANCES`` and the time sampler's ``DEFAULT_T_MIN``/``DEFAULT_T_MAX`` live there too.
TIME_WEIGHTINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "constant": lambda alpha_t, sigma_t: torch.ones_like(sigma_t),
    "sigma": lambda alpha_t, sigma_t: sigma_t,
    "sigma_squared": lambda alpha_t, sigma_t: sigma_t**2,
}


def sample_timesteps(
    batch_size: int,
    t_min: int = DEFAULT_T_MIN,
    t_max: int = DEFAULT_T_MAX,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """π(t): integer timesteps drawn uniformly from {t_min, …, t_max} inclusive (Algorithm 1; DMD2: [20, 980]).

    On SDXL's schedule σ_t rises fast: σ_20 = 0.14, σ_100 = 0.33, σ_400 = 0.76, σ_980 = 0.997, so uniform t puts
    about three quarters of the samples at σ_t > 0.6 (mostly noise) and few near the data.
    """
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return torch.randint(t_min, t_max + 1, (batch_size,), generator=generator, device=device)


def time_weighting(name: str, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """w(t) of eq. 3.2 by name, shaped like ``sigma_t``.

    Scores grow like 1/σ_t (s = −ε̂/σ_t), so in ε units the score-divergence loss scales as:

    * ``"constant"`` (w = 1): L2 term ∝ 1/σ_t², pseudo-Huber ∝ 1/σ_t once ‖y‖ ≫ c; dominated by small t.
    * ``"sigma"`` (w = σ_t): L2 ∝ 1/σ_t, pseudo-Huber O(1) once ‖y‖ ≫ c.
    * ``"sigma_squared"`` (w = σ_t², the λ(t) of denoising score matching): L2 O(1) in ε units,
      pseudo-Huber ∝ σ_t once ‖y‖ ≫ c; the KL term is then w·(s_ψ − s_ref)ᵀx_t = σ_t·(ε̂_ref − ε̂_ψ)ᵀx_t.
    """
    if name not in TIME_WEIGHTINGS:
        raise ValueError(f"unknown time weighting {name!r}; choose one of {sorted(TIME_WEIGHTINGS)}")
    return TIME_WEIGHTINGS[name](alpha_t, sigma_t)


def score_distance(y: torch.Tensor, distance: str = "pseudo_huber", huber_c: float = 1.0) -> torch.Tensor:
    """d(y) per sample (eq. 3.2): pseudo-Huber sqrt(‖y‖² + c²) − c, or ‖y‖² for ``"l2"``; ‖·‖ over C·H·W."""
    squared_norm = _upcast(y).flatten(1).pow(2).sum(1)
    if distance == "pseudo_huber":
        return (squared_norm + huber_c**2).sqrt() - huber_c
    if distance == "l2":
        return squared_norm
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def score_distance_grad(y: torch.Tensor, distance: str = "pseudo_huber", huber_c: float = 1.0) -> torch.Tensor:
    """d'(y) = ∇_y d(y): y / sqrt(‖y‖² + c²) for pseudo-Huber, 2y for ``"l2"`` (``docs/math.md`` §3)."""
    y = _upcast(y)
    if distance == "pseudo_huber":
        norm = (y.flatten(1).pow(2).sum(1) + huber_c**2).sqrt()
        return y / norm.reshape(-1, *([1] * (y.ndim - 1)))
    if distance == "l2":
        return 2 * y
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def assistant_dsm_loss(x_t: torch.Tensor, eps: torch.Tensor, eps_assistant: EpsPredictor) -> torch.Tensor:
    """Assistant denoising score matching (Algorithm 1, step 1): ‖ε̂_ψ(sg[x_t]) − ε‖², mean over C·H·W.

    This is λ(t)·‖s_ψ(x_t) − ∇log p_t(x_t|x0)‖² with λ(t) = σ_t², divided by the number of elements. Gradients reach
    only ψ (the network's parameters): x_t, built from sg[g_θ(z)], is detached here.
    """
    eps_hat = _upcast(eps_assistant(x_t.detach()))
    return (eps_hat - _upcast(eps)).flatten(1).pow(2).mean(1)


def score_divergence_loss(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    sigma_t: torch.Tensor,
    eps_assistant: EpsPredictor,
    eps_reference: EpsPredictor,
    weight: torch.Tensor | float = 1.0,
    distance: str = "pseudo_huber",
    huber_c: float = 1.0,
) -> torch.Tensor:
    """The DI* regulariser (eq. 3.3, Theorem 3.1): −w(t)·d'(y_t)ᵀ(s_ψ(x_t) − ∇log p_t(x_t|x0)) per sample.

    y_t = s_ψ(x_t) − s_ref(x_t) = −(ε̂_ψ − ε̂_ref)/σ_t and s_ψ − ∇log p_t(x_t|x0) = −(ε̂_ψ − ε)/σ_t, with
    x_t = α_t·g_θ(z) + σ_t·ε carrying the generator's graph. Both networks are called on that x_t and d'(y_t) is
    *not* detached: Theorem 3.1 differentiates through every place x_t is an input (``tests/test_losses.py`` shows
    that detaching d'(y_t) gives a wrong gradient). ``eps_reference`` may be CFG-enhanced (:func:`cfg_eps`, §4
    Choice 2). ``weight`` is w(t), a float or a tensor with one value per sample.
    """
    eps_hat_assistant = _upcast(eps_assistant(x_t))
    eps_hat_reference = _upcast(eps_reference(x_t))
    sigma_t = _upcast(sigma_t)
    y_t = eps_to_score(eps_hat_assistant - eps_hat_reference, sigma_t)
    score_residual = eps_to_score(eps_hat_assistant - _upcast(eps), sigma_t)
    inner = (score_distance_grad(y_t, distance, huber_c) * score_residual).flatten(1).sum(1)
    return -_per_sample(weight, inner) * inner


def kl_divergence_loss(
    x_t: torch.Tensor,
    sigma_t: torch.Tensor,
    eps_assistant: EpsPredictor,
    eps_reference: EpsPredictor,
    weight: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Integral-KL regulariser of Diff-Instruct / DI++ (``docs/math.md`` §6): w(t)·sg[s_ψ(x_t) − s_ref(x_t)]ᵀx_t.

    Its gradient is w(t)·(s_ψ − s_ref)ᵀ∂x_t/∂θ, the gradient of ∫ w(t) KL(p_θ,t ‖ p_ref,t) dt when s_ψ = s_{p_θ,t}.
    The networks see sg[x_t] and run without a graph.
    """
    with torch.no_grad():
        x_sg = x_t.detach()
        score_gap = eps_to_score(_upcast(eps_assistant(x_sg)) - _upcast(eps_reference(x_sg)), _upcast(sigma_t))
    inner = (score_gap * _upcast(x_t)).flatten(1).sum(1)
    return _per_sample(weight, inner) * inner


def reward_loss(reward: torch.Tensor, reward_scale: float) -> torch.Tensor:
    """Explicit reward term of eq. 3.1: −α_rew·r(x0, c), per sample (``reward`` is ``[B]``, differentiable in x0)."""
    return -reward_scale * _upcast(reward)


def cfg_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG-enhanced reference (§3.3 Choice 2, "DI*-In"): ε̂_ref^γ = ε̂_ref(x_t, ∅) + γ·(ε̂_ref(x_t, c) − ε̂_ref(x_t, ∅)).

    Use it inside the ``eps_reference`` callable of :func:`score_divergence_loss` (paper's best: γ = 7.5).
    """
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def implicit_cfg_reward_loss(
    x_t: torch.Tensor,
    sigma_t: torch.Tensor,
    eps_reference_cond: EpsPredictor,
    eps_reference_uncond: EpsPredictor,
    cfg_reward_scale: float,
    weight: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Implicit CFG reward (§3.3 Choice 1, "DI*-Out", Theorem 3.2): −α_cfg·w(t)·sg[s_ref(x_t|c) − s_ref(x_t|∅)]ᵀx_t.

    r_cfg(x, c) = log p_ref(x|c) − log p_ref(x|∅) has x-gradient s_ref(x|c) − s_ref(x|∅), so minimising this term
    ascends ∫ w(t) E[r_cfg(x_t)] dt. The minus sign is right (the poster prints +; ``tests/test_losses.py`` pins it).
    The networks see sg[x_t] and run without a graph.
    """
    with torch.no_grad():
        x_sg = x_t.detach()
        eps_gap = _upcast(eps_reference_cond(x_sg)) - _upcast(eps_reference_uncond(x_sg))
        score_gap = eps_to_score(eps_gap, _upcast(sigma_t))
    inner = (score_gap * _upcast(x_t)).flatten(1).sum(1)
    return -cfg_reward_scale * _per_sample(weight, inner) * inner


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Losses are computed in at least float32: bf16 sums over C·H·W and 1/σ_t at t = 0 lose too much.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample(weight: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    # w(t) arrives as a float, a [B] tensor or broadcast-shaped like σ_t ([B, 1, 1, 1]); return a scalar or [B].
    weight = torch.as_tensor(weight, device=like.device)
    return _upcast(weight).reshape(-1) if weight.ndim else _upcast(weight)
