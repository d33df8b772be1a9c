"""The miniature SD3 reference: the digits again, as a rectified-flow ``SD3Transformer2DModel`` in SD3's layout.

What the SDXL reference (``build_reference.py``) does, with SD3's parts, so ``examples/train_di_star_sdxl.py``,
``StableDiffusion3Pipeline`` and ``DIStarSD3Pipeline`` load the folder unchanged:

* a VAE in SD3's layout: 16 latent channels, no quant convs, ``shift_factor`` = mean and ``scaling_factor`` = 1/std
  of the latents (trained by the shared :func:`build_reference.train_vae`);
* the CLIP-L and CLIP-G stand-ins of ``diffusers_di_star.testing`` (``get_tiny_sd3_components(with_t5=False)``),
  **no T5**: its 256 tokens are zeros, as diffusers and the sd3 family do without ``text_encoder_3``. The CLIP
  tokenizers keep 24 tokens instead of 77 (every digit prompt has at most 20; asserted by the tests), which cuts the
  sequence the transformer attends over from 333 to 280 tokens;
* a small transformer (patch 1 on the 4×4 latents, so 16 image tokens; a dual-attention first block and RMS q/k norm
  as SD3.5-Medium);
* SD3's scheduler config (``FlowMatchEulerDiscreteScheduler``, 1000 timesteps, shift 3) and its training objective:
  x_σ = (1 − σ)·x0 + σ·ε, the velocity loss ‖v̂(x_σ, σ, c) − (ε − x0)‖², σ = shift(u) with u logit-normal(0, 1) —
  diffusers' SD3 training default (``weighting_scheme="logit_normal"``, loss weight 1) carried through the same
  shift the scheduler samples with (docs/math.md §12);
* 10 % prompt dropout to the sd3 family's ∅, the encoding of "" (not zeros), taken from ``SD3Family.encode`` — the
  same function the trainer uses, so the ∅ trained here is the one DI*'s CFG-enhanced reference reads.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from build_reference import encode_latents, to_rgb, train_denoiser, train_vae
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from digits_data import digit_prompt

from diffusers_di_star.families.sd3 import SD3Conditioning, SD3Family, shift_sigmas
from diffusers_di_star.one_step import FlowSchedule
from diffusers_di_star.testing import SD3_JOINT_ATTENTION_DIM, get_sd3_scheduler, get_tiny_sd3_components

__all__ = ["FLOW_QUICK", "FlowReferenceSettings", "sd3_family", "train_sd3_pipeline", "velocity_loss"]


@dataclasses.dataclass(frozen=True)
class FlowReferenceSettings:
    """Sizes and budgets of the SD3-layout reference; :data:`FLOW_QUICK` is the tests' seconds-scale version."""

    family: ClassVar[str] = "sd3"

    resolution: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_steps: int = 800
    vae_batch_size: int = 64
    transformer_heads: int = 2
    transformer_head_dim: int = 16
    transformer_layers: int = 2
    patch_size: int = 1
    transformer_steps: int = 2500
    batch_size: int = 64
    learning_rate: float = 1e-3
    vae_learning_rate: float = 3e-3
    shift: float = 3.0
    tokenizer_max_length: int = 24
    seed: int = 0


FLOW_QUICK = FlowReferenceSettings(
    resolution=16, vae_channels=(8, 8, 8, 8), vae_steps=100, vae_batch_size=16, transformer_heads=2,
    transformer_head_dim=8, transformer_layers=1, transformer_steps=60, batch_size=16,
)  # fmt: skip


def sd3_family(settings: FlowReferenceSettings) -> SD3Family:
    """The sd3 family over the CLIP stand-ins (no T5), with the tokenizers cut to ``tokenizer_max_length``."""
    parts = get_tiny_sd3_components(settings.seed, with_t5=False)
    tokenizers = (parts["tokenizer"], parts["tokenizer_2"])
    for tokenizer in tokenizers:
        tokenizer.model_max_length = settings.tokenizer_max_length
    text_encoders = (parts["text_encoder"], parts["text_encoder_2"])
    scheduler = get_sd3_scheduler(settings.shift)
    return SD3Family(
        FlowSchedule(scheduler.config.num_train_timesteps), tokenizers, text_encoders, scheduler,
        joint_attention_dim=SD3_JOINT_ATTENTION_DIM,
    )  # fmt: skip


def _transformer(settings: FlowReferenceSettings) -> SD3Transformer2DModel:
    torch.manual_seed(settings.seed)
    width = settings.transformer_heads * settings.transformer_head_dim
    tokens = settings.resolution // 8 // settings.patch_size
    return SD3Transformer2DModel(
        sample_size=settings.resolution // 8,
        patch_size=settings.patch_size,
        in_channels=16,
        out_channels=16,
        num_layers=settings.transformer_layers,
        attention_head_dim=settings.transformer_head_dim,
        num_attention_heads=settings.transformer_heads,
        joint_attention_dim=SD3_JOINT_ATTENTION_DIM,
        caption_projection_dim=width,
        pooled_projection_dim=SD3_JOINT_ATTENTION_DIM,  # CLIP-L + CLIP-G projections, 32 + 64
        pos_embed_max_size=tokens,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


class _ClassConditioning:
    """c of the 10 digit prompts and their ∅ rows (the sd3 family's encoding), indexed by label tensors."""

    def __init__(self, family: SD3Family, resolution: int):
        self.cond = family.encode([digit_prompt(d) for d in range(10)], resolution)

    def __getitem__(self, labels) -> SD3Conditioning:
        cond = self.cond
        return SD3Conditioning(*(getattr(cond, f.name)[labels] for f in dataclasses.fields(cond)))


def velocity_loss(family: SD3Family, shift: float):
    """The rectified-flow loss of SD3's training with its prompt dropout: ``loss(transformer, x0, c, keep, g)``."""

    def loss(transformer, x0, cond: SD3Conditioning, keep, generator):
        sigma = shift_sigmas(torch.sigmoid(torch.randn(len(x0), generator=generator)), shift)
        eps = torch.randn(x0.shape, generator=generator)
        s = sigma[:, None, None, None]
        null, kept = cond.unconditional(), keep.bool()
        dropped = SD3Conditioning(
            torch.where(kept[:, None, None], cond.prompt_embeds, null.prompt_embeds),
            torch.where(kept[:, None], cond.pooled_prompt_embeds, null.pooled_prompt_embeds),
            null.prompt_embeds,
            null.pooled_prompt_embeds,
        )
        v_hat = family.denoise(transformer, (1 - s) * x0 + s * eps, sigma, dropped)
        return (v_hat - (eps - x0)).pow(2).mean()

    return loss


def train_sd3_pipeline(digits: dict, settings: FlowReferenceSettings) -> StableDiffusion3Pipeline:
    """The SD3-layout reference: its VAE, then its transformer on the VAE's latents (flow matching)."""
    images = to_rgb(digits["train_images"], settings.resolution)
    vae = train_vae(images, settings, latent_channels=16, sd3_layout=True)
    latents = encode_latents(vae, images)
    family = sd3_family(settings)
    conditioning = _ClassConditioning(family, settings.resolution)
    transformer = train_denoiser(
        _transformer(settings), latents, digits["train_labels"], conditioning,
        velocity_loss(family, settings.shift), settings, settings.transformer_steps,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=family.scheduler, **family.pipeline_kwargs()
    )
