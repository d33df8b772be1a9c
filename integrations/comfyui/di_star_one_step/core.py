"""The math of the DI* one-step node, in plain torch (no ComfyUI import), so it can be tested on its own.

ComfyUI samples in the variance-exploding form of SDXL's schedule (``comfy/model_sampling.py``,
``ModelSamplingDiscrete`` and ``EPS``): σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), the sampler state is x = x0 + σ·ε, the UNet is
fed x/sqrt(1 + σ²) at timestep ``timestep(σ)``, and ``denoised = x − σ·ε̂``. A one-step generator (DMD2, DI*)
computes x0 = (z − sqrt(1 − ᾱ_t*)·ε̂(z, t*)) / sqrt(ᾱ_t*) (``diffusers_di_star.one_step.generate_x0``), i.e. the
UNet must see z itself at t*. With x = sqrt(1 + σ²)·z, since sqrt(1 + σ²) = 1/sqrt(ᾱ) and σ = sqrt(1 − ᾱ)/sqrt(ᾱ):

    denoised = sqrt(1 + σ²)·z − σ·ε̂(z, t*) = (z − sqrt(1 − ᾱ)·ε̂(z, t*)) / sqrt(ᾱ) = x0,

and one Euler step from σ to 0 returns ``denoised``. ComfyUI's samplers scale the start noise by σ, not
sqrt(1 + σ²), unless σ is the model's maximum (``KSAMPLER.sample`` → ``EPS.noise_scaling``), so the node hands the
sampler the noise z·sqrt(1 + σ²)/σ (:func:`one_step_noise`) and the sigmas [σ_t*, 0] (:func:`one_step_sigmas`).
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

__all__ = [
    "DEFAULT_CONDITIONING_TIMESTEP",
    "METADATA_KEY",
    "noise_multiplier",
    "one_step_noise",
    "one_step_sigmas",
    "read_conditioning_timestep",
]

#: t* of DMD2 and the released DI* checkpoints.
DEFAULT_CONDITIONING_TIMESTEP = 399
#: The safetensors metadata field in which ``di-star export`` records t*.
METADATA_KEY = "di_star.conditioning_timestep"
#: safetensors' own limit on its JSON header (100 MB): a larger length means a damaged file, not a big header.
MAX_HEADER_BYTES = 100_000_000


def noise_multiplier(sigma: float, sigma_max: float = math.inf) -> float:
    """sqrt(1 + σ²)/σ: ComfyUI multiplies the start noise by σ, so the sampler starts at sqrt(1 + σ²)·z.

    At the model's maximum σ (t* = 999) ComfyUI already scales by sqrt(1 + σ²) itself (``max_denoise``, same test as
    ``KSAMPLER.sample``): then the noise passes unchanged.
    """
    if math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max:
        return 1.0
    return math.sqrt(1.0 + sigma * sigma) / sigma


def one_step_noise(noise: torch.Tensor, sigma: float, sigma_max: float = math.inf) -> torch.Tensor:
    """The NOISE the sampler must receive so that the UNet sees ``noise`` (z) itself at σ."""
    return noise * noise_multiplier(sigma, sigma_max)


def one_step_sigmas(sigma: float | torch.Tensor) -> torch.Tensor:
    """The SIGMAS of one step from σ_t* to 0 (ComfyUI's schedulers end with a 0, too)."""
    return torch.tensor([float(sigma), 0.0], dtype=torch.float32)


def read_conditioning_timestep(path: str | os.PathLike) -> int | None:
    """t* from the ``di_star.conditioning_timestep`` metadata of a ``.safetensors`` file, or ``None`` if absent.

    Reads the JSON header only (the format's first 8 bytes give its length), so nothing is loaded. A file whose
    header cannot be read (truncated, damaged, not safetensors) raises ``ValueError`` naming it.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return None
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= min(os.path.getsize(path) - 8, MAX_HEADER_BYTES):
                raise ValueError(f"a header length of {length} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("a header that is not a JSON object")
    except (OSError, struct.error, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({err}): pick another file, or set t* by hand."
        ) from None
    value = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip().isdigit() or not 0 <= int(value) < 1000:
        raise ValueError(f"{path}: {METADATA_KEY} is {value!r}, not a timestep in [0, 1000); set t* by hand.")
    return int(value)
