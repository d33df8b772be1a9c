"""The miniature SDXL reference: a small ``AutoencoderKL`` and ``UNet2DConditionModel`` trained on MNIST digits.

Everything keeps SDXL's layout so ``examples/train_di_star_sdxl.py`` loads the folder unchanged: two CLIP text
encoders and tokenizers (the frozen stand-ins of ``diffusers_di_star.testing``), a 4-channel VAE with down-sampling
factor 8 whose ``scaling_factor`` makes the latents unit-variance, a UNet with ``addition_embed_type="text_time"``,
and SDXL's scheduler (scaled-linear betas 0.00085 → 0.012, 1000 steps, ε-prediction). The UNet is trained with the
DDPM ε loss ‖ε̂(x_t, t, c) − ε‖², t ~ U{0..999}, and 10 % prompt dropout to SDXL's ∅ (zero prompt and pooled
embeddings, docs/math.md §1) so classifier-free guidance works.

    python examples/mini_digits/build_reference.py --out outputs/mini_digits/reference
    python examples/mini_digits/build_reference.py --family sd3 --out outputs/mini_digits/reference

:func:`build_reference` is deterministic under its seed and caches the folder by a hash of its settings. The parts
both layouts share (the VAE, the data loop with prompt dropout, the cache) are here; ``flow_reference.py`` adds
SD3's transformer, conditioning and velocity loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from digits_data import digit_prompt

from diffusers_di_star.testing import (
    get_sdxl_scheduler,
    get_tiny_text_encoders,
    get_tiny_tokenizer,
    get_tiny_unet,
)
from diffusers_di_star.training import encode_prompts

__all__ = [
    "ReferenceSettings",
    "build_reference",
    "encode_latents",
    "reference_settings",
    "to_rgb",
    "train_denoiser",
    "train_unet",
    "train_vae",
]

PROMPT_DROPOUT = 0.1
KL_WEIGHT = 1e-6
#: The layouts a reference can be built in: SDXL (ε-prediction UNet) and SD3 (rectified-flow transformer).
FAMILIES = ("sdxl", "sd3")


@dataclasses.dataclass(frozen=True)
class ReferenceSettings:
    """Sizes and budgets of the SDXL-layout reference; :data:`QUICK` is the seconds-scale version the tests use."""

    family: ClassVar[str] = "sdxl"

    resolution: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_steps: int = 800
    unet_channels: tuple[int, int] = (32, 64)
    unet_steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    vae_learning_rate: float = 3e-3
    seed: int = 0

    @property
    def vae_batch_size(self) -> int:
        return self.batch_size // 2


QUICK = ReferenceSettings(
    resolution=16, vae_channels=(8, 8, 8, 8), vae_steps=200, unet_channels=(16, 32), unet_steps=150, batch_size=32
)


def to_rgb(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[N, 1, 32, 32]`` grey digits in [0, 1] → ``[N, 3, R, R]`` in [−1, 1] (the VAE's input range)."""
    if images.shape[-1] != resolution:
        images = torch.nn.functional.interpolate(images, size=resolution, mode="area")
    return images.repeat(1, 3, 1, 1) * 2 - 1


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


