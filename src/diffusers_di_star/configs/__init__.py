"""Full-size SDXL component configs, bundled so that nothing has to be downloaded to build the real architectures.

The JSON files are the published ``stabilityai/stable-diffusion-xl-base-1.0`` configs, laid out like that repository
(one subfolder per component), so the folder also works wherever Diffusers expects a config repository:

>>> import torch
>>> from diffusers import UNet2DConditionModel
>>> from diffusers_di_star.configs import SDXL_BASE_CONFIG_DIR, load_sdxl_config
>>> with torch.device("meta"):                     # the real 2.6 B-parameter UNet, no memory
...     unet = UNet2DConditionModel.from_config(load_sdxl_config("unet"))
>>> UNet2DConditionModel.load_config(SDXL_BASE_CONFIG_DIR, subfolder="unet")["cross_attention_dim"]
2048

Text encoders: ``CLIPTextConfig(**load_sdxl_config("text_encoder_2"))``. Tokenizer vocabularies are not bundled
(they are data, not configs); :mod:`diffusers_di_star.testing` builds tiny ones offline.
"""

from __future__ import annotations

import json
import os

__all__ = ["SDXL_BASE_CONFIG_DIR", "SDXL_COMPONENTS", "load_sdxl_config"]

#: A config-only copy of the SDXL base repository layout (``unet/config.json``, ``vae/config.json``, ...).
SDXL_BASE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdxl-base-1.0")

#: Component name -> config file inside :data:`SDXL_BASE_CONFIG_DIR`.
SDXL_COMPONENTS = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def load_sdxl_config(name: str) -> dict:
    """The published SDXL base config of one component, as a dict (a fresh copy on every call)."""
    if name not in SDXL_COMPONENTS:
        raise ValueError(f"unknown SDXL component {name!r}; expected one of {sorted(SDXL_COMPONENTS)}.")
    with open(os.path.join(SDXL_BASE_CONFIG_DIR, SDXL_COMPONENTS[name]), encoding="utf-8") as f:
        return json.load(f)
