"""The ComfyUI node of integrations/comfyui/di_star_one_step gives the image of ``generate_x0`` + VAE decode.

ComfyUI is not installed here, so its sampling path is written below from its definitions: ``ModelSamplingDiscrete``
and ``EPS`` (``comfy/model_sampling.py``), ``KSAMPLER.sample`` / ``max_denoise`` (``comfy/samplers.py``),
``sample_euler`` (``comfy/k_diffusion/sampling.py``), ``prepare_noise`` (``comfy/sample.py``), ``SDTurboScheduler``
(``comfy_extras/nodes_custom_sampler.py``) and ``VAE.decode``, as they read in the ``comfyui`` 0.0.1 wheel (June
2024) and, for ``model_sampling.py``, unchanged on ComfyUI master (commit 005e370). ``comfy.sample`` and
``folder_paths`` are replaced by stubs with those definitions, so the node classes themselves run.
"""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusers_di_star.one_step import decode_latents, generate_x0
from diffusers_di_star.testing import get_sdxl_scheduler, get_tiny_unet, get_tiny_vae

NODE_DIR = Path(__file__).resolve().parents[1] / "integrations" / "comfyui" / "di_star_one_step"
sys.path.insert(0, str(NODE_DIR.parent))
from di_star_one_step import NODE_CLASS_MAPPINGS  # noqa: E402
from di_star_one_step.core import read_conditioning_timestep  # noqa: E402


class ComfyModelSamplingDiscrete:
    """``ModelSamplingDiscrete`` with SDXL's sampling settings (``linear`` 0.00085 -> 0.012), and ``EPS``."""

    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # make_beta_schedule
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()
        self.sigma_max = self.sigmas[-1]

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def noise_scaling(self, sigma, noise, latent_image, max_denoise):
        return noise * (torch.sqrt(1.0 + sigma**2.0) if max_denoise else sigma) + latent_image


class FakeModelPatcher:
    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        return {"model_sampling": self.model_sampling}[name]


def comfy_denoiser(unet, model_sampling, cond):
    """``BaseModel.apply_model`` for an ε model: UNet(x / sqrt(σ² + 1), timestep(σ)), ``denoised = x - ε̂·σ``."""

    def denoise(x, sigma):
        model_input = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5
        eps = unet(model_input, model_sampling.timestep(sigma).float(), **cond, return_dict=False)[0]
        return x - eps * sigma.view(-1, 1, 1, 1)

    return denoise


