"""Training benchmark (issue 6): one DI* iteration per layout and batch size, as the example trainer runs it.

One iteration is what ``examples/train_di_star_sdxl.py`` does per step: encode the prompts, then under bf16 autocast
K_TA times ``assistant_loss`` → backward → clip → AdamW step, then ``generator_loss`` (PickScore reward through the
VAE decoder, CFG-enhanced reference, pseudo-Huber score divergence) → backward → clip → AdamW step, the update being
the trainer's own (:func:`~diffusers_di_star.training.engine.optimisation_step`, single process). The networks come
from :func:`~diffusers_di_star.training.setup_networks` with gradient checkpointing; frozen weights are bf16, LoRA
weights and optimiser states float32.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from ..training import DIStarConfig, DIStarNetworks, assistant_loss, encode_prompts, generator_loss, setup_networks
from ..training.engine import RoleOptimisation, all_finite, backward, optimisation_step
from .components import build_pickscore_reward, build_scheduler, build_text_encoders, build_unet, build_vae
from .inference import PROMPT
from .measure import Measurement, free_memory, measure
from .report import NOT_AVAILABLE, SuiteResult, format_memory, format_ratio, markdown_table
from .settings import TRAINING_LAYOUTS, BenchSettings

__all__ = ["TRAINING_DTYPE", "DIStarIteration", "build_networks", "run_training_benchmark"]

TRAINING_DTYPE = torch.bfloat16
_LEARNING_RATE, _MAX_GRAD_NORM = 1e-5, 1.0
#: Stop the largest-batch search here: a batch this large is beyond any recipe.
MAX_BATCH_SEARCHED = 64


def build_networks(
    layout: str,
    config: DIStarConfig,
    settings: BenchSettings,
    dtype: torch.dtype = TRAINING_DTYPE,
    gradient_checkpointing: bool = True,
) -> DIStarNetworks:
    """The three DI* networks in ``layout`` (:data:`~.settings.TRAINING_LAYOUTS`), random weights, frozen ones in
    ``dtype``, checkpointed unless ``gradient_checkpointing`` is off (the memory estimate varies both)."""
    reference = build_unet(settings.size, settings.device, dtype, settings.seed)
    if layout == "three-in-one":
        return setup_networks(config, reference, None, dtype, gradient_checkpointing=gradient_checkpointing)
    if layout == "full":
        full = dataclasses.replace(config, use_lora=False)  # the reference is checkpointed too
        return setup_networks(full, reference, None, dtype, gradient_checkpointing=gradient_checkpointing)
    generator, frozen_reference = copy.deepcopy(reference), copy.deepcopy(reference)
    if gradient_checkpointing:
        frozen_reference.enable_gradient_checkpointing()
    networks = setup_networks(config, reference, generator, dtype, gradient_checkpointing=gradient_checkpointing)
    return dataclasses.replace(networks, reference_unet=frozen_reference)


class DIStarIteration:
    """One DI* training iteration at a given batch size; ``reset`` drops gradients after an out-of-memory error.

    ``finite`` is the optimiser step's non-finite check (:func:`~diffusers_di_star.training.engine.optimisation_step`).
    """

    def __init__(
        self,
        networks: DIStarNetworks,
        config: DIStarConfig,
        text,
        vae,
        reward,
        settings: BenchSettings,
        finite: Callable[..., bool] = all_finite,
    ):
        self.networks, self.config, self.vae, self.reward, self.device = networks, config, vae, reward, settings.device
        self.finite = finite
        self.tokenizers, self.text_encoders = text
        self.alphas_cumprod = build_scheduler().alphas_cumprod.to(settings.device)
        self.optimisation = {}
        for role in ("generator", "assistant"):
            parameters = networks.trainable_parameters(role)
            optimizer = torch.optim.AdamW(parameters, lr=_LEARNING_RATE)
            self.optimisation[role] = RoleOptimisation(optimizer, None, parameters)

    def _update(self, role: str, loss: torch.Tensor) -> None:
        backward(None, loss)
        optimisation_step(None, self.optimisation[role], [loss.detach()], _MAX_GRAD_NORM, self.finite)

    def __call__(self, batch_size: int) -> None:
        prompts = [PROMPT] * batch_size
        cond = encode_prompts(prompts, self.tokenizers, self.text_encoders, self.config.resolution)
        with torch.autocast(self.device.type, dtype=TRAINING_DTYPE):
            for _ in range(self.config.assistant_updates_per_step):
                self._update("assistant", assistant_loss(self.networks, self.config, cond, self.alphas_cumprod)[0])
            loss, _ = generator_loss(
                self.networks, self.config, cond, prompts, self.alphas_cumprod, self.vae, self.reward
            )
            self._update("generator", loss)

    def reset(self) -> None:
        for optimisation in self.optimisation.values():
            optimisation.optimizer.zero_grad(set_to_none=True)


def _try_measure(iteration: DIStarIteration, batch_size: int, settings: BenchSettings, warmup: int, repeats: int):
    """The measurement, or ``None`` when the batch does not fit in the GPU's memory."""
    try:
        return measure(lambda: iteration(batch_size), settings.device, warmup, repeats)
    except torch.OutOfMemoryError:
        pass  # free the memory outside the handler, once the traceback's frames are gone
    iteration.reset()
    free_memory(settings.device)
    return None


