"""diffusers-di-star: Diff-Instruct* (DI*) one-step SDXL generators for Diffusers."""

from .one_step import DEFAULT_CONDITIONING_TIMESTEP, decode_latents, generate_x0
from .pipeline_di_star_sdxl import DIStarSDXLPipeline, DIStarSDXLPipelineOutput

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_CONDITIONING_TIMESTEP",
    "DIStarSDXLPipeline",
    "DIStarSDXLPipelineOutput",
    "decode_latents",
    "generate_x0",
]
