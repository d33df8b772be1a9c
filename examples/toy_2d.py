"""DI* on a 2D toy with exact scores: does score regularisation keep the modes that a KL regulariser drops?

The reference is a mixture of 8 Gaussians on a ring, diffused with SDXL's discrete VP schedule (``alphas_cumprod``
of the scaled-linear betas 0.00085 → 0.012), so its score is exact at every t. A small MLP one-step generator,
built like the SDXL one (x0 = (z − σ_{t*}·ε̂_θ(z))/α_{t*}, t* = 399), is first fitted to the reference by regression
onto the probability-flow ODE map of the exact score (DMD's regression loss, with MSE). Then, at the same reward
scale and seeds, four objectives post-train it against the reward r(x) = tanh(x_2/2), which prefers the upper half of
the plane and saturates like a preference score:

* reward only: −α_rew·r;
* DI++: reward + the integral-KL regulariser (:func:`~diffusers_di_star.losses.kl_divergence_loss`);
* DI* pseudo-Huber / DI* L2: reward + :func:`~diffusers_di_star.losses.score_divergence_loss`.

The regularised methods use an MLP assistant s_ψ trained by denoising score matching on the generator's samples
(Algorithm 1), built as the exact reference score plus a zero-initialised MLP, so s_ψ = s_ref at the start as when
the assistant is initialised from SDXL base. All the math comes from ``diffusers_di_star.losses``.

    python examples/toy_2d.py --out outputs/toy          # full study: 3 α_rew × 3 seeds, < 2 minutes on 2 CPU cores
    python examples/toy_2d.py --quick --out outputs/toy  # short version (~15 s): one α_rew and one seed

Writes ``results.md`` (the table) and ``toy_study.png`` (the samples of each method) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw, ImageFont

from diffusers_di_star.losses import (
    assistant_dsm_loss,
    kl_divergence_loss,
    reward_loss,
    sample_timesteps,
    score_divergence_loss,
    time_weighting,
)
from diffusers_di_star.one_step import (
    DEFAULT_CONDITIONING_TIMESTEP,
    diffuse,
    eps_to_x0,
    schedule_coefficients,
    score_to_eps,
)
from diffusers_di_star.testing import get_sdxl_scheduler

ALPHAS_CUMPROD = get_sdxl_scheduler().alphas_cumprod
N_MODES, RING_RADIUS, MODE_STD = 8, 2.0, 0.25
MODES = torch.stack(
    [RING_RADIUS * torch.tensor([math.cos(a), math.sin(a)]) for a in torch.arange(N_MODES) * 2 * math.pi / N_MODES]
)
#: A sample "is on" a mode when within this radius of its centre; a mode is covered when it holds this much mass.
MODE_RADIUS, COVERED_MASS = 3 * MODE_STD, 0.02
METHODS = {  # name -> regulariser: None, "kl" or a distance of score_divergence_loss
    "reward only": None,
    "DI++ (KL + reward)": "kl",
    "DI* pseudo-Huber + reward": "pseudo_huber",
    "DI* L2 + reward": "l2",
}


@dataclass(frozen=True)
class ToyConfig:
    """Settings shared by every method; ``--quick`` shortens the run, everything else stays matched."""

    reward_scales: tuple[float, ...] = (0.3, 1.0, 3.0)  # α_rew, each shared by all methods
    seeds: int = 3
    steps: int = 300  # generator updates
    assistant_rounds: int = 2  # K_TA assistant updates per generator update (Algorithm 1)
    batch_size: int = 256
    generator_lr: float = 1e-4
    assistant_lr: float = 2e-3
    huber_c: float = 1.0  # pseudo-Huber constant, in score units
    weighting: str = "sigma_squared"  # w(t), the same for all regularisers
    pretrain_steps: int = 800
    n_eval: int = 8192


QUICK = ToyConfig(reward_scales=(1.0,), seeds=1, steps=200, pretrain_steps=400, n_eval=4096)


# ---- the reference: a mixture of Gaussians with an exact score at every t --------------------------------------


def reference_eps(x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """Exact ε̂_ref of the diffused mixture p_ref,t = (1/8) Σ_k N(α_t m_k, (α_t² s² + σ_t²) I)."""
    variance = alpha_t**2 * MODE_STD**2 + sigma_t**2
    offsets = x_t.unsqueeze(1) - alpha_t.unsqueeze(1) * MODES  # [B, K, 2]
    responsibilities = torch.softmax(-offsets.pow(2).sum(-1) / (2 * variance), dim=1)
    score = -(responsibilities.unsqueeze(-1) * offsets).sum(1) / variance
    return score_to_eps(score, sigma_t)


def sample_reference(n: int, generator: torch.Generator) -> torch.Tensor:
    modes = MODES[torch.randint(N_MODES, (n,), generator=generator)]
    return modes + MODE_STD * torch.randn(n, 2, generator=generator)


def reward(x0: torch.Tensor) -> torch.Tensor:
    """r(x) = tanh(x_2/2): prefers the upper half of the plane and saturates, like a preference score."""
    return torch.tanh(x0[:, 1] / 2)


# ---- networks --------------------------------------------------------------------------------------------------


def _mlp(in_features: int, width: int = 128) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, 2),
    )


class OneStepGenerator(torch.nn.Module):
    """g_θ(z) = (z − σ_{t*}·ε̂_θ(z))/α_{t*}: the SDXL one-step map with an MLP for the UNet."""

    def __init__(self):
        super().__init__()
        self.eps_net = _mlp(2)
        alpha_star, sigma_star = schedule_coefficients(ALPHAS_CUMPROD, DEFAULT_CONDITIONING_TIMESTEP, torch.zeros(1))
        self.register_buffer("alpha_star", alpha_star)
        self.register_buffer("sigma_star", sigma_star)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return eps_to_x0(z, self.eps_net(z), self.alpha_star, self.sigma_star)


class Assistant(torch.nn.Module):
    """ε̂_ψ(x_t, t) = ε̂_ref(x_t, t) + MLP(x_t, t) with a zero-initialised last layer, so s_ψ = s_ref at the start."""

    def __init__(self):
        super().__init__()
        self.correction = _mlp(2 + 6)
        torch.nn.init.zeros_(self.correction[-1].weight)
        torch.nn.init.zeros_(self.correction[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor):
        phase = t.float().unsqueeze(1) / 1000 * 2 * math.pi * torch.tensor([1.0, 2.0])
        features = torch.cat([x_t, alpha_t, sigma_t, phase.sin(), phase.cos()], dim=1)
        return reference_eps(x_t, alpha_t, sigma_t) + self.correction(features)


# ---- training --------------------------------------------------------------------------------------------------


def _diffusion_draw(x0: torch.Tensor, generator: torch.Generator):
    """t ~ π(t) = U{20, …, 980}, ε ~ N(0, I), x_t = α_t x0 + σ_t ε."""
    t = sample_timesteps(x0.shape[0], generator=generator)
    alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD, t, x0)
    eps = torch.randn(x0.shape, generator=generator)
    return t, alpha_t, sigma_t, eps, diffuse(x0, eps, alpha_t, sigma_t)


@torch.no_grad()
def probability_flow_map(z: torch.Tensor, n_steps: int = 50) -> torch.Tensor:
    """Deterministic DDIM (probability-flow ODE) from x_999 = z to x0 with the exact reference ε̂."""
    timesteps = torch.linspace(999, 0, n_steps + 1).round().long()
    x_t = z
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
        alpha_t, sigma_t = schedule_coefficients(ALPHAS_CUMPROD, t, x_t)
        eps_hat = reference_eps(x_t, alpha_t, sigma_t)
        x_t = diffuse(
            eps_to_x0(x_t, eps_hat, alpha_t, sigma_t), eps_hat, *schedule_coefficients(ALPHAS_CUMPROD, t_next, x_t)
        )
    alpha_0, sigma_0 = schedule_coefficients(ALPHAS_CUMPROD, 0, x_t)
    return eps_to_x0(x_t, reference_eps(x_t, alpha_0, sigma_0), alpha_0, sigma_0)


def pretrain_generator(config: ToyConfig) -> dict:
    """Fit g_θ to the reference by regression onto the probability-flow map z ↦ x0 (DMD's regression loss)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16384, 2, generator=g)
    targets = probability_flow_map(z)
    torch.manual_seed(0)
    generator = OneStepGenerator()
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.pretrain_steps)
    for _ in range(config.pretrain_steps):
        index = torch.randint(z.shape[0], (512,), generator=g)
        loss = (generator(z[index]) - targets[index]).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return generator.state_dict()


