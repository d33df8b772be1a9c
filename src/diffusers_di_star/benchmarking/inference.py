"""Inference benchmark (issue 6): the peer recipe, our pipeline, the floor and SDXL base, on the same modules.

Rows, all measured in one process on one set of random-weight SDXL modules:

1. peer: diffusers ``StableDiffusionXLPipeline`` + ``LCMScheduler`` with ``timesteps=[399]``, ``guidance_scale=0``,
   in the base dtype with diffusers' default VAE upcast (how the released DI* models are run today);
2. ``DIStarSDXLPipeline`` with default settings, same modules and dtype;
3. ``DIStarSDXLPipeline`` with the fast settings (:func:`apply_fast_settings`), and again with a tiny VAE;
4. the floor: :func:`~diffusers_di_star.training.encode_prompts` (both text encoders),
   :func:`~diffusers_di_star.one_step.generate_x0` (one UNet call) and
   :func:`~diffusers_di_star.one_step.decode_latents` (VAE decode), called directly on the fast-settings modules;
5. SDXL base with Euler, 50 steps and classifier-free guidance (the paper's slow baseline).

The base-dtype rows (1, 2, 5) are measured first, round-robin at each batch size; then the same modules are switched
to the fast settings in place and rows 3 and 4 are measured, round-robin too. Pipelines return ``output_type="pt"``
(no PIL conversion), so every row times the same work up to the pipeline's own overhead. "speed-up vs peer" is the
peer's time per image over the row's, "time ÷ floor" the row's over the floor's, both at the same batch size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline

from ..one_step import DEFAULT_CONDITIONING_TIMESTEP, decode_latents, generate_x0
from ..pipeline_di_star_sdxl import DIStarSDXLPipeline
from ..training import encode_prompts
from .components import build_sdxl_components, build_tiny_vae
from .measure import Measurement, free_memory, measure_interleaved
from .report import SuiteResult, format_memory, format_ratio, markdown_table
from .settings import BenchSettings

__all__ = [
    "PROMPT",
    "InferenceResult",
    "apply_fast_settings",
    "base_calls",
    "build_pipelines",
    "compile_pipelines",
    "fast_calls",
    "measure_variants",
    "result_record",
    "run_inference_benchmark",
    "switch_to_fast",
    "table_row",
]

PROMPT = "a photo of an astronaut riding a horse on mars"
PEER, OURS, FAST, FAST_TINY, FLOOR, SDXL = "peer", "ours", "fast", "fast-tiny-vae", "floor", "sdxl-base"
_ROW_ORDER = (PEER, OURS, FAST, FAST_TINY, FLOOR, SDXL)
HEADERS = ("variant", "batch", "ms/image", "images/s", "peak memory", "speed-up vs peer", "time ÷ floor")


@dataclass(frozen=True)
class InferenceResult:
    variant: str
    batch_size: int
    measurement: Measurement

    @property
    def seconds_per_image(self) -> float:
        return self.measurement.seconds / self.batch_size


def apply_fast_settings(pipe: DIStarSDXLPipeline, dtype: torch.dtype, compile_mode: str | None = None) -> None:
    """The fast inference settings, in place: ``dtype`` weights, fused QKV projections, channels-last UNet and VAE,
    and ``torch.compile`` of the UNet and of the VAE decoder (if ``compile_mode``).

    bf16 decodes without upcast. For fp16, load the fp16-fix VAE (``madebyollin/sdxl-vae-fp16-fix``, whose config
    says ``force_upcast=False``): SDXL's own VAE overflows in fp16 and the pipeline upcasts it.
    """
    pipe.to(dtype=dtype)
    pipe.fuse_qkv_projections(vae=isinstance(pipe.vae, AutoencoderKL))
    pipe.unet.to(memory_format=torch.channels_last)
    _speed_up_vae(pipe.vae, dtype)
    if compile_mode is not None:
        compile_pipelines([pipe], compile_mode)


def compile_pipelines(pipes: list[DIStarSDXLPipeline], compile_mode: str) -> None:
    """``torch.compile`` (full graph, static shapes) of the UNet and of each VAE's decoder, in place. Pipelines that
    share a UNet keep sharing it: it is compiled once."""
    compiled = {}
    for pipe in pipes:
        unet = pipe.unet
        if id(unet) not in compiled:
            compiled[id(unet)] = torch.compile(unet, mode=compile_mode, fullgraph=True, dynamic=False)
        pipe.unet = compiled[id(unet)]
    for vae in {id(pipe.vae): pipe.vae for pipe in pipes}.values():
        vae.decode = torch.compile(vae.decode, mode=compile_mode, fullgraph=True, dynamic=False)


def _speed_up_vae(vae: torch.nn.Module, dtype: torch.dtype) -> None:
    vae.to(dtype=dtype, memory_format=torch.channels_last)


def _pipeline_call(pipe, settings: BenchSettings, **call_kwargs) -> Callable[[int], object]:
    pipe.set_progress_bar_config(disable=True)

    def call(batch_size: int):
        generator = torch.Generator(settings.device).manual_seed(settings.seed)
        size = {"height": settings.resolution, "width": settings.resolution}
        return pipe([PROMPT] * batch_size, generator=generator, output_type="pt", **size, **call_kwargs).images

    return call


def _floor_call(pipe: DIStarSDXLPipeline, settings: BenchSettings) -> Callable[[int], torch.Tensor]:
    tokenizers, text_encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    latent_size = settings.resolution // pipe.vae_scale_factor
    alphas_cumprod = pipe.scheduler.alphas_cumprod

    @torch.no_grad()
    def call(batch_size: int) -> torch.Tensor:
        cond = encode_prompts([PROMPT] * batch_size, tokenizers, text_encoders, settings.resolution)
        shape = (batch_size, pipe.unet.config.in_channels, latent_size, latent_size)
        noise = torch.randn(shape, device=settings.device, dtype=cond.prompt_embeds.dtype)
        added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}
        x0 = generate_x0(pipe.unet, noise, cond.prompt_embeds, added, alphas_cumprod, DEFAULT_CONDITIONING_TIMESTEP)
        return decode_latents(pipe.vae, x0)

    return call


def measure_variants(
    calls: dict[str, Callable[[int], object]], settings: BenchSettings, batch_sizes: tuple[int, ...] | None = None
) -> list[InferenceResult]:
    """Each call at each batch size (``settings.inference_batch_sizes`` by default), round-robin over the variants
    at each batch size (:func:`~.measure.measure_interleaved`), so that they share the machine's slow spells."""
    results = []
    for batch_size in batch_sizes or settings.inference_batch_sizes:
        runs = {variant: functools.partial(call, batch_size) for variant, call in calls.items()}
        measured = measure_interleaved(runs, settings.device, settings.warmup, settings.repeats)
        results += [InferenceResult(variant, batch_size, measurement) for variant, measurement in measured.items()]
        free_memory(settings.device)
    return results


