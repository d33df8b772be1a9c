"""diffusers-di-star: Diff-Instruct* (DI*) one-step SDXL, SD1.5/2.x, SD3 and FLUX.1 generators for Diffusers.

The main entry points; the rest lives in its sub-module: ``losses`` (the DI* terms), ``rewards``, ``training``,
``export`` (ComfyUI / kohya), ``testing`` (a tiny offline SDXL).

The names below are imported on first use (:mod:`~diffusers_di_star.lazy`): ``import diffusers_di_star`` loads no
torch, so the command lines check their flags in about a second (docs/training.md).
"""

__version__ = "0.1.0.dev0"  # before the imports: sub-modules write it into file metadata

from . import quiet  # noqa: F401  (first: installs its log filters before transformers' classes are imported)
from .lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".export": ("load_generator_unet",),
        ".one_step": ("DEFAULT_CONDITIONING_TIMESTEP", "decode_latents", "generate_x0"),
        ".pipeline_di_star_flux": ("DIStarFluxPipeline",),
        ".pipeline_di_star_sd": ("DIStarSDPipeline",),
        ".pipeline_di_star_sd3": ("DIStarSD3Pipeline",),
        ".pipeline_di_star_sdxl": ("DIStarSDXLPipeline", "DIStarSDXLPipelineOutput"),
        ".rewards": ("RewardModel", "load_reward"),
    },
)
