"""DI* training in the package (docs/training.md): settings, prompt data, the three networks, one step of each kind.

The accelerate loop, argparse and logging live in ``examples/train_di_star_sdxl.py``.
"""

from .config import CFG_MODES, DEFAULT_LORA_TARGET_MODULES, DIVERGENCES, DIStarConfig
from .data import load_prompts, prompt_batch
from .models import ROLES, DIStarNetworks, RoleModule, setup_networks
from .steps import Conditioning, SDXLConditioning, as_family, assistant_loss, encode_prompts, generator_loss

__all__ = [
    "CFG_MODES",
    "DEFAULT_LORA_TARGET_MODULES",
    "DIVERGENCES",
    "ROLES",
    "RoleModule",
    "Conditioning",
    "SDXLConditioning",
    "DIStarConfig",
    "DIStarNetworks",
    "as_family",
    "assistant_loss",
    "encode_prompts",
    "generator_loss",
    "load_prompts",
    "prompt_batch",
    "setup_networks",
]
