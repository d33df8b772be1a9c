"""Load SDXL and SD1.x/2.x weights from every layout people publish: Diffusers folders and Hub repositories, single
files, UNet-only safetensors and DMD2-style pickled ``.bin`` state dicts.

Hub ids go through ``huggingface_hub``/``from_pretrained`` (cache first, then download); local paths never touch the
network. Pickles are only read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..configs import load_sdxl_config
from ..sources import LORA_RUN_FILES, load_failure, local_path_problem, lora_run
from .files import ExportError, cast_floating, load_state_dict_file
from .original_keys import (
    SD1_CLIP_PREFIX,
    SD2_CLIP_PREFIX,
    UNET_PREFIX,
    V_PRED_KEY,
    check_unet_config,
    unet_from_original,
)

__all__ = [
    "SDXL_BASE_MODEL_ID",
    "SDXL_COMPONENT_CLASSES",
    "checkpoint_kind",
    "resolve_file",
    "load_component_config",
    "build_empty_component",
    "assign_weights",
    "load_pipeline_components",
    "load_generator_unet",
]

SDXL_BASE_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"

#: The SDXL components that hold weights, and their classes (SD1.x/2.x have the first three).
SDXL_COMPONENT_CLASSES = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}

_HUB_ERRORS = (OSError, ValueError, EntryNotFoundError)
_PLAIN_WEIGHTS = {
    f"{stem}{suffix}"
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model")
    for suffix in (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
}
# e.g. diffusion_pytorch_model.fp16.safetensors, model.fp16-00001-of-00002.safetensors, *.safetensors.index.fp16.json
_VARIANT_WEIGHTS = re.compile(
    r"(?:diffusion_pytorch_model|model|pytorch_model)(?:\.safetensors\.index|\.bin\.index)?\.(\w+?)(?:-\d+-of-\d+)?"
    r"\.(?:safetensors|bin|json)"
)


_WHAT = "a local file or folder, or a Hub id ('owner/name')"


def _check_local_or_hub_id(name: str) -> None:
    if problem := local_path_problem(None, name, _WHAT):
        raise ExportError(problem)


def _hub_hint(name: str, err: Exception) -> ExportError:
    return ExportError(load_failure(None, name, err, "a Diffusers folder (with model_index.json or config.json)"))


def resolve_file(path_or_id: str, filename: str, subfolder: str | None = None) -> str:
    """A local file path: ``path_or_id/subfolder/filename`` locally, else ``hf_hub_download`` from the Hub repo."""
    if os.path.isdir(path_or_id):
        path = os.path.join(path_or_id, subfolder or "", filename)
        if not os.path.isfile(path):
            raise ExportError(f"no file {filename!r} in {os.path.dirname(path)!r}.")
        return path
    if os.path.isfile(path_or_id):
        raise ExportError(
            f"{path_or_id!r} is a single file; this needs a Diffusers folder holding {filename} (or a Hub id): "
            "convert the file first with `di-star export --format diffusers`."
        )
    _check_local_or_hub_id(path_or_id)
    try:
        return hf_hub_download(path_or_id, filename, subfolder=subfolder)
    except _HUB_ERRORS as err:
        raise _hub_hint(path_or_id, err) from err


def checkpoint_kind(keys) -> str:
    """What a weights file holds, from its key names.

    ``"sdxl-checkpoint"`` / ``"sd-checkpoint"`` (full single file), ``"unet-original"``
    (``model.diffusion_model.*`` or bare sgm keys), ``"unet-diffusers"``, ``"kohya-lora"``, ``"peft-lora"``
    (``lora_A``/``lora_B``), ``"diffusers-lora"`` (the ``lora.down``/``lora.up`` layout ``save_lora_weights`` writes
    from training scripts, or the old ``to_q_lora.down`` attention-processor layout) or ``"unknown"``.
    """
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya-lora"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft-lora"
    if any(re.search(r"[._]lora\.(down|up)\.", k) for k in keys):
        return "diffusers-lora"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith("conditioner.embedders.") for k in keys):
            return "sdxl-checkpoint"
        sd = any(k.startswith((SD1_CLIP_PREFIX, SD2_CLIP_PREFIX)) for k in keys)
        return "sd-checkpoint" if sd else "unet-original"
    if "input_blocks.0.0.weight" in keys:
        return "unet-original"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "unet-diffusers"
    return "unknown"


def load_component_config(name: str, base_model: str | None = None):
    """The config of one SDXL component: from ``base_model`` (Diffusers folder or Hub id) or the bundled SDXL base."""
    if base_model is not None:
        _check_local_or_hub_id(base_model)
    try:
        if name.startswith("text_encoder"):
            if base_model is None:
                return CLIPTextConfig(**load_sdxl_config(name))
            return CLIPTextConfig.from_pretrained(base_model, subfolder=name)
        if base_model is None:
            return load_sdxl_config(name)
        return SDXL_COMPONENT_CLASSES[name].load_config(base_model, subfolder=name)
    except _HUB_ERRORS as err:
        raise _hub_hint(base_model, err) from err


def build_empty_component(name: str, base_model: str | None = None, config=None):
    """A component with its parameters on the meta device (no memory), from ``config`` if given, else from
    ``base_model`` (a Diffusers folder or Hub id) or, by default, the bundled SDXL base configs."""
    config = load_component_config(name, base_model) if config is None else config
    cls = SDXL_COMPONENT_CLASSES[name]
    with init_empty_weights():
        return cls(config) if name.startswith("text_encoder") else cls.from_config(config)


def assign_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load ``state_dict`` into ``module`` (built by :func:`build_empty_component`); every key must match."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ExportError(
            f"{what}: the weights do not fit the architecture (missing: {_few(missing)}; unexpected: "
            f"{_few(unexpected)}); pass the matching --base-model."
        )
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatch
        raise ExportError(f"{what}: {str(err).splitlines()[-1].strip()}; pass the matching --base-model.") from err
    return module.eval()


def _few(keys: list[str]) -> str:
    return (", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")) or "none"


def _model_index(path_or_id: str) -> dict:
    with open(resolve_file(path_or_id, "model_index.json"), encoding="utf-8") as f:
        return json.load(f)


def _local_variant(folder: str, variant: str | None) -> str | None:
    """The variant to load from a local Diffusers model folder: the requested one, else the only one saved."""
    if variant is not None or not os.path.isdir(folder):
        return variant
    names = set(os.listdir(folder))
    if names & _PLAIN_WEIGHTS:
        return None
    found = {m.group(1) for name in names if (m := _VARIANT_WEIGHTS.fullmatch(name))}
    return found.pop() if len(found) == 1 else None


def _from_pretrained(name: str, path_or_id: str, subfolder: str | None, torch_dtype, variant: str | None):
    cls = SDXL_COMPONENT_CLASSES[name]
    variant = _local_variant(os.path.join(path_or_id, subfolder or ""), variant)
    dtype_kwarg = {"dtype": torch_dtype} if name.startswith("text_encoder") else {"torch_dtype": torch_dtype}
    try:
        return cls.from_pretrained(path_or_id, subfolder=subfolder, variant=variant, **dtype_kwarg).eval()
    except _HUB_ERRORS as err:
        if os.path.isdir(path_or_id):
            raise ExportError(f"could not load {name} from {path_or_id!r}: {err}") from err
        raise _hub_hint(path_or_id, err) from err


def load_pipeline_components(
    path_or_id: str, torch_dtype: torch.dtype | None = None, variant: str | None = None
) -> dict:
    """UNet, VAE and text encoder(s) of a Diffusers SDXL or SD1.x/2.x pipeline (local folder or Hub id); tokenizers
    and the scheduler are not loaded. Raises :class:`ExportError` for any other pipeline."""
    index = _model_index(path_or_id)
    names = [name for name in SDXL_COMPONENT_CLASSES if name != "text_encoder_2" or name in index]
    missing = [name for name in names if name not in index]
    if missing:
        raise ExportError(
            f"{path_or_id!r} is not an SDXL or SD1.x/2.x pipeline: its model_index.json ({index.get('_class_name')}) "
            f"has no {missing}. Those have a UNet, a VAE and a text encoder (SDXL a second one, text_encoder_2)."
        )
    _check_unet(load_component_config("unet", path_or_id), path_or_id)
    return {name: _from_pretrained(name, path_or_id, name, torch_dtype, variant) for name in names}


def _check_unet(config, source: str) -> None:
    try:
        check_unet_config(config)
    except ValueError as err:
        raise ExportError(f"{source!r}: {err} Only SDXL and SD1.x/2.x-layout models can be exported.") from err


def load_generator_unet(
    path_or_id: str,
    base_model: str | None = None,
    subfolder: str | None = None,
    weight_name: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> UNet2DConditionModel:
    """A one-step generator's UNet from any published layout, as a Diffusers ``UNet2DConditionModel``.

    ``path_or_id`` may be
    * a weights file: DMD2's pickled ``.bin`` state dict (read with ``torch.load(weights_only=True)``), a Diffusers
      UNet ``.safetensors`` (e.g. ``unet/diffusion_pytorch_model.fp16.safetensors``), a UNet-only or full
      single-file checkpoint (``model.diffusion_model.*``);
    * a Diffusers UNet folder or pipeline folder (its ``unet`` subfolder), with ``variant`` picked automatically when
      only one variant is saved;
    * a Hub id: with ``weight_name`` one file is downloaded (``hf_hub_download``), else ``from_pretrained`` loads the
      ``subfolder`` (default ``"unet"``).
    * a trainer's LoRA run folder (``pytorch_lora_weights.safetensors`` and ``training_args.json``): the LoRA fused
      into the UNet it was trained on (its ``--pretrained_generator``, else the base model's).

    A bare weights file takes its architecture from ``base_model`` (a Diffusers folder or Hub id) if given, else from
    a ``config.json`` beside it, else from the bundled SDXL base config (right for DMD2's files).
    """
    if (run := lora_run(path_or_id)) is not None:
        return _fused_lora_run(path_or_id, run, torch_dtype, variant)
    if weight_name is not None:
        path_or_id = resolve_file(path_or_id, weight_name, subfolder)
    if os.path.isfile(path_or_id):
        return _unet_from_file(path_or_id, base_model, torch_dtype)
    unet = _from_pretrained("unet", *_unet_location(path_or_id, subfolder), torch_dtype, variant)
    _check_unet(unet.config, path_or_id)
    return unet


def _fused_lora_run(folder: str, run: dict, torch_dtype, variant) -> UNet2DConditionModel:
    """A trainer's LoRA run as one UNet: its generator init (or base UNet) with the LoRA fused in."""
    base = run["pretrained_model_name_or_path"]
    init = run.get("pretrained_generator") or base
    unet = load_generator_unet(init, base, weight_name=run.get("pretrained_generator_weight_name"), variant=variant)
    unet.load_lora_adapter(folder, weight_name=LORA_RUN_FILES[0], prefix="unet", adapter_name="di_star")
    unet.fuse_lora()
    unet.unload_lora()
    return unet.to(torch_dtype) if torch_dtype is not None else unet


def _unet_location(path_or_id: str, subfolder: str | None) -> tuple[str, str | None]:
    """(folder or Hub id, subfolder) where ``from_pretrained`` finds the UNet."""
    if not os.path.isdir(path_or_id):  # Hub: a pipeline's "unet" by default, "" for a UNet at the repo root
        return path_or_id, "unet" if subfolder is None else subfolder or None
    folder = os.path.join(path_or_id, subfolder or "")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        if "unet" not in (index := _model_index(folder)):
            raise ExportError(
                f"{folder!r} is a {index.get('_class_name')} folder without a UNet: only SDXL and SD1.x/2.x "
                f"generators export (docs/export.md says what ComfyUI reads of SD3 as it is)."
            )
        return folder, "unet"
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, None
    raise ExportError(f"{folder!r} has neither model_index.json nor config.json; pass the weights file itself.")


def _unet_from_file(path: str, base_model: str | None, torch_dtype: torch.dtype | None) -> UNet2DConditionModel:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    use_beside = base_model is None and os.path.isfile(beside)
    config = UNet2DConditionModel.load_config(beside) if use_beside else None
    unet = build_empty_component("unet", base_model, config=config)
    _check_unet(unet.config, path)
    state_dict = load_state_dict_file(path)
    state_dict.pop(V_PRED_KEY, None)  # a marker, not a weight (the prediction type lives in a scheduler config)
    kind = checkpoint_kind(state_dict)
    if kind == "unet-original" and not any(k.startswith(UNET_PREFIX) for k in state_dict):
        state_dict = {UNET_PREFIX + k: v for k, v in state_dict.items()}
    if kind in ("unet-original", "sdxl-checkpoint"):
        try:
            state_dict = unet_from_original(state_dict, unet.config)
        except ValueError as err:
            raise ExportError(f"{path!r}: {err}") from err
    elif kind != "unet-diffusers":
        raise ExportError(f"{path!r} holds no UNet weights (it looks like: {kind}).")
    return assign_weights(unet, cast_floating(state_dict, torch_dtype), path)
