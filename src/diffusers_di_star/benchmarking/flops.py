"""FLOP counts of the SDXL modules (docs/benchmarks.md's FLOP table), with ``FlopCounterMode`` on the meta device.

The modules are built from the shipped configs on the meta device (no memory, no weights), so the full-size count
takes seconds on a CPU and checks both the configs and the documented figures. A multiply-add counts 2 FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..one_step import DEFAULT_CONDITIONING_TIMESTEP
from ..rewards.clip_similarity import clip_image_embeddings
from .components import build_pickscore_reward, build_text_encoders, build_tiny_vae, build_unet, build_vae
from .report import NOT_AVAILABLE, SuiteResult, markdown_table
from .settings import BenchSettings

__all__ = ["DOCUMENTED_TFLOP", "count_flops", "run_flops_benchmark"]

_META = torch.device("meta")
_TOKENS = 77

#: The counts docs/benchmarks.md states for the full-size modules at 1024², batch 1 (TFLOP, 3 significant figures).
DOCUMENTED_TFLOP = {
    "unet_forward": 6.76,
    "vae_decode": 10.47,
    "text_encoders": 0.11,
    "tiny_vae_decode": 0.57,
    "unet_forward_backward_frozen": 14.2,
    "unet_forward_backward_full": 20.2,
    "vae_decode_forward_backward": 21.5,
    "reward_image_tower": 0.33,
}

_DESCRIPTIONS = {
    "unet_forward": "SDXL UNet forward",
    "vae_decode": "SDXL VAE decoder",
    "text_encoders": "both text encoders (CLIP-L + bigG, 77 tokens)",
    "tiny_vae_decode": "tiny VAE decoder (TAESDXL architecture)",
    "unet_forward_backward_frozen": "UNet forward+backward, frozen weights (input gradients only)",
    "unet_forward_backward_full": "UNet forward+backward, full finetune",
    "vae_decode_forward_backward": "VAE decode forward+backward (to the latent)",
    "reward_image_tower": "PickScore image tower at 224² (CLIP ViT-H/14 at full size)",
}


def _count(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _unet_counts(settings: BenchSettings) -> dict[str, tuple[int, int]]:
    unet = build_unet(settings.size, _META, torch.float32)
    latent = settings.resolution // 8
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.empty(1, text_dim, device=_META), "time_ids": torch.empty(1, 6, device=_META)}
    hidden = torch.empty(1, _TOKENS, unet.config.cross_attention_dim, device=_META)
    timestep = torch.full((1,), DEFAULT_CONDITIONING_TIMESTEP, device=_META)

    def forward_backward(train_weights: bool):
        def run():
            unet.requires_grad_(train_weights)
            sample = torch.empty(1, 4, latent, latent, device=_META, requires_grad=True)
            unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample.sum().backward()

        return run

    @torch.no_grad()
    def forward():
        sample = torch.empty(1, 4, latent, latent, device=_META)
        unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added)

    params = _parameters(unet)
    return {
        "unet_forward": (params, _count(forward)),
        "unet_forward_backward_frozen": (params, _count(forward_backward(False))),
        "unet_forward_backward_full": (params, _count(forward_backward(True))),
    }


def _decoder_counts(settings: BenchSettings) -> dict[str, tuple[int, int]]:
    vae = build_vae(settings.size, _META, torch.float32)
    tiny_vae = build_tiny_vae(settings.size, _META, torch.float32)
    latent = settings.resolution // 8

    def decode(module, with_backward=False):
        def run():
            x0 = torch.empty(1, 4, latent, latent, device=_META, requires_grad=with_backward)
            with torch.set_grad_enabled(with_backward):
                image = module.decode(x0).sample
            if with_backward:
                image.sum().backward()

        return run

    return {
        "vae_decode": (_parameters(vae.decoder), _count(decode(vae))),
        "tiny_vae_decode": (_parameters(tiny_vae.decoder), _count(decode(tiny_vae))),
        "vae_decode_forward_backward": (_parameters(vae.decoder), _count(decode(vae, with_backward=True))),
    }


@torch.no_grad()
def _encoder_counts(settings: BenchSettings) -> dict[str, tuple[int, int]]:
    _, text_encoders = build_text_encoders(settings.size, _META, torch.float32)
    reward = build_pickscore_reward(settings.size, _META)
    input_ids = torch.zeros(1, _TOKENS, dtype=torch.long, device=_META)
    image_size = reward.transform.crop_size

    def encode():
        for text_encoder in text_encoders:
            text_encoder(input_ids, output_hidden_states=True)

    return {
        "text_encoders": (sum(map(_parameters, text_encoders)), _count(encode)),
        "reward_image_tower": (
            _parameters(reward.clip.vision_model) + _parameters(reward.clip.visual_projection),
            _count(lambda: clip_image_embeddings(reward.clip, torch.empty(1, 3, *image_size, device=_META))),
        ),
    }


def count_flops(settings: BenchSettings) -> dict[str, tuple[int, int]]:
    """``{row: (parameters, FLOPs)}`` for one image at ``settings.resolution``, in docs/benchmarks.md's row order."""
    counts = _unet_counts(settings) | _decoder_counts(settings) | _encoder_counts(settings)
    return {name: counts[name] for name in _DESCRIPTIONS}


def run_flops_benchmark(settings: BenchSettings) -> SuiteResult:
    """The FLOP table, next to the documented numbers when the modules are full size at 1024²."""
    counts = count_flops(settings)
    full = settings.size.name == "full"
    unit, scale = ("TFLOP", 1e12) if full else ("GFLOP", 1e9)
    rows, records = [], []
    for name, (parameters, flops) in counts.items():
        anchor = DOCUMENTED_TFLOP[name] if full and settings.resolution == 1024 else None
        shown_anchor = NOT_AVAILABLE if anchor is None else f"{anchor:g}"
        rows.append((_DESCRIPTIONS[name], f"{parameters / 1e6:.1f}", f"{flops / scale:.4g}", shown_anchor))
        records.append({"module": name, "parameters": parameters, "flops": flops, "documented_tflop": anchor})
    headers = ("module", "parameters (M)", f"{unit} per image", "docs/benchmarks.md (TFLOP)")
    title = f"FLOPs per image, SDXL `{settings.size.name}` modules, {settings.resolution}², batch 1"
    notes = ["counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device; a multiply-add = 2 FLOPs"]
    return SuiteResult("flops", title, [markdown_table(headers, rows)], notes, records)
