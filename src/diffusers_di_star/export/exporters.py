"""The five export formats of ``di-star export``, one function each, and :func:`export_model` to pick one by name.

Every exporter refuses to replace an existing output unless ``overwrite=True`` (checked before any loading) and
writes atomically (:func:`.files.atomic_write`): a failed export leaves nothing behind.
"""

from __future__ import annotations

import collections
import inspect
import os

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from .. import __version__
from ..one_step import DEFAULT_CONDITIONING_TIMESTEP, check_conditioning_timestep
from ..sources import lora_run
from .files import (
    ExportError,
    atomic_write,
    cast_floating,
    check_output_free,
    load_state_dict_file,
    read_keys,
    read_metadata,
    resolve_dtype,
    save_safetensors,
)
from .loading import (
    SDXL_BASE_MODEL_ID,
    checkpoint_kind,
    load_component_config,
    load_generator_unet,
    load_pipeline_components,
    resolve_file,
)
from .lora import (
    diffusers_lora_to_peft,
    kohya_lora_to_peft,
    lora_config_from_metadata,
    lora_metadata,
    peft_lora_to_kohya,
    peft_lora_with_alphas,
)
from .original_keys import UNET_PREFIX, V_PRED_KEY, unet_version
from .single_file import checkpoint_state_dict, components_from_checkpoint, unet_checkpoint_state_dict

__all__ = [
    "FORMATS",
    "export_comfyui_checkpoint",
    "export_comfyui_lora",
    "export_comfyui_unet",
    "export_kohya_lora",
    "export_diffusers",
    "export_model",
]

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
#: ``export_comfyui_unet(unet_keys=...)``: the key prefix of each UNet-only layout.
UNET_KEY_LAYOUTS = {"comfyui": "", "single-file": UNET_PREFIX}
#: ``scheduler.config.prediction_type`` -> SAI ModelSpec's ``modelspec.prediction_type``: what a single file can say.
_MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}
#: :func:`.original_keys.unet_version` -> kohya's ``ss_base_model_version``.
_KOHYA_BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2", "sd1": "sd_v1"}


def _architecture(unet_config, prediction_type: str) -> str:
    """SAI ModelSpec's ``modelspec.architecture`` of a UNet (SD2.x: the 768-v or the 512 epsilon model)."""
    version = unet_version(unet_config)
    if version == "sd2":
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return {"sdxl": "stable-diffusion-xl-v1-base", "sd1": "stable-diffusion-v1"}[version]


def _model_metadata(out_path, source, conditioning_timestep: int, architecture: str) -> dict:
    # SAI ModelSpec fields (read by A1111/Forge and kohya tools), DI*'s t*, and the Hub id the weights came from
    # (never a local path: it would leak the user's folder names into a file they share).
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": os.path.splitext(os.path.basename(os.fspath(out_path)))[0],
        "modelspec.prediction_type": "epsilon",
        "di_star.conditioning_timestep": str(conditioning_timestep),
        "di_star.exporter": f"diffusers-di-star {__version__}",
    }
    if isinstance(source, str) and not os.path.exists(source):
        metadata["di_star.source"] = source
    return metadata


def _prediction_type(model, prediction_type: str | None) -> str:
    """``prediction_type``, else the scheduler's of a pipeline (object, dict or folder / Hub id, a LoRA run's base
    model), else "epsilon": a UNet alone (a DMD2 ``.bin``, a UNet folder) does not record it, so pass
    ``prediction_type`` for a v one."""
    if prediction_type is None:
        scheduler = model.get("scheduler") if isinstance(model, dict) else getattr(model, "scheduler", None)
        if scheduler is not None:
            prediction_type = scheduler.config.prediction_type
        elif isinstance(model, (str, os.PathLike)) and not os.path.isfile(model):
            run = lora_run(os.fspath(model))
            folder = os.fspath(model) if run is None else run["pretrained_model_name_or_path"]
            try:
                prediction_type = DDPMScheduler.load_config(folder, subfolder="scheduler")["prediction_type"]
            except (OSError, ValueError, KeyError):
                prediction_type = "epsilon"
        else:
            prediction_type = "epsilon"
    if prediction_type not in _MODELSPEC_PREDICTION_TYPES:
        raise ExportError(
            f"prediction type {prediction_type!r}: a single file can say {sorted(_MODELSPEC_PREDICTION_TYPES)}."
        )
    return prediction_type


