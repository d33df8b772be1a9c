"""The defaults, limits and option names that the command lines check, in a module that imports nothing heavy.

``di-star`` and the trainer parse and check their flags with these before torch, diffusers, transformers or
accelerate are imported, so a mistyped flag fails in about a second. The modules that use them import them from here
(``losses.py`` the time sampler's range and the names of its distances and weightings, ``one_step.py`` t*, the
pipeline its limits, the families the LoRA targets, ``weights.py`` the dtype names, the engine the trained roles).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CONDITIONING_TIMESTEP",
    "DEFAULT_LORA_TARGET_MODULES",
    "DEFAULT_T_MAX",
    "DEFAULT_T_MIN",
    "DISTANCES",
    "DTYPE_NAMES",
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_PIXELS",
    "TIME_WEIGHTING_NAMES",
    "TRAINED_ROLES",
]

#: t* of DMD2 and the released DI* checkpoints (docs/math.md §2).
DEFAULT_CONDITIONING_TIMESTEP = 399

#: DMD2's range for π(t) = U{t_min, …, t_max} on SDXL's 1000 discrete timesteps (docs/math.md §8).
DEFAULT_T_MIN, DEFAULT_T_MAX = 20, 980

#: The distances d of the score divergence: pseudo-Huber (the paper's) and the squared L2 norm (Fisher divergence),
#: docs/math.md §3.
DISTANCES = ("pseudo_huber", "l2")

#: The names of the time weightings w(t) of docs/math.md §8; their functions are ``losses.TIME_WEIGHTINGS``.
TIME_WEIGHTING_NAMES = ("constant", "sigma", "sigma_squared")

#: The attention projections that diffusers' SD/SDXL LoRA examples adapt.
DEFAULT_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

#: The largest image `__call__` makes unless `pipe.max_image_pixels` is raised (or set to None): 4096² = 16.8 MP, 16×
#: SDXL's native 1024² area. Beyond it, a mistyped size would allocate tens of GiB before failing.
MAX_IMAGE_PIXELS = 4096 * 4096
#: The most images `__call__` makes at once unless `pipe.max_batch_size` is raised: a mistyped count (10**9) would
#: otherwise allocate its noise before failing. 256 one-step 1024² SDXL images are ~1 GiB of latents in fp32.
MAX_BATCH_SIZE = 256

#: The dtype names the command line and the export functions accept (``weights.DTYPES`` maps them to torch dtypes).
DTYPE_NAMES = ("fp32", "fp16", "bf16")

#: The networks that train, each with its LoRA flags, optimiser and checkpoint folder (named after it).
TRAINED_ROLES = ("generator", "assistant")
