"""diffusers-di-star: Diff-Instruct* (DI*) one-step SDXL, SD1.5/2.x, SD3 and FLUX.1 generators for Diffusers.

The main entry points; the rest lives in its sub-module: ``losses`` (the DI* terms), ``rewards``, ``training``,
``export`` (ComfyUI / kohya), ``testing`` (a tiny offline SDXL).
"""

__version__ = "0.1.0.dev0"  # before the imports: sub-modules write it into file metadata

from . import quiet  # noqa: F401  (first: installs its log filters before transformers' classes are imported)
from .export import load_generator_unet
from .one_step import DEFAULT_CONDITIONING_TIMESTEP, decode_latents, generate_x0
from .pipeline_di_star_flux import DIStarFluxPipeline
from .pipeline_di_star_sd import DIStarSDPipeline
from .pipeline_di_star_sd3 import DIStarSD3Pipeline
from .pipeline_di_star_sdxl import DIStarSDXLPipeline, DIStarSDXLPipelineOutput
from .rewards import RewardModel, load_reward

__all__ = [
    "DEFAULT_CONDITIONING_TIMESTEP",
    "DIStarFluxPipeline",
    "DIStarSD3Pipeline",
    "DIStarSDPipeline",
    "DIStarSDXLPipeline",
    "DIStarSDXLPipelineOutput",
    "RewardModel",
    "decode_latents",
    "generate_x0",
    "load_generator_unet",
    "load_reward",
]