def _mark_prediction_type(state_dict: dict, metadata: dict, prediction_type: str) -> None:
    # ComfyUI reads v-prediction of SDXL from the V_PRED_KEY marker (of SD2.x from the weights, docs/export.md);
    # A1111/Forge and kohya from the ModelSpec field.
    metadata["modelspec.prediction_type"] = _MODELSPEC_PREDICTION_TYPES[prediction_type]
    if prediction_type == "v_prediction":
        state_dict[V_PRED_KEY] = torch.tensor([])


def _check_timestep(conditioning_timestep) -> None:
    # Checked before any loading; every exported family (SDXL, SD1.x/2.x) has 1000 training timesteps, the bound.
    try:
        check_conditioning_timestep(conditioning_timestep)
    except ValueError as err:
        raise ExportError(f"{err} (--conditioning-timestep)") from err


def _pipeline_components(model, torch_dtype, variant):
    if isinstance(model, (str, os.PathLike)):
        return load_pipeline_components(os.fspath(model), torch_dtype, variant)
    get = model.get if isinstance(model, dict) else lambda name: getattr(model, name, None)
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if get("text_encoder_2") is not None else ())
    components = {name: get(name) for name in names}
    missing = [name for name, component in components.items() if component is None]
    if missing:
        raise ExportError(f"{type(model).__name__} is not an SDXL or SD1.x/2.x pipeline: it has no {missing}.")
    return components