def _largest_batch(
    iteration: DIStarIteration,
    settings: BenchSettings,
    measured: dict[int, Measurement | None],
    on_probe: Callable[[int, Measurement | None], None] | None = None,
):
    """``(batch, measurement)`` of the largest batch that fits: doubling from the largest measured one that fit, then
    bisection. A probe is one iteration (its peak includes the optimiser state); ``on_probe(batch, measurement or
    None)`` hears each one as it ends, so a caller that cuts the search short keeps what it found."""
    fits = {batch: m for batch, m in measured.items() if m is not None}
    low = max(fits, default=0)
    high = min((batch for batch, m in measured.items() if m is None and batch > low), default=None)

    def probe(batch_size: int) -> bool:
        fits[batch_size] = _try_measure(iteration, batch_size, settings, warmup=0, repeats=1)
        if on_probe is not None:
            on_probe(batch_size, fits[batch_size])
        return fits[batch_size] is not None

    while high is None and low < MAX_BATCH_SEARCHED:
        candidate = min(max(2 * low, 1), MAX_BATCH_SEARCHED)
        low, high = (candidate, None) if probe(candidate) else (low, candidate)
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if probe(middle) else (low, middle)
    return low, fits.get(low)


def _config(settings: BenchSettings) -> DIStarConfig:
    rank = settings.size.lora_rank
    return DIStarConfig(
        reward_scale=100.0 if settings.reward else 0.0,
        assistant_updates_per_step=settings.assistant_updates,
        resolution=settings.resolution,
        generator_lora_rank=rank,
        generator_lora_alpha=rank,
        assistant_lora_rank=rank,
        assistant_lora_alpha=rank,
    )


def measure_training(settings: BenchSettings):
    """``(measurements, largest)``: ``{(layout, batch): Measurement or None}`` and ``{layout: (batch, Measurement)}``
    (empty unless ``settings.find_largest_batch``). The text encoders, VAE and reward are shared by all layouts."""
    text = build_text_encoders(settings.size, settings.device, TRAINING_DTYPE, settings.seed)
    vae = build_vae(settings.size, settings.device, TRAINING_DTYPE, settings.seed)
    vae.enable_gradient_checkpointing()
    reward = build_pickscore_reward(settings.size, settings.device, settings.seed) if settings.reward else None
    config = _config(settings)
    measurements, largest = {}, {}
    for layout in settings.layouts:
        iteration = DIStarIteration(build_networks(layout, config, settings), config, text, vae, reward, settings)
        measured = {
            batch: _try_measure(iteration, batch, settings, settings.warmup, settings.repeats)
            for batch in settings.training_batch_sizes
        }
        measurements |= {(layout, batch): m for batch, m in measured.items()}
        if settings.find_largest_batch:
            largest[layout] = _largest_batch(iteration, settings, measured)
        del iteration
        free_memory(settings.device)
    return measurements, largest


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value / base