def build_pipelines(settings: BenchSettings) -> dict[str, StableDiffusionXLPipeline]:
    """The peer, ours and SDXL base on ONE set of random-weight modules in ``settings.dtype``, keyed by variant."""
    components = build_sdxl_components(settings.size, settings.device, settings.dtype, settings.seed)
    lcm = LCMScheduler.from_config(components["scheduler"].config)
    return {
        PEER: StableDiffusionXLPipeline(**(components | {"scheduler": lcm}), add_watermarker=False),
        OURS: DIStarSDXLPipeline(**components, add_watermarker=False),
        SDXL: StableDiffusionXLPipeline(**components, add_watermarker=False),
    }


def base_calls(
    pipes: dict, settings: BenchSettings, variants=(PEER, OURS, SDXL)
) -> dict[str, Callable[[int], object]]:
    """``{variant: call(batch_size)}`` of the base-dtype rows (peer, ours, SDXL base) among ``variants``."""
    kwargs = {
        PEER: {"num_inference_steps": 1, "timesteps": [DEFAULT_CONDITIONING_TIMESTEP], "guidance_scale": 0.0},
        OURS: {},
        SDXL: {"num_inference_steps": settings.sdxl_steps, "guidance_scale": settings.sdxl_guidance_scale},
    }
    return {variant: _pipeline_call(pipes[variant], settings, **kwargs[variant]) for variant in variants}


def switch_to_fast(pipes: dict, settings: BenchSettings) -> list[DIStarSDXLPipeline]:
    """Switch the shared modules to the fast settings in place, not compiled; return ``[ours, preview]``, the second
    with a tiny VAE. :func:`compile_pipelines` compiles them later."""
    ours = pipes[OURS]
    apply_fast_settings(ours, settings.fast_dtype)
    if settings.fast_dtype == torch.float16:  # random weights stand in for the fp16-fix VAE: same modules, no upcast
        ours.vae.register_to_config(force_upcast=False)
    tiny_vae = build_tiny_vae(settings.size, settings.device, settings.fast_dtype, settings.seed)
    _speed_up_vae(tiny_vae, settings.fast_dtype)
    return [ours, DIStarSDXLPipeline(**(ours.components | {"vae": tiny_vae}), add_watermarker=False)]