def comfy_sample_euler(denoise, model_sampling, noise, sigmas, latent_image):
    """``KSAMPLER.sample`` with ``sample_euler`` (s_churn 0); EPS's ``inverse_noise_scaling`` is the identity."""
    max_sigma, sigma = float(model_sampling.sigma_max), float(sigmas[0])
    max_denoise = math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma
    x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, max_denoise)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * x.new_ones([x.shape[0]]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def comfy_vae_decode(vae, samples):
    """``SDXL.process_latent_out`` (÷ scale factor), then ``VAE.decode``: clamp((decode + 1) / 2, 0, 1)."""
    return torch.clamp((vae.decode(samples / vae.config.scaling_factor, return_dict=False)[0] + 1.0) / 2.0, 0, 1)


@pytest.fixture
def comfy_stubs(monkeypatch, tmp_path):
    """``comfy.sample.prepare_noise`` as ComfyUI defines it, and ``folder_paths`` over ``tmp_path``."""

    def prepare_noise(latent_image, seed, noise_inds=None):
        assert noise_inds is None
        generator = torch.manual_seed(seed)
        return torch.randn(latent_image.size(), dtype=latent_image.dtype, generator=generator, device="cpu")

    comfy, sample = types.ModuleType("comfy"), types.ModuleType("comfy.sample")
    sample.prepare_noise, comfy.sample = prepare_noise, sample
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.folder_names_and_paths = {"checkpoints": None, "diffusion_models": None}
    folder_paths.get_filename_list = lambda folder: sorted(p.name for p in (tmp_path / folder).glob("*"))
    folder_paths.get_full_path = lambda folder, name: str(tmp_path / folder / name)
    for name, module in {"comfy": comfy, "comfy.sample": sample, "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return tmp_path


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    cond = {
        "encoder_hidden_states": torch.randn(2, 77, 96, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 64, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        },
    }
    return get_tiny_unet(seed=0), get_tiny_vae(seed=0), cond


def run_node(tiny, model_sampling, seed, **node_inputs):
    """EmptyLatentImage -> DIStarOneStep -> SamplerCustomAdvanced(BasicGuider, euler) -> VAEDecode."""
    unet, vae, cond = tiny
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    node_inputs = {"conditioning_timestep": 399, **node_inputs}
    noise, sigmas = NODE_CLASS_MAPPINGS["DIStarOneStep"]().build(FakeModelPatcher(model_sampling), seed, **node_inputs)
    denoise = comfy_denoiser(unet, model_sampling, cond)
    samples = comfy_sample_euler(denoise, model_sampling, noise.generate_noise(latent), sigmas, latent["samples"])
    return samples, comfy_vae_decode(vae, samples), sigmas


def reference(tiny, seed, timestep=399):
    """``generate_x0`` + ``decode_latents`` with the noise ComfyUI's RandomNoise draws for ``seed``."""
    unet, vae, cond = tiny
    z = torch.randn(2, 4, 8, 8, generator=torch.manual_seed(seed))
    x0 = generate_x0(
        unet,
        z,
        cond["encoder_hidden_states"],
        cond["added_cond_kwargs"],
        get_sdxl_scheduler().alphas_cumprod,
        timestep,
    )
    return x0, ((decode_latents(vae, x0) + 1) / 2).clamp(0, 1), z


@torch.no_grad()
@pytest.mark.parametrize("t_star", [399, 999])  # 999: σ_max, where ComfyUI scales the noise by sqrt(1 + σ²) itself
def test_node_gives_the_generate_x0_image(tiny, comfy_stubs, t_star):
    model_sampling = ComfyModelSamplingDiscrete()
    samples, images, sigmas = run_node(tiny, model_sampling, seed=7, conditioning_timestep=t_star)
    x0, expected, _ = reference(tiny, seed=7, timestep=t_star)
    torch.testing.assert_close(sigmas, torch.stack([model_sampling.sigmas[t_star], torch.tensor(0.0)]))
    assert model_sampling.timestep(sigmas[:1]).item() == t_star
    assert x0.abs().max() > 1  # latents of realistic size, not near zero
    # fp32 rounding relative to |x0| (≈ 34 at t* = 999, where the old noise scaling was 3 % off)
    assert (samples - x0).abs().max() <= 1e-6 * x0.abs().max()
    assert (images - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_node_reads_t_star_from_the_export_metadata(tiny, comfy_stubs):
    (comfy_stubs / "diffusion_models").mkdir()
    save_file(
        {"x": torch.zeros(1)},
        comfy_stubs / "diffusion_models" / "g.safetensors",
        {"di_star.conditioning_timestep": "250"},
    )
    inputs = NODE_CLASS_MAPPINGS["DIStarOneStep"].INPUT_TYPES()["required"]
    assert inputs["timestep_from_file"][0] == ["none", "diffusion_models/g.safetensors"]
    assert inputs["conditioning_timestep"][1]["default"] == 399
    samples, _, sigmas = run_node(
        tiny, ComfyModelSamplingDiscrete(), seed=3, timestep_from_file="diffusion_models/g.safetensors"
    )
    x0, _, _ = reference(tiny, seed=3, timestep=250)
    assert ComfyModelSamplingDiscrete().timestep(sigmas[:1]).item() == 250
    assert (samples - x0).abs().max() <= 1e-5


@torch.no_grad()
def test_stock_sd_turbo_recipe_hits_t399_but_feeds_the_unet_0_7576_z(tiny, comfy_stubs):
    unet, _, cond = tiny
    model_sampling = ComfyModelSamplingDiscrete()
    # SDTurboScheduler(steps=1, denoise=0.40): timesteps 999, 899, ..., 99 from step 10 - int(10 * 0.4) = 6.
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[10 - int(10 * 0.40) :][:1]
    sigmas = torch.cat([model_sampling.sigma(timesteps), torch.zeros(1)])
    assert timesteps.item() == 399 and sigmas[0].item() == pytest.approx(1.1606, abs=1e-4)
    x0, _, z = reference(tiny, seed=7)
    # SamplerCustom(add_noise, cfg 1): RandomNoise z, scaled by sigma (not the maximum sigma), one euler step.
    seen = {}

    def recording_unet(sample, timestep, **kwargs):
        seen["input"] = sample
        return unet(sample, timestep, **kwargs)

    denoise = comfy_denoiser(recording_unet, model_sampling, cond)
    stock = comfy_sample_euler(denoise, model_sampling, z, sigmas, torch.zeros_like(z))
    ratio = (seen["input"] / z).flatten()
    assert ratio.std() < 1e-5 and ratio.mean().item() == pytest.approx(0.7576, abs=1e-4)  # sigma / sqrt(1 + sigma^2)
    assert (stock - x0).abs().max() > 0.1  # a different image; with the node: <= 1e-5 (above)


def test_read_conditioning_timestep(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "bad.safetensors", {"di_star.conditioning_timestep": "1e3"})
    assert read_conditioning_timestep(tmp_path / "plain.safetensors") is None
    assert read_conditioning_timestep(tmp_path / "model.ckpt") is None  # not safetensors: no metadata to read
    with pytest.raises(ValueError, match=r"di_star.conditioning_timestep is '1e3', not a timestep in \[0, 1000\)"):
        read_conditioning_timestep(tmp_path / "bad.safetensors")


def test_api_workflow_wires_the_node_into_sampler_custom_advanced(comfy_stubs):
    workflow = json.loads((NODE_DIR / "workflow_one_step_api.json").read_text())
    node_id = next(key for key, node in workflow.items() if node["class_type"] == "DIStarOneStep")
    node = NODE_CLASS_MAPPINGS["DIStarOneStep"]
    assert workflow[node_id]["inputs"].keys() == node.INPUT_TYPES()["required"].keys()
    sampler = next(node for node in workflow.values() if node["class_type"] == "SamplerCustomAdvanced")["inputs"]
    assert node.RETURN_TYPES[sampler["noise"][1]] == "NOISE" and sampler["noise"][0] == node_id
    assert node.RETURN_TYPES[sampler["sigmas"][1]] == "SIGMAS" and sampler["sigmas"][0] == node_id
    guider = workflow[sampler["guider"][0]]
    assert guider["class_type"] == "BasicGuider" and workflow[sampler["sampler"][0]]["inputs"] == {
        "sampler_name": "euler"
    }


def test_damaged_files_and_out_of_range_t_star_are_named(tmp_path, comfy_stubs):
    save_file({"x": torch.zeros(1)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    cases = {
        "short.safetensors": data[:4],  # truncated inside the length field
        "huge.safetensors": (10**15).to_bytes(8, "little") + data[8:],  # a length that would allocate a petabyte
        "cut.safetensors": data[: len(data) // 2],  # header cut short
        "text.safetensors": b"not a safetensors file at all",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a readable .safetensors file \(.*\): pick another"):
            read_conditioning_timestep(tmp_path / name)
    node = NODE_CLASS_MAPPINGS["DIStarOneStep"]()
    model = FakeModelPatcher(ComfyModelSamplingDiscrete())
    for t_star in (-1, 1000, 399.5):
        with pytest.raises(ValueError, match=rf"conditioning_timestep must be an integer in \[0, 999\], got {t_star}"):
            node.build(model, 0, t_star)
