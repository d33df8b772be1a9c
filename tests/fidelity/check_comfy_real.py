"""The DIStarOneStep node through ComfyUI's own sampling code (the comfyui 0.0.1 wheel, June 2024):
comfy.model_sampling (ModelSamplingDiscrete + EPS), comfy.samplers.KSAMPLER with the euler sampler
(k_diffusion.sample_euler), comfy.sample.prepare_noise; vs generate_x0 on the tiny SDXL UNet (fp32)."""

import sys
from pathlib import Path

import comfy.model_sampling as cms
import comfy.sample
import comfy.samplers as samplers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integrations" / "comfyui"))
from di_star_one_step import NODE_CLASS_MAPPINGS

from diffusers_di_star.one_step import generate_x0
from diffusers_di_star.testing import get_sdxl_scheduler, get_tiny_unet


class ModelSampling(cms.ModelSamplingDiscrete, cms.EPS):  # as comfy.model_base.model_sampling() builds it for EPS
    pass


ms = ModelSampling(None)


class Patcher:
    def get_model_object(self, name):
        return {"model_sampling": ms}[name]


unet = get_tiny_unet(seed=0)
g = torch.Generator().manual_seed(0)
cond = {
    "encoder_hidden_states": torch.randn(2, 77, 96, generator=g),
    "added_cond_kwargs": {
        "text_embeds": torch.randn(2, 64, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    },
}


class InnerModel:  # comfy.model_base.BaseModel.apply_model, the parts an eps SDXL UNet uses
    model_sampling = ms

    def __call__(self, x, sigma, **kwargs):
        xc = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma).float()
        eps = unet(xc, t, **cond, return_dict=False)[0]
        return ms.calculate_denoised(sigma, eps, x)


class ModelWrap:
    inner_model = InnerModel()

    def __call__(self, x, sigma, model_options=None, seed=None):
        return self.inner_model(x, sigma)


def sample(noise, sigmas, latent):
    sampler = samplers.ksampler("euler")
    return sampler.sample(
        ModelWrap(), sigmas, {"model_options": {}, "seed": 0}, None, noise, latent, disable_pbar=True
    )


latent = {"samples": torch.zeros(2, 4, 8, 8)}
with torch.no_grad():
    noise_obj, sigmas = NODE_CLASS_MAPPINGS["DIStarOneStep"]().build(Patcher(), 7, 399)
    out = sample(noise_obj.generate_noise(latent), sigmas, latent["samples"])
    z = comfy.sample.prepare_noise(latent["samples"], 7)
    x0 = generate_x0(
        unet, z, cond["encoder_hidden_states"], cond["added_cond_kwargs"], get_sdxl_scheduler().alphas_cumprod, 399
    )
    print(
        "node via ComfyUI KSAMPLER: max |latent - generate_x0| =",
        (out - x0).abs().max().item(),
        " |x0| max",
        x0.abs().max().item(),
    )
    # stock: SDTurboScheduler(steps 1, denoise 0.4) formula + RandomNoise
    start = 10 - int(10 * 0.4)
    ts = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start : start + 1]
    stock_sigmas = torch.cat([ms.sigma(ts), torch.zeros(1)])
    stock = sample(z, stock_sigmas, latent["samples"])
    print(
        "stock SDTurbo 0.40 sigma",
        stock_sigmas[0].item(),
        "t",
        ms.timestep(stock_sigmas[:1]).item(),
        "max |stock - generate_x0| =",
        (stock - x0).abs().max().item(),
    )