def _records(measurements: dict, layouts: tuple[str, ...]) -> list[dict]:
    base_layout = layouts[0]
    records = []
    for (layout, batch_size), m in measurements.items():
        base = measurements[base_layout, batch_size]
        seconds, peak = (None, None) if m is None else (m.seconds, m.peak_memory)
        records.append(
            {
                "layout": layout,
                "batch_size": batch_size,
                "fits": m is not None,
                "seconds_per_iteration": seconds,
                "seconds_per_image": None if seconds is None else seconds / batch_size,
                "peak_memory_bytes": peak,
                "time_ratio": _ratio(seconds, None if base is None else base.seconds),
                "memory_ratio": _ratio(peak, None if base is None else base.peak_memory),
            }
        )
    return records


def _row(record: dict) -> tuple:
    if not record["fits"]:
        return (record["layout"], record["batch_size"], "OOM", "OOM", "OOM", NOT_AVAILABLE, NOT_AVAILABLE)
    return (
        record["layout"],
        record["batch_size"],
        f"{record['seconds_per_iteration']:.3f}",
        f"{record['seconds_per_image']:.3f}",
        format_memory(record["peak_memory_bytes"]),
        format_ratio(record["time_ratio"]),
        format_ratio(record["memory_ratio"]),
    )


def _largest_table(largest: dict) -> str:
    rows = []
    for layout, (batch_size, m) in largest.items():
        shown = f"≥ {batch_size}" if batch_size >= MAX_BATCH_SEARCHED else str(batch_size or "none")
        rows.append((layout, shown, format_memory(None if m is None else m.peak_memory)))
    return markdown_table(("layout", "largest batch that fits", "peak memory at it"), rows)


def run_training_benchmark(settings: BenchSettings) -> SuiteResult:
    """Measure one DI* iteration per layout and batch size (:func:`measure_training`) and tabulate it."""
    measurements, largest = measure_training(settings)
    base = settings.layouts[0]
    records = _records(measurements, settings.layouts)
    headers = ("layout", "batch", "s/iteration", "s/image", "peak memory", f"time ÷ {base}", f"memory ÷ {base}")
    tables = [markdown_table(headers, [_row(record) for record in records])]
    notes = [f"`{layout}`: {TRAINING_LAYOUTS[layout]}" for layout in settings.layouts]
    reward = "PickScore reward through the VAE decoder" if settings.reward else "no reward (`--no-reward`)"
    guidance, rank = _config(settings).guidance_scale, settings.size.lora_rank
    notes.append(
        f"one iteration: {settings.assistant_updates} assistant update(s) (K_TA) + 1 generator update, {reward}, "
        f"CFG-enhanced reference (γ = {guidance:g}), pseudo-Huber divergence, LoRA rank {rank} (LoRA layouts), "
        "gradient checkpointing, bf16 autocast, AdamW; prompt encoding included"
    )
    if largest:
        tables.append(_largest_table(largest))
        notes.append(f"largest batch: doubling then bisection, up to {MAX_BATCH_SEARCHED}")
    else:
        notes.append("largest batch that fits: not searched (it needs a CUDA device; a CPU has no memory limit)")
    batches = ", ".join(map(str, settings.training_batch_sizes))
    title = f"Training: one DI* iteration, {settings.resolution}², batch {batches}"
    records += [
        {"layout": layout, "largest_batch": batch, "peak_memory_bytes": None if m is None else m.peak_memory}
        for layout, (batch, m) in largest.items()
    ]
    return SuiteResult("training", title, tables, notes, records)
