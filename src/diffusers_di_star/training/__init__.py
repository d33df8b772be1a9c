"""DI* training in the package (docs/training.md): settings, prompt data, the three networks, one step of each kind.

The accelerate loop, argparse and logging live in ``examples/train_di_star_sdxl.py``. The names below are imported
on first use (:mod:`~diffusers_di_star.lazy`): the trainer reads its flags from the torch-free ``config`` module
before anything heavy loads.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".config": ("CFG_MODES", "DEFAULT_LORA_TARGET_MODULES", "DIVERGENCES", "DIStarConfig"),
        ".data": ("load_prompts", "prompt_batch"),
        ".models": ("ROLES", "DIStarNetworks", "RoleModule", "setup_networks"),
        ".steps": (
            "Conditioning",
            "SDXLConditioning",
            "as_family",
            "assistant_loss",
            "encode_prompts",
            "generator_loss",
        ),
    },
)