def train_vae(images: torch.Tensor, settings, latent_channels: int = 4, sd3_layout: bool = False) -> AutoencoderKL:
    """A VAE trained on ``images`` ([−1, 1]): squared error of decode(posterior mean) + 1e-6·KL.

    ``scaling_factor`` is set to 1/std of the latents, so the diffusion model sees unit-variance latents. SD3's
    layout (``sd3_layout``: 16 channels, no quant convs, as ``testing.get_tiny_vae`` with a ``shift_factor``) also
    sets ``shift_factor`` to their mean: the model sees (z − shift)·scale, as SD3's pipeline decodes.

    Decoding the mean (as a deterministic autoencoder) keeps the latents signal, not posterior noise; the small KL
    term only keeps them bounded. The diffusion model is trained on the posterior means.
    """
    torch.manual_seed(settings.seed)
    blocks = len(settings.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=settings.vae_channels,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=settings.resolution,
        force_upcast=False,
        use_quant_conv=not sd3_layout,
        use_post_quant_conv=not sd3_layout,
    )
    optimizer = torch.optim.Adam(vae.parameters(), lr=settings.vae_learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    for index in _batches(len(images), settings.vae_batch_size, settings.vae_steps, generator):
        posterior = vae.encode(images[index]).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        loss = (reconstruction - images[index]).pow(2).mean() + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(500)])
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    if sd3_layout:
        vae.register_to_config(shift_factor=latents.mean().item())
    return vae


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The model's latents of ``images``: (posterior mean − shift_factor)·scaling_factor (shift 0 without one)."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(500)])
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def _unet(settings: ReferenceSettings) -> UNet2DConditionModel:
    """The tiny SDXL-layout UNet of ``testing.py`` (``text_time``, both text encoders), sized for the digits."""
    return get_tiny_unet(settings.seed, settings.resolution // 8, settings.unet_channels)


def train_denoiser(network, latents, labels, class_conditioning, loss, settings, steps: int):
    """The data loop both references share: AdamW with a 100-step warm-up, gradient clipping at 1, batches of
    ``settings.batch_size`` latents with their class conditioning; ``keep`` is 0 for the 10 % dropped to ∅.

    ``loss(network, x0, cond, keep, generator)`` returns the batch's scalar loss (its family's objective).
    """
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    for index in _batches(len(latents), settings.batch_size, steps, generator):
        x0, cond = latents[index], class_conditioning[labels[index]]
        keep = (torch.rand(len(index), generator=generator) >= PROMPT_DROPOUT).float()
        value = loss(network, x0, cond, keep, generator)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        lr.step()
    return network.eval().requires_grad_(False)


def train_unet(latents, labels, class_conditioning, scheduler: DDPMScheduler, settings: ReferenceSettings):
    """ε-prediction DDPM training on scaled latents, with prompt dropout to ∅ (zero embeddings) for CFG."""

    def eps_loss(unet, x0, cond, keep, generator):
        embeds, pooled, time_ids = cond
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        eps_hat = unet(
            scheduler.add_noise(x0, eps, t),
            t,
            encoder_hidden_states=embeds * keep[:, None, None],
            added_cond_kwargs={"text_embeds": pooled * keep[:, None], "time_ids": time_ids},
        ).sample
        return (eps_hat - eps).pow(2).mean()

    unet = _unet(settings)
    return train_denoiser(unet, latents, labels, class_conditioning, eps_loss, settings, settings.unet_steps)


class _ClassConditioning:
    """SDXL conditioning of the 10 digit prompts, indexed by label tensors."""

    def __init__(self, tokenizers, text_encoders, resolution: int):
        cond = encode_prompts([digit_prompt(d) for d in range(10)], tokenizers, text_encoders, resolution)
        self.tensors = (cond.prompt_embeds, cond.pooled_prompt_embeds, cond.time_ids)

    def __getitem__(self, labels):
        return tuple(tensor[labels] for tensor in self.tensors)


def settings_key(settings: ReferenceSettings) -> str:
    import diffusers

    text = json.dumps({**dataclasses.asdict(settings), "diffusers": diffusers.__version__, "version": 1})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_sdxl_pipeline(digits: dict, settings: ReferenceSettings) -> StableDiffusionXLPipeline:
    """The SDXL-layout reference: its VAE, then its UNet on the VAE's latents."""
    images = to_rgb(digits["train_images"], settings.resolution)
    vae = train_vae(images, settings)
    latents = encode_latents(vae, images)
    tokenizers = (get_tiny_tokenizer(), get_tiny_tokenizer(pad_token="!"))
    text_encoders = get_tiny_text_encoders(len(tokenizers[0]), tokenizers[0].eos_token_id, seed=settings.seed)
    conditioning = _ClassConditioning(tokenizers, text_encoders, settings.resolution)
    scheduler = get_sdxl_scheduler()
    ddpm = DDPMScheduler.from_config(scheduler.config)
    unet = train_unet(latents, digits["train_labels"], conditioning, ddpm, settings)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _train_pipeline(digits: dict, settings):
    if settings.family == "sd3":
        from flow_reference import train_sd3_pipeline

        return train_sd3_pipeline(digits, settings)
    return train_sdxl_pipeline(digits, settings)


def reference_folder(out: str, settings) -> str:
    """``out/reference-<px>px-<settings hash>`` (SDXL) or ``out/reference-<family>-<px>px-<hash>``."""
    family = "" if settings.family == "sdxl" else f"-{settings.family}"
    return os.path.join(out, f"reference{family}-{settings.resolution}px-{settings_key(settings)}")


def build_reference(digits: dict, out: str, settings: ReferenceSettings = ReferenceSettings()) -> str:
    """Train (or reuse the cached) reference of ``settings.family``; returns its pipeline folder (an SDXL- or
    SD3-layout folder, written atomically)."""
    folder = reference_folder(out, settings)
    if os.path.isfile(os.path.join(folder, "build.json")):
        return folder
    start = time.perf_counter()
    pipe = _train_pipeline(digits, settings)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    record = {"settings": dataclasses.asdict(settings), "seconds": round(time.perf_counter() - start, 1)}
    record["family"] = settings.family
    record["threads"] = torch.get_num_threads()
    with open(os.path.join(tmp, "build.json"), "w") as f:
        json.dump(record, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def reference_settings(family: str, quick: bool):
    """The reference settings of ``family`` (``"sdxl"`` or ``"sd3"``), full or ``quick``."""
    if family == "sd3":
        from flow_reference import FLOW_QUICK, FlowReferenceSettings

        return FLOW_QUICK if quick else FlowReferenceSettings()
    return QUICK if quick else ReferenceSettings()


def main(argv=None) -> None:
    from digits_data import load_digits

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/mini_digits")
    parser.add_argument("--quick", action="store_true", help="16×16, seconds-scale budgets (tests, make demo).")
    parser.add_argument("--family", choices=FAMILIES, default="sdxl", help="The reference's layout (default sdxl).")
    args = parser.parse_args(argv)
    folder = build_reference(load_digits(), args.out, reference_settings(args.family, args.quick))
    print(folder)


if __name__ == "__main__":
    main()