def generator_loss(method: str, generator, assistant, z: torch.Tensor, reward_scale: float, config, g):
    """Algorithm 1, step 2: −α_rew·r(x0) plus the method's regulariser, per sample."""
    x0 = generator(z)
    loss = reward_loss(reward(x0), reward_scale)
    regulariser = METHODS[method]
    if regulariser is None:
        return loss
    t, alpha_t, sigma_t, eps, x_t = _diffusion_draw(x0, g)
    weight = time_weighting(config.weighting, alpha_t, sigma_t)

    def eps_assistant(x):
        return assistant(x, t, alpha_t, sigma_t)

    def eps_reference(x):
        return reference_eps(x, alpha_t, sigma_t)

    if regulariser == "kl":
        return loss + kl_divergence_loss(x_t, sigma_t, eps_assistant, eps_reference, weight)
    return loss + score_divergence_loss(
        x_t, eps, sigma_t, eps_assistant, eps_reference, weight, regulariser, config.huber_c
    )


def assistant_step(generator, assistant, optimizer, config: ToyConfig, g: torch.Generator) -> None:
    """Algorithm 1, step 1: denoising score matching on sg[g_θ(z)]."""
    with torch.no_grad():
        x0 = generator(torch.randn(config.batch_size, 2, generator=g))
    t, alpha_t, sigma_t, eps, x_t = _diffusion_draw(x0, g)
    loss = assistant_dsm_loss(x_t, eps, lambda x: assistant(x, t, alpha_t, sigma_t)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def post_train(method: str, init_state: dict, reward_scale: float, seed: int, config: ToyConfig) -> OneStepGenerator:
    """Post-train a copy of the initial generator with one method; the seed fixes every draw and the assistant init."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    generator, assistant = OneStepGenerator(), Assistant()
    generator.load_state_dict(init_state)
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=config.generator_lr)
    assistant_optimizer = torch.optim.Adam(assistant.parameters(), lr=config.assistant_lr)
    for _ in range(config.steps):
        if METHODS[method] is not None:
            for _ in range(config.assistant_rounds):
                assistant_step(generator, assistant, assistant_optimizer, config, g)
        assistant.requires_grad_(False)  # ψ is frozen while θ steps; x_t still carries θ's graph into it
        z = torch.randn(config.batch_size, 2, generator=g)
        loss = generator_loss(method, generator, assistant, z, reward_scale, config, g).mean()
        generator_optimizer.zero_grad()
        loss.backward()
        generator_optimizer.step()
        assistant.requires_grad_(True)
    return generator


# ---- evaluation ------------------------------------------------------------------------------------------------


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_directions: int = 256) -> float:
    """Sliced 2-Wasserstein distance (equal sample counts): sqrt of the mean W2² over evenly spaced 1D projections."""
    angles = torch.linspace(0, math.pi, n_directions + 1)[:-1]
    directions = torch.stack([angles.cos(), angles.sin()])
    projected_x, projected_y = (x @ directions).sort(0).values, (y @ directions).sort(0).values
    return (projected_x - projected_y).pow(2).mean().sqrt().item()


def mode_masses(x0: torch.Tensor) -> torch.Tensor:
    """Fraction of the samples within ``MODE_RADIUS`` of each mode centre."""
    return ((x0.unsqueeze(1) - MODES).norm(dim=-1) < MODE_RADIUS).float().mean(0)


def evaluate(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    masses = mode_masses(samples)
    return {
        "reward": reward(samples).mean().item(),
        "modes": float((masses >= COVERED_MASS).sum()),
        "on_mode": masses.sum().item(),
        "sw": sliced_wasserstein(samples, reference),
    }


# ---- report ----------------------------------------------------------------------------------------------------

COLUMNS = (  # metric key, header, format
    ("reward", "mean reward ↑", "{:.3f}"),
    ("modes", f"modes covered (of {N_MODES})", "{:.1f}"),
    ("on_mode", "mass on modes", "{:.2f}"),
    ("sw", "sliced W2 to reference ↓", "{:.3f}"),
)


def results_table(rows: list[tuple[str, str, list[dict]]]) -> str:
    """Markdown table with one row per (α_rew, method): mean ± std over seeds of each metric."""
    lines = ["| α_rew | method | " + " | ".join(header for _, header, _ in COLUMNS) + " |"]
    lines.append("|---" * (2 + len(COLUMNS)) + "|")
    for scale, method, runs in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
            spread = f" ± {fmt.format(values.std().item())}" if len(runs) > 1 else ""
            cells.append(fmt.format(values.mean().item()) + spread)
        lines.append(f"| {scale} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PANEL_SIZE, PANEL_HEADER, PANEL_EXTENT = 320, 22, 3.6
LEGEND = (
    "2D toy study of DI* (examples/toy_2d.py)",
    "",
    "red: 2000 samples of the generator (seed 0)",
    "grey discs: the 8 reference modes (radius 3 std)",
    "blue: reward r(x) = tanh(x2 / 2), darker = higher",
    "rows below: reward scale alpha_rew, same for all",
    f"view: [-{PANEL_EXTENT}, {PANEL_EXTENT}]^2",
)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=13)


def _legend_panel(lines: tuple[str, ...]) -> Image.Image:
    panel = Image.new("RGB", (PANEL_SIZE, PANEL_SIZE + PANEL_HEADER), "white")
    draw = ImageDraw.Draw(panel)
    for index, line in enumerate(lines):
        draw.text((8, PANEL_HEADER + 10 + 20 * index), line, fill="black", font=_font())
    return panel


def _panel(samples: torch.Tensor, title: str) -> Image.Image:
    """One scatter panel: the reward as a blue background gradient, grey mode discs, samples as red dots."""
    size, header, extent = PANEL_SIZE, PANEL_HEADER, PANEL_EXTENT
    panel = Image.new("RGB", (size, size + header), "white")
    draw = ImageDraw.Draw(panel)
    for row in range(size):
        shade = int(255 - 45 * (1 + math.tanh((extent - 2 * extent * row / size) / 2)) / 2)
        draw.line([(0, header + row), (size, header + row)], fill=(shade, shade, 255))

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (x + extent) / (2 * extent) * size, header + (extent - y) / (2 * extent) * size

    radius = MODE_RADIUS / (2 * extent) * size
    for mx, my in MODES.tolist():
        cx, cy = to_pixel(mx, my)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=(140, 140, 140))
    for x, y in samples[:2000].tolist():
        px, py = to_pixel(x, y)
        draw.rectangle([px - 1, py - 1, px, py], fill=(200, 30, 30))
    off_panel = (samples.abs() > extent).any(1).float().mean().item()
    draw.rectangle([0, 0, size, header - 1], fill="white")
    suffix = f" ({off_panel:.0%} off view)" if off_panel >= 0.005 else ""
    draw.text((4, 4), title + suffix, fill="black", font=_font())
    return panel


def draw_figure(panel_rows: list[list[tuple[str, torch.Tensor]]], path: str, gap: int = 6) -> None:
    """A grid of scatter panels, one list of (title, samples) per row, with the legend after the first row."""
    images = [[_panel(samples, title) for title, samples in row] for row in panel_rows]
    images[0].append(_legend_panel(LEGEND))
    width, height = images[0][0].size
    columns = max(len(row) for row in images)
    figure = Image.new("RGB", (columns * (width + gap) - gap, len(images) * (height + gap) - gap), "white")
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            figure.paste(image, (c * (width + gap), r * (height + gap)))
    figure.save(path)


# ---- main ------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[argparse.Namespace, ToyConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.md and toy_study.png")
    parser.add_argument("--quick", action="store_true", help="short run (one α_rew, one seed), as `make demo` uses")
    parser.add_argument("--seeds", type=int, help="override the number of seeds")
    parser.add_argument("--steps", type=int, help="override the number of generator updates")
    parser.add_argument("--reward-scales", type=float, nargs="+", help="override the α_rew values")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else ToyConfig()
    overrides = {"seeds": args.seeds, "steps": args.steps, "reward_scales": args.reward_scales}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if "reward_scales" in overrides:
        overrides["reward_scales"] = tuple(overrides["reward_scales"])
    return args, replace(config, **overrides)


def main(argv=None) -> list[tuple[str, str, list[dict]]]:
    args, config = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    eval_g = torch.Generator().manual_seed(12345)
    reference, other_reference = sample_reference(config.n_eval, eval_g), sample_reference(config.n_eval, eval_g)
    eval_z = torch.randn(config.n_eval, 2, generator=eval_g)

    initial = OneStepGenerator()
    initial.load_state_dict(pretrain_generator(config))
    with torch.no_grad():
        initial_samples = initial(eval_z)
    rows = [
        ("–", "reference (fresh samples)", [evaluate(other_reference, reference)]),
        ("–", "initial generator", [evaluate(initial_samples, reference)]),
    ]
    panel_rows = [[("reference", reference), ("initial generator", initial_samples)]]
    for scale in config.reward_scales:
        panel_rows.append([])
        for method in METHODS:
            runs = []
            for seed in range(config.seeds):
                generator = post_train(method, initial.state_dict(), scale, seed, config)
                with torch.no_grad():
                    samples = generator(eval_z)
                runs.append(evaluate(samples, reference))
                if seed == 0:
                    short_name = method.replace(" + reward", "")
                    panel_rows[-1].append((f"{short_name}, alpha_rew={scale:g}", samples))
            rows.append((f"{scale:g}", method, runs))
            print(f"α_rew={scale:g} {method}: done at {time.perf_counter() - start:.0f} s", flush=True)

    table = results_table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# DI* 2D toy study\n\n{table}\nMean ± std over {config.seeds} seeds. Settings: `{config}`\n")
    draw_figure(panel_rows, os.path.join(args.out, "toy_study.png"))
    print(table + f"written to {args.out} in {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest and leaves the other cores alone
    main()
