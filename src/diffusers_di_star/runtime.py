"""Where and in what precision to run, and loading a pipeline with an error a user can act on.

Shared by the ``di-star`` commands, evaluation and the benchmarks.
"""

from __future__ import annotations

import torch

from .errors import ModelLoadError
from .export import load_generator_unet
from .families import detect_family
from .sources import load_failure, local_path_problem, lora_run
from .weights import DTYPES

__all__ = ["default_device", "default_dtype", "load_pipeline"]



def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp16 on CUDA (the released checkpoints' variant), fp32 elsewhere."""
    return "fp16" if device.startswith("cuda") else "fp32"


def load_pipeline(model: str, dtype: str = "fp32", device: str | None = None, variant: str | None = None):
    """The one-step pipeline of ``model``'s family (``DIStarSDXLPipeline``, ``DIStarSDPipeline``; picked from its
    ``model_index.json``) on ``device``; a missing model or an unknown layout raises :class:`ModelLoadError`."""
    what = "a Diffusers pipeline folder (with model_index.json) or a trained LoRA run folder"
    if problem := local_path_problem("--model", model, what):
        raise ModelLoadError(problem)
    run = lora_run(model)  # a trainer's LoRA run: its LoRA on the base model (and generator init) it was trained on
    source, options = model, {}
    if run is not None:
        source, options["conditioning_timestep"] = run["pretrained_model_name_or_path"], run["conditioning_timestep"]
        if run.get("pretrained_generator"):
            options["unet"] = load_generator_unet(
                run["pretrained_generator"],
                base_model=source,
                weight_name=run.get("pretrained_generator_weight_name"),
                torch_dtype=DTYPES[dtype],
            )
    try:
        pipeline_class = detect_family(source).pipeline_class()
        pipe = pipeline_class.from_pretrained(source, dtype=DTYPES[dtype], variant=variant, **options)
        if run is not None:
            pipe.load_lora_weights(model)
    except (OSError, ValueError) as err:
        flag = "--model" if run is None else f"--model {model!r}: its base model"
        raise ModelLoadError(load_failure(flag, source, err, what)) from err
    # diffusers warns once per module that fp16 "cannot run" on a CPU and "will fail"; with torch 2.13 it runs (tested
    # by test_cli: generate --dtype fp16 --device cpu), so the four identical lines would only mislead.
    return pipe.to(device or default_device(), silence_dtype_warnings=True)
