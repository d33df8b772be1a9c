"""The ComfyUI node. ComfyUI modules (``comfy``, ``folder_paths``) are imported inside the methods, so that this file
imports without ComfyUI; the math is in :mod:`.core`."""

from __future__ import annotations

import torch

from .core import DEFAULT_CONDITIONING_TIMESTEP, one_step_noise, one_step_sigmas, read_conditioning_timestep

_NO_FILE = "none"


class OneStepNoise:
    """A NOISE for ``SamplerCustomAdvanced``: ComfyUI's ``RandomNoise`` (same seed, same z), times sqrt(1 + σ²)/σ."""

    def __init__(self, seed: int, sigma: float, sigma_max: float):
        self.seed = seed
        self.sigma = sigma
        self.sigma_max = sigma_max

    def generate_noise(self, input_latent):
        import comfy.sample

        z = comfy.sample.prepare_noise(input_latent["samples"], self.seed, input_latent.get("batch_index"))
        return one_step_noise(z, self.sigma, self.sigma_max)


def _model_folders() -> list[str]:
    import folder_paths

    # "diffusion_models" is the newer name of "models/unet" (older ComfyUI only knows "unet").
    unet = "diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet"
    return ["checkpoints", unet]


def _model_files() -> list[str]:
    import folder_paths

    return [
        f"{folder}/{name}"
        for folder in _model_folders()
        for name in folder_paths.get_filename_list(folder)
        if name.endswith(".safetensors")
    ]


def _full_path(choice: str) -> str:
    import folder_paths

    folder, name = choice.split("/", 1)
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{choice} is not in ComfyUI's {folder} folder any more; pick the file again.")
    return path


def _model_sampling(model):
    get = getattr(model, "get_model_object", None)  # ModelPatcher; older versions: model.model.model_sampling
    return get("model_sampling") if get is not None else model.model.model_sampling


class DIStarOneStep:
    """NOISE and SIGMAS for ``SamplerCustomAdvanced`` that make ComfyUI compute the exact DI*/DMD2 one-step image."""

    DESCRIPTION = (
        "Exact one-step image of a DI* / DMD2 SDXL generator: the UNet sees the noise z itself at t* (399). Wire "
        "noise and sigmas into SamplerCustomAdvanced with BasicGuider (cfg 1) and the euler sampler."
    )
    RETURN_TYPES = ("NOISE", "SIGMAS")
    RETURN_NAMES = ("noise", "sigmas")
    FUNCTION = "build"
    CATEGORY = "sampling/custom_sampling"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL",),
                "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "conditioning_timestep": ("INT", {"default": DEFAULT_CONDITIONING_TIMESTEP, "min": 0, "max": 999}),
                "timestep_from_file": ([_NO_FILE, *_model_files()], {"default": _NO_FILE}),
            }
        }

    def build(self, model, noise_seed, conditioning_timestep, timestep_from_file=_NO_FILE):
        timestep = conditioning_timestep
        if timestep_from_file != _NO_FILE:
            stored = read_conditioning_timestep(_full_path(timestep_from_file))
            timestep = timestep if stored is None else stored
        model_sampling = _model_sampling(model)
        steps = len(model_sampling.sigmas)  # ComfyUI's sigma(t) clamps t into [0, steps − 1]: refuse instead
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < steps:
            raise ValueError(f"conditioning_timestep must be an integer in [0, {steps - 1}], got {timestep!r}.")
        sigma = float(model_sampling.sigma(torch.tensor(timestep)))
        return OneStepNoise(noise_seed, sigma, float(model_sampling.sigma_max)), one_step_sigmas(sigma)


NODE_CLASS_MAPPINGS = {"DIStarOneStep": DIStarOneStep}
NODE_DISPLAY_NAME_MAPPINGS = {"DIStarOneStep": "DI* One-Step (noise + sigmas)"}
