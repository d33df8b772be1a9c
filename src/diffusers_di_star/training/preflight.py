"""Checks the trainer runs before the heavy models load: where each model is, and what the LoRA flags would adapt.

Each failure is a :class:`~diffusers_di_star.runtime.ModelLoadError` (printed as one line) that says whether the
name was taken as a local path or a Hub id, and the fix; a local path is never called a Hub id.
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..sources import is_hub_id, load_failure

__all__ = ["check_lora_targets", "detect_model_family", "is_hub_id", "load_network_config", "model_error"]


def model_error(flag: str, name: str, error: BaseException, what: str = "an SDXL-layout folder") -> ModelLoadError:
    """The one-line error for ``flag name`` that ``from_pretrained`` could not load (``sources.load_failure``)."""
    return ModelLoadError(load_failure(flag, name, error, what))


def detect_model_family(name: str, flag: str = "--pretrained_model_name_or_path", revision: str | None = None):
    """The model family of ``name`` from its ``model_index.json`` (a few kB): proves the model is reachable before
    anything big loads; an unknown layout names what it found and the families there are."""
    from ..families import detect_family

    try:
        return detect_family(name, revision=revision)
    except (OSError, ValueError) as error:
        raise model_error(flag, name, error, what="a Diffusers pipeline folder") from error


def load_network_config(
    family_class, name: str, flag: str = "--pretrained_model_name_or_path", revision: str | None = None
) -> dict:
    """The config of ``name``'s denoising network (``unet`` or ``transformer``, a few kB)."""
    try:
        return family_class.load_network_config(name, revision=revision)
    except (OSError, ValueError) as error:
        raise model_error(flag, name, error, what=f"a {family_class.name} pipeline folder") from error


def check_lora_targets(network_config: dict, targets: dict[str, list[str]], network_class=None) -> None:
    """Every LoRA target module name (``{flag: names}``) matches a module of the network, by peft's matching rule.

    The network (``network_class``, default ``UNet2DConditionModel``) is built on the meta device from its config: no
    weights are allocated or read.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with init_empty_weights():
        unet = (network_class or UNet2DConditionModel).from_config(network_config)
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
