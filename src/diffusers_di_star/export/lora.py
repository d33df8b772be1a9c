"""UNet LoRA: PEFT/Diffusers format <-> kohya format (what ComfyUI, A1111/Forge and kohya's sd-scripts load); a
transformer LoRA (SD3, FLUX.1) with its alphas for ComfyUI (:func:`peft_lora_with_alphas`).

PEFT applies ``W + (lora_alpha / r) · B·A`` (``lora_alpha / sqrt(r)`` with rsLoRA), with ``lora_alpha`` stored in the
adapter config: Diffusers writes it into the safetensors metadata (``"lora_adapter_metadata"``, keys ``"unet.r"``,
``"unet.lora_alpha"``, ``"unet.alpha_pattern"``, ...). kohya applies ``W + (alpha / rank) · up·down`` with ``alpha``
stored per module as a tensor ``<name>.alpha``. The kohya alpha of a module is therefore ``scale · rank``, where
``scale`` is the module's PEFT scale; writing ``alpha = rank`` (what ``diffusers.utils.convert_state_dict_to_kohya``
does) silently rescales every LoRA trained with ``lora_alpha != r``.

Module names are UNet paths with dots replaced by underscores, in the naming of kohya's UNet for the architecture,
as its trainers write them: the original (sgm) paths for SDXL
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), the Diffusers paths for SD1.x/2.x
(``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``, as sd-scripts' ``original_unet`` names
its modules).
"""

from __future__ import annotations

import collections
import json
import math
import re

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils.other import get_pattern_key

from .files import ExportError
from .original_keys import unet_key_map, unet_version

__all__ = [
    "KOHYA_UNET_PREFIX",
    "LORA_METADATA_KEY",
    "diffusers_lora_to_peft",
    "lora_config_from_metadata",
    "peft_lora_to_kohya",
    "kohya_lora_to_peft",
    "lora_metadata",
    "peft_lora_with_alphas",
]

KOHYA_UNET_PREFIX = "lora_unet_"
#: The safetensors metadata entry where Diffusers (>= 0.34) stores the adapter configs as JSON.
LORA_METADATA_KEY = "lora_adapter_metadata"

_PEFT_SUFFIXES = {"lora_A": "lora_down", "lora_B": "lora_up"}
_KOHYA_FIELDS = {"lora_down.weight", "lora_up.weight", "alpha"}


def lora_config_from_metadata(metadata: dict[str, str], component: str = "unet") -> dict:
    """The PEFT ``LoraConfig`` fields of one component from a Diffusers LoRA file's metadata (``{}`` if absent)."""
    packed = json.loads(metadata.get(LORA_METADATA_KEY, "{}"))
    prefix = f"{component}."
    return {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}


def diffusers_lora_to_peft(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet LoRA in any Diffusers layout -> PEFT keys (``unet.<module>.lora_A.weight``); prefixes are kept.

    Handles PEFT keys (unchanged), the ``save_lora_weights`` layout that Diffusers' training scripts and our trainer
    write (``<module>.lora.down.weight``, from ``convert_state_dict_to_diffusers``) and the old attention-processor
    layout (``to_q_lora.down``), with Diffusers' own ``convert_unet_state_dict_to_peft``: the conversion
    ``UNet2DConditionModel.load_lora_adapter`` applies when ``load_lora_weights`` reads such a file.
    """
    return convert_unet_state_dict_to_peft(state_dict)


def _lora_modules(state_dict: dict[str, torch.Tensor], component: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<component>.<module>.lora_A.weight": A, ...}`` -> ``{"<module>": {"lora_A": A, "lora_B": B}}``."""
    modules = collections.defaultdict(dict)
    for key, value in state_dict.items():
        match = re.fullmatch(rf"(?:{component}\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None or key.startswith(("text_encoder.", "text_encoder_2.")):
            raise ExportError(
                f"unsupported LoRA key {key!r}: only {component} LoRA weights (lora_A/lora_B) convert (no "
                f"text-encoder LoRA, DoRA or LoRA bias)."
            )
        modules[match.group(1)][match.group(2)] = value
    return modules


def _kohya_namer(unet_config):
    """Diffusers module path -> kohya name: its path in kohya's UNet (sgm for SDXL, Diffusers for SD1.x/2.x) with
    dots replaced by underscores; ``KeyError`` for a module the UNet does not have."""
    key_map, sgm_names = unet_key_map(unet_config), unet_version(unet_config) == "sdxl"

    def name(module: str) -> str:
        original = key_map.to_original(module)
        return KOHYA_UNET_PREFIX + (original if sgm_names else module).replace(".", "_")

    return name


def _peft_scale(module: str, rank: int, lora_config: dict) -> float:
    # The scale PEFT's LoraLayer uses for this module: alpha_pattern and use_rslora included.
    alpha_pattern = lora_config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), lora_config["lora_alpha"])
    return alpha / math.sqrt(rank) if lora_config.get("use_rslora") else alpha / rank