def fast_calls(fast: list[DIStarSDXLPipeline], settings: BenchSettings) -> dict[str, Callable[[int], object]]:
    """``{variant: call(batch_size)}`` of the floor, fast and fast-tiny-vae rows on :func:`switch_to_fast`'s pipelines.
    The calls read the pipelines' modules when they run, so they time whatever :func:`compile_pipelines` made."""
    ours, preview = fast
    return {
        FLOOR: _floor_call(ours, settings),
        FAST: _pipeline_call(ours, settings),
        FAST_TINY: _pipeline_call(preview, settings),
    }


def measure_inference(settings: BenchSettings) -> list[InferenceResult]:
    """Every variant at every batch size; the base-dtype variants first, then the modules are switched to the
    fast settings in place for the fast variants and the floor."""
    pipes = build_pipelines(settings)
    results = measure_variants(base_calls(pipes, settings), settings)
    fast = switch_to_fast(pipes, settings)
    if settings.compile_mode is not None:
        compile_pipelines(fast, settings.compile_mode)
    return results + measure_variants(fast_calls(fast, settings), settings)


def _legend(settings: BenchSettings) -> dict[str, str]:
    base = str(settings.dtype).removeprefix("torch.")
    if settings.dtype == torch.float16:
        base += ", VAE upcast to fp32 (diffusers' default)"
    compiled = f"torch.compile({settings.compile_mode!r})" if settings.compile_mode else "not compiled"
    fast = f"{str(settings.fast_dtype).removeprefix('torch.')}, no VAE upcast, fused QKV, channels-last, {compiled}"
    return {
        PEER: f"diffusers `StableDiffusionXLPipeline` + `LCMScheduler`, `timesteps=[399]`, `guidance_scale=0`; {base}",
        OURS: f"`DIStarSDXLPipeline`, default settings; {base}",
        FAST: f"`DIStarSDXLPipeline`, fast settings: {fast}",
        FAST_TINY: "the fast settings with the tiny VAE (`AutoencoderTiny`, TAESDXL's architecture) for previews",
        FLOOR: f"`encode_prompts` + `generate_x0` (one UNet call) + `decode_latents`, called directly; {fast}",
        SDXL: f"`StableDiffusionXLPipeline` (Euler), {settings.sdxl_steps} steps, "
        f"CFG {settings.sdxl_guidance_scale:g}; {base}",
    }


def result_record(result: InferenceResult, peer_seconds: float | None, floor_seconds: float | None) -> dict:
    """The JSON record of one row; ``peer_seconds`` / ``floor_seconds`` per image at the same batch (``None``: not
    measured, the ratio is then ``None``)."""
    spi = result.seconds_per_image
    return {
        "variant": result.variant,
        "batch_size": result.batch_size,
        "seconds_per_call": result.measurement.seconds,
        "ms_per_image": 1000 * spi,
        "images_per_second": 1 / spi,
        "peak_memory_bytes": result.measurement.peak_memory,
        "speedup_vs_peer": None if peer_seconds is None else peer_seconds / spi,
        "time_over_floor": None if floor_seconds is None else spi / floor_seconds,
    }


def _records(results: list[InferenceResult]) -> list[dict]:
    seconds_per_image = {(r.variant, r.batch_size): r.seconds_per_image for r in results}
    return [
        result_record(r, seconds_per_image[PEER, r.batch_size], seconds_per_image[FLOOR, r.batch_size])
        for r in sorted(results, key=lambda r: (_ROW_ORDER.index(r.variant), r.batch_size))
    ]


def table_row(record: dict) -> tuple:
    """A record as its Markdown table row (:data:`HEADERS`)."""
    return (
        record["variant"],
        record["batch_size"],
        f"{record['ms_per_image']:.1f}",
        f"{record['images_per_second']:.2f}",
        format_memory(record["peak_memory_bytes"]),
        format_ratio(record["speedup_vs_peer"]),
        format_ratio(record["time_over_floor"]),
    )


def run_inference_benchmark(settings: BenchSettings) -> SuiteResult:
    """Measure every variant (:func:`measure_inference`) and tabulate it."""
    records = _records(measure_inference(settings))
    rows = [table_row(r) for r in records]
    notes = [f"`{name}`: {text}" for name, text in _legend(settings).items()]
    notes.append(
        "peak memory: `torch.cuda.max_memory_allocated` during the timed calls, all SDXL weights resident; "
        "n/a on a CPU"
    )
    title = f"Inference, {settings.resolution}², batch {', '.join(map(str, settings.inference_batch_sizes))}"
    return SuiteResult("inference", title, [markdown_table(HEADERS, rows)], notes, records)