def export_comfyui_checkpoint(
    model,
    out_path: str | os.PathLike,
    dtype: str | torch.dtype = "fp16",
    *,
    variant: str | None = None,
    conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    prediction_type: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a full single-file checkpoint (ComfyUI "Load Checkpoint", A1111/Forge ``models/Stable-diffusion``).

    ``model``: a Diffusers SDXL or SD1.x/2.x pipeline folder or Hub id, a pipeline object, or a dict of its
    components. Returns the absolute path of the ``.safetensors`` file written. A v-prediction model
    (``prediction_type``, default the scheduler's) gets the ``v_pred`` marker (ComfyUI's, for SDXL) and
    ``modelspec.prediction_type = "v"``.
    """
    check_output_free(out_path, overwrite)
    _check_timestep(conditioning_timestep)
    prediction_type = _prediction_type(model, prediction_type)
    torch_dtype = resolve_dtype(dtype)
    components = _pipeline_components(model, torch_dtype, variant)
    state_dict = cast_floating(checkpoint_state_dict(components), torch_dtype)
    unet, vae = components["unet"], components["vae"]
    architecture = _architecture(unet.config, prediction_type)
    metadata = _model_metadata(out_path, model, conditioning_timestep, architecture)
    if unet.config.sample_size is not None:  # a config built in code may leave it unset
        side = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        metadata["modelspec.resolution"] = f"{side}x{side}"
    _mark_prediction_type(state_dict, metadata, prediction_type)
    return save_safetensors(state_dict, out_path, metadata, overwrite)


def export_comfyui_unet(
    model,
    out_path: str | os.PathLike,
    dtype: str | torch.dtype = "fp16",
    *,
    base_model: str | None = None,
    subfolder: str | None = None,
    weight_name: str | None = None,
    variant: str | None = None,
    conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    unet_keys: str = "comfyui",
    prediction_type: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write the UNet alone (ComfyUI "Load Diffusion Model" / "UNETLoader", ``models/unet``).

    ``model``: anything :func:`.loading.load_generator_unet` reads (a pipeline or UNet folder or Hub id, a DMD2
    ``.bin``, a UNet safetensors, a single file), a ``UNet2DConditionModel`` or a pipeline object. ``unet_keys``
    (:data:`UNET_KEY_LAYOUTS`): ``"comfyui"`` writes bare sgm names (``input_blocks.0.0.weight``), which every
    ComfyUI UNet loader reads (the old ``load_unet_state_dict`` accepts only these or Diffusers names; the newer
    ``load_diffusion_model_state_dict`` strips a ``model.diffusion_model.`` prefix if there is one);
    ``"single-file"`` keeps the ``model.diffusion_model.`` prefix, which Diffusers'
    ``UNet2DConditionModel.from_single_file`` needs and only the newer ComfyUI loader reads. ``prediction_type``
    (default: the scheduler's when ``model`` is a pipeline, else ``"epsilon"``) is marked as in
    :func:`export_comfyui_checkpoint`.
    """
    check_output_free(out_path, overwrite)
    _check_timestep(conditioning_timestep)
    prediction_type = _prediction_type(model, prediction_type)
    if unet_keys not in UNET_KEY_LAYOUTS:
        raise ExportError(
            f"unknown UNet key layout {unet_keys!r} (--unet-keys): use 'comfyui' (any ComfyUI version) or "
            f"'single-file' (Diffusers from_single_file, ComfyUI with load_diffusion_model_state_dict)."
        )
    torch_dtype = resolve_dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        unet = load_generator_unet(os.fspath(model), base_model, subfolder, weight_name, torch_dtype, variant)
    else:
        unet = getattr(model, "unet", model)
    state_dict = cast_floating(unet_checkpoint_state_dict(unet), torch_dtype)
    if unet_keys == "comfyui":
        state_dict = {key.removeprefix(UNET_PREFIX): value for key, value in state_dict.items()}
    architecture = _architecture(unet.config, prediction_type)
    metadata = _model_metadata(out_path, model, conditioning_timestep, architecture) | {"di_star.component": "unet"}
    _mark_prediction_type(state_dict, metadata, prediction_type)
    return save_safetensors(state_dict, out_path, metadata, overwrite)


def _lora_file(lora: str, weight_name: str | None) -> str:
    if os.path.isfile(lora):
        return lora
    return resolve_file(lora, weight_name or DIFFUSERS_LORA_NAME)


def _lora_config(path: str, lora_alpha: float | None, component: str = "unet") -> dict:
    """The adapter's ``LoraConfig`` fields from the file's metadata, with ``lora_alpha`` filled in or checked."""
    config = lora_config_from_metadata(read_metadata(path), component)
    stored = config.get("lora_alpha")
    if stored is None and lora_alpha is None:
        raise ExportError(
            f"{path!r} has no lora_alpha in its metadata, and the exported file needs it (the LoRA's scale is "
            f"lora_alpha / r). Pass the value used in training: --lora-alpha A (in Python: lora_alpha=A). Save "
            f"LoRAs with save_lora_weights(..., {component}_lora_adapter_metadata="
            f"{component}.peft_config[name].to_dict())."
        )
    if stored is not None and lora_alpha is not None and float(stored) != float(lora_alpha):
        raise ExportError(f"{path!r} says lora_alpha={stored}, but lora_alpha={lora_alpha} was passed; drop the flag.")
    return config if stored is not None else {**config, "lora_alpha": lora_alpha}


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def export_kohya_lora(
    lora: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str | torch.dtype = "fp16",
    *,
    base_model: str | None = None,
    weight_name: str | None = None,
    lora_alpha: float | None = None,
    conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    overwrite: bool = False,
) -> str:
    """Convert a UNet LoRA file to kohya keys with the true alpha (ComfyUI "LoraLoader", A1111/Forge).

    ``lora``: a LoRA file in any layout Diffusers' ``load_lora_weights`` reads — PEFT keys (``lora_A``/``lora_B``),
    the ``save_lora_weights`` layout of our trainer and Diffusers' training scripts (``lora.down``/``lora.up``), the
    old attention-processor layout, or kohya keys — or a folder or Hub repo holding
    ``pytorch_lora_weights.safetensors`` (``weight_name`` picks another file). ``lora_alpha`` is needed only when a
    non-kohya file's metadata lacks it. ``base_model`` gives the UNet architecture (default: a trainer's run folder's
    base model, else SDXL base); SD1.x/2.x LoRAs get kohya's Diffusers-path names, SDXL ones its sgm names.
    """
    check_output_free(out_path, overwrite)
    _check_timestep(conditioning_timestep)
    if base_model is None and (run := lora_run(os.fspath(lora))) is not None:
        base_model = run["pretrained_model_name_or_path"]
    path = _lora_file(os.fspath(lora), weight_name)
    state_dict = load_state_dict_file(path)
    kind = checkpoint_kind(state_dict)
    unet_config = load_component_config("unet", base_model)
    try:
        if kind == "kohya-lora":  # already kohya: re-written with each module's alpha, in the requested dtype
            if lora_alpha is not None:
                raise ExportError(f"{path!r} is a kohya LoRA with its alphas inside; drop --lora-alpha.")
            state_dict, config = kohya_lora_to_peft(state_dict, unet_config)
        elif kind in ("peft-lora", "diffusers-lora"):
            state_dict, config = diffusers_lora_to_peft(state_dict), _lora_config(path, lora_alpha)
        else:
            raise ExportError(
                f"{path!r} is not a LoRA in a layout Diffusers' load_lora_weights reads (PEFT lora_A/lora_B, "
                f"Diffusers lora.down/lora.up or kohya lora_unet_ keys); found {kind}."
            )
        kohya = peft_lora_to_kohya(cast_floating(state_dict, resolve_dtype(dtype)), unet_config, config)
    except ValueError as err:
        raise ExportError(f"{path!r}: {err}") from err
    prediction_type = _prediction_type(base_model, None) if base_model is not None else "epsilon"
    architecture = _architecture(unet_config, prediction_type)
    metadata = _model_metadata(out_path, os.fspath(lora), conditioning_timestep, f"{architecture}/lora")
    metadata |= {  # kohya's own summary fields (shown by A1111/Forge): the most common rank and alpha in the file
        "modelspec.prediction_type": _MODELSPEC_PREDICTION_TYPES[prediction_type],
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight"))),
        "ss_network_alpha": str(_most_common(v.item() for k, v in kohya.items() if k.endswith(".alpha"))),
        "ss_base_model_version": _KOHYA_BASE_MODEL_VERSIONS[unet_version(unet_config)],
    }
    return save_safetensors(kohya, out_path, metadata, overwrite)


def export_comfyui_lora(
    lora: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str | torch.dtype = "fp16",
    *,
    weight_name: str | None = None,
    lora_alpha: float | None = None,
    overwrite: bool = False,
) -> str:
    """An SD3 / SD3.5 or FLUX.1 LoRA for ComfyUI's "Load LoRA" at strength 1.0: Diffusers' keys
    (``transformer.<module>.lora_A.weight``) with each module's true alpha as ``transformer.<module>.alpha``.

    ComfyUI reads a run's ``pytorch_lora_weights.safetensors`` as it is but applies it at scale 1, ignoring the
    ``lora_alpha`` in its metadata (:func:`.lora.peft_lora_with_alphas`); this file carries the alphas. ``lora``: that
    file, or a folder or Hub repo holding it (``weight_name`` picks another file); PEFT keys or the earlier mixed
    ``lora.down`` layout. A UNet LoRA is refused: ``export_kohya_lora`` writes its alphas.
    """
    check_output_free(out_path, overwrite)
    path = _lora_file(os.fspath(lora), weight_name)
    state_dict = load_state_dict_file(path)
    if checkpoint_kind(state_dict) == "kohya-lora" or any(key.startswith("unet.") for key in state_dict):
        raise ExportError(f"{path!r} is a UNet LoRA; --format kohya-lora writes it with its alphas for ComfyUI.")
    if not state_dict or not all(key.startswith("transformer.") for key in state_dict):
        raise ExportError(
            f"{path!r} is not an SD3 / FLUX.1 LoRA (transformer.<module>.lora_A/lora_B keys, as the trainer and "
            f"Diffusers' SD3 / FLUX scripts save them); found keys like {sorted(state_dict)[:2]}."
        )
    config = _lora_config(path, lora_alpha, "transformer")
    state_dict = cast_floating(diffusers_lora_to_peft(state_dict), resolve_dtype(dtype))
    return save_safetensors(peft_lora_with_alphas(state_dict, config), out_path, {}, overwrite)


def _single_file(model: str, weight_name: str | None) -> str:
    if weight_name is not None:
        return resolve_file(model, weight_name)
    if os.path.isfile(model):
        return model
    raise ExportError(
        f"--format diffusers converts a single weights file (a single-file checkpoint, a UNet file or a kohya "
        f"LoRA); {model!r} is not a file (a Diffusers folder or repo is already in Diffusers format)."
    )


def _save_pipeline(path: str, base_model: str | None, torch_dtype, out_path, overwrite: bool) -> str:
    checkpoint = load_state_dict_file(path)
    sdxl = checkpoint_kind(checkpoint) == "sdxl-checkpoint"
    if not sdxl and base_model is None:
        raise ExportError(
            f"{path!r} is an SD1.x/2.x single file: pass --base-model with the Diffusers SD folder or Hub id it was "
            f"exported from (its architecture, tokenizer and scheduler are not in the file)."
        )
    components = components_from_checkpoint(checkpoint, base_model, torch_dtype)
    source = base_model or SDXL_BASE_MODEL_ID  # tokenizers and scheduler are not in a single file
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipe = pipeline_class.from_pretrained(source, **components, **extra)
    except (OSError, ValueError) as err:
        raise ExportError(
            f"could not load the tokenizers and scheduler from {source!r} ({err}); pass --base-model with a local "
            f"Diffusers {'SDXL' if sdxl else 'SD'} folder."
        ) from err
    if V_PRED_KEY in checkpoint:
        pipe.scheduler.register_to_config(prediction_type="v_prediction")
    return atomic_write(out_path, pipe.save_pretrained, overwrite, is_dir=True)


def _save_peft_lora(path: str, base_model: str | None, torch_dtype, out_path, overwrite: bool) -> str:
    state_dict, config = kohya_lora_to_peft(load_state_dict_file(path), load_component_config("unet", base_model))
    state_dict = {k: v.contiguous() for k, v in cast_floating(state_dict, torch_dtype).items()}
    metadata = {"format": "pt", **lora_metadata(config)}

    def write(folder: str) -> None:
        save_file(state_dict, os.path.join(folder, DIFFUSERS_LORA_NAME), metadata=metadata)

    return atomic_write(out_path, write, overwrite, is_dir=True)


def export_diffusers(
    model: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    *,
    base_model: str | None = None,
    weight_name: str | None = None,
    overwrite: bool = False,
) -> str:
    """Convert a single weights file back to Diffusers, into the folder ``out_path``:

    * a full single-file checkpoint -> a pipeline folder (tokenizers and scheduler from ``base_model``, default
      SDXL base; an SD1.x/2.x file needs it);
    * a UNet file (single-file UNet, Diffusers UNet safetensors, DMD2 ``.bin``) -> a UNet folder;
    * a kohya LoRA -> ``pytorch_lora_weights.safetensors`` with its ``LoraConfig`` (alpha included) in the metadata.

    ``dtype=None`` keeps the stored dtypes.
    """
    check_output_free(out_path, overwrite)
    torch_dtype = resolve_dtype(dtype)
    path = _single_file(os.fspath(model), weight_name)
    kind = checkpoint_kind(read_keys(path))
    if kind in ("sdxl-checkpoint", "sd-checkpoint"):
        return _save_pipeline(path, base_model, torch_dtype, out_path, overwrite)
    if kind == "kohya-lora":
        return _save_peft_lora(path, base_model, torch_dtype, out_path, overwrite)
    if kind in ("unet-original", "unet-diffusers"):
        unet = load_generator_unet(path, base_model, torch_dtype=torch_dtype)
        return atomic_write(out_path, unet.save_pretrained, overwrite, is_dir=True)
    raise ExportError(f"{path!r} is not a single-file checkpoint, a UNet or a kohya LoRA (found {kind}).")


#: ``--format`` name -> exporter.
FORMATS = {
    "comfyui-checkpoint": export_comfyui_checkpoint,
    "comfyui-unet": export_comfyui_unet,
    "kohya-lora": export_kohya_lora,
    "comfyui-lora": export_comfyui_lora,
    "diffusers": export_diffusers,
}


def export_model(model, format: str, out_path: str | os.PathLike, **options) -> str:
    """Run the exporter of ``format`` (a key of :data:`FORMATS`); options left at ``None`` take its defaults.

    An option the format does not use is an error rather than silently ignored.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; use one of {sorted(FORMATS)}.")
    exporter = FORMATS[format]
    options = {name: value for name, value in options.items() if value is not None}
    unused = sorted(set(options) - set(inspect.signature(exporter).parameters))
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise ExportError(f"{flags} does not apply to --format {format}.")
    takes_timestep = "conditioning_timestep" in inspect.signature(exporter).parameters
    if takes_timestep and "conditioning_timestep" not in options and isinstance(model, str | os.PathLike):
        if (run := lora_run(os.fspath(model))) is not None and run.get("conditioning_timestep") is not None:
            options["conditioning_timestep"] = run["conditioning_timestep"]  # a LoRA run's own t*
    return exporter(model, out_path, **options)