def peft_lora_to_kohya(state_dict: dict[str, torch.Tensor], unet_config, lora_config: dict) -> dict[str, torch.Tensor]:
    """PEFT/Diffusers UNet LoRA -> kohya keys, with each module's TRUE alpha (``scale · rank``, float32).

    ``lora_config`` holds the adapter's ``LoraConfig`` fields (at least ``lora_alpha``), e.g. from
    :func:`lora_config_from_metadata`; ranks are read from the weights.
    """
    if lora_config.get("lora_alpha") is None:
        raise ExportError("the LoRA config has no lora_alpha; pass it (--lora-alpha) to convert to kohya format.")
    namer = _kohya_namer(unet_config)
    kohya = {}
    for module, weights in _lora_modules(state_dict, "unet").items():
        try:
            name = namer(module)
        except KeyError:
            raise ExportError(
                f"LoRA module {module!r} is not in this UNet's layout; pass the matching --base-model."
            ) from None
        rank = weights["lora_A"].shape[0]
        for peft_name, kohya_name in _PEFT_SUFFIXES.items():
            kohya[f"{name}.{kohya_name}.weight"] = weights[peft_name]
        kohya[f"{name}.alpha"] = torch.tensor(_peft_scale(module, rank, lora_config) * rank, dtype=torch.float32)
    return kohya


def peft_lora_with_alphas(
    state_dict: dict[str, torch.Tensor], lora_config: dict, component: str = "transformer"
) -> dict[str, torch.Tensor]:
    """A LoRA with PEFT keys -> the same keys (``<component>.<module>.lora_A.weight``) and each module's TRUE alpha
    (``scale · rank``, float32) as ``<component>.<module>.alpha``.

    ComfyUI's Load LoRA reads a Diffusers-keyed SD3 / FLUX LoRA and scales each module by that tensor / rank; it
    ignores the ``lora_alpha`` in Diffusers' metadata, so a file without the tensors is applied at scale 1, wrong for
    any ``lora_alpha != r`` (``tests/fidelity/check_comfy_sd3_flux.py``). Diffusers refuses such tensors in its own
    files, so this is a separate file for ComfyUI.
    """
    out = {}
    for module, weights in _lora_modules(state_dict, component).items():
        rank = weights["lora_A"].shape[0]
        for name, weight in weights.items():
            out[f"{component}.{module}.{name}.weight"] = weight
        alpha = _peft_scale(module, rank, lora_config) * rank
        out[f"{component}.{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _kohya_names(unet_config) -> dict[str, str]:
    """kohya module name -> Diffusers module path, for every module with weights (built on the meta device)."""
    namer = _kohya_namer(unet_config)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    modules = {key.rsplit(".", 1)[0] for key in unet.state_dict()}
    return {namer(m): m for m in modules}


def kohya_lora_to_peft(state_dict: dict[str, torch.Tensor], unet_config) -> tuple[dict[str, torch.Tensor], dict]:
    """kohya UNet LoRA -> (Diffusers LoRA state dict with ``unet.`` keys, PEFT ``LoraConfig`` fields).

    A module without an ``.alpha`` tensor gets ``alpha = rank`` (kohya's rule). The most common rank and alpha
    become ``r``/``lora_alpha``; modules that differ go to ``rank_pattern``/``alpha_pattern`` (exact-name patterns).
    """
    names = _kohya_names(unet_config)
    grouped = collections.defaultdict(dict)
    for key, value in state_dict.items():
        name, _, field = key.partition(".")
        if name not in names:
            raise ExportError(f"unsupported kohya LoRA key {key!r}: only UNet LoRA of this architecture converts.")
        grouped[name][field] = value
    peft_state_dict, ranks, alphas = {}, {}, {}
    for name, fields in grouped.items():
        if not set(fields) <= _KOHYA_FIELDS or "lora_down.weight" not in fields or "lora_up.weight" not in fields:
            raise ExportError(
                f"kohya module {name!r} has {sorted(fields)}; only plain LoRA ({sorted(_KOHYA_FIELDS)})."
            )
        module = names[name]
        peft_state_dict[f"unet.{module}.lora_A.weight"] = fields["lora_down.weight"]
        peft_state_dict[f"unet.{module}.lora_B.weight"] = fields["lora_up.weight"]
        ranks[module] = fields["lora_down.weight"].shape[0]
        alphas[module] = float(fields["alpha"]) if "alpha" in fields else float(ranks[module])
    return peft_state_dict, _lora_config_fields(ranks, alphas)


def _lora_config_fields(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != lora_alpha},
    }


def lora_metadata(lora_config: dict, component: str = "unet") -> dict[str, str]:
    """Safetensors metadata in Diffusers' layout, so ``load_lora_weights`` recreates the exact ``LoraConfig``."""
    return {LORA_METADATA_KEY: json.dumps({f"{component}.{k}": v for k, v in lora_config.items()}, sort_keys=True)}
