"""Checks the trainer runs before the heavy models load: where each model is, and what the LoRA flags would adapt.

Each failure is a :class:`~diffusers_di_star.runtime.ModelLoadError` (printed as one line) that says whether the
name was taken as a local path or a Hub id, and the fix; a local path is never called a Hub id.
"""

from __future__ import annotations

import torch

from ..runtime import ModelLoadError
from ..sources import is_hub_id, load_failure

__all__ = ["check_lora_targets", "is_hub_id", "load_unet_config", "model_error"]


def model_error(flag: str, name: str, error: BaseException, what: str = "an SDXL-layout folder") -> ModelLoadError:
    """The one-line error for ``flag name`` that ``from_pretrained`` could not load (``sources.load_failure``)."""
    return ModelLoadError(load_failure(flag, name, error, what))


def load_unet_config(name: str, flag: str = "--pretrained_model_name_or_path", revision: str | None = None) -> dict:
    """The config of ``name``'s ``unet`` (a few kB): proves the model is reachable before anything big loads."""
    from diffusers import UNet2DConditionModel

    try:
        return dict(UNet2DConditionModel.load_config(name, subfolder="unet", revision=revision))
    except (OSError, ValueError) as error:
        raise model_error(flag, name, error) from error


def check_lora_targets(unet_config: dict, targets: dict[str, list[str]]) -> None:
    """Every LoRA target module name (``{flag: names}``) matches a module of the UNet, by peft's matching rule.

    The UNet is built on the meta device from its config: no weights are allocated or read.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    names = [name for name, _ in unet.named_modules() if name]
    for flag, modules in targets.items():
        for module in modules:
            config = LoraConfig(target_modules=[module])
            if not any(check_target_module_exists(config, name) for name in names):
                layers = (torch.nn.Linear, torch.nn.Conv2d)
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in unet.named_modules() if isinstance(m, layers)})
                leaves = [leaf for leaf in leaves if not leaf.isdigit()]
                raise ValueError(
                    f"{flag}: {module!r} matches no module of the UNet; names that do include "
                    f"{', '.join(leaves[:12])} (and dotted suffixes such as to_out.0)."
                )
