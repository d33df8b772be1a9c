"""Model families behind one seam (``base.py`` says how a family plugs in): SDXL (ε, v), SD1.5/2.x (ε, v),
SD3 / SD3.5 (flow) and FLUX.1 (flow, guidance-distilled).

:func:`family_for` picks the family of a Diffusers folder or Hub id from its ``model_index.json``.
"""

from __future__ import annotations

from ..errors import ModelLoadError
from .base import DEFAULT_LORA_TARGET_MODULES, Conditioning, ModelFamily, read_model_index
from .flux import FluxConditioning, FluxFamily
from .sd import SDConditioning, SDFamily
from .sd3 import SD3Conditioning, SD3Family
from .sdxl import SDXLConditioning, SDXLFamily

__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "FAMILIES",
    "FluxConditioning",
    "FluxFamily",
    "Conditioning",
    "ModelFamily",
    "SD3Conditioning",
    "SD3Family",
    "SDConditioning",
    "SDFamily",
    "SDXLConditioning",
    "SDXLFamily",
    "detect_family",
    "family_for",
    "read_model_index",
]

#: Every family by name.
FAMILIES: dict[str, type[ModelFamily]] = {
    family.name: family for family in (SDXLFamily, SDFamily, SD3Family, FluxFamily)
}


def family_for(model_index: dict, name: str) -> type[ModelFamily]:
    """The family whose pipeline class ``model_index["_class_name"]`` names; an unknown layout raises one line."""
    class_name = model_index.get("_class_name")
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    components = sorted(k for k, v in model_index.items() if not k.startswith("_") and isinstance(v, list | tuple))
    known = "; ".join(f"{family.name} ({', '.join(family.pipeline_class_names)})" for family in FAMILIES.values())
    raise ModelLoadError(
        f"{name!r} is a {class_name or 'pipeline without a _class_name'} folder (components: "
        f"{', '.join(components) or 'none'}), which no DI* model family reads. Families: {known}."
    )


def detect_family(name: str, revision: str | None = None) -> type[ModelFamily]:
    """:func:`family_for` of :func:`read_model_index`."""
    return family_for(read_model_index(name, revision), name)
