"""Where and in what precision to run, and loading a pipeline with an error a user can act on.

Shared by the ``di-star`` commands, evaluation and the benchmarks.
"""

from __future__ import annotations

import torch

from .errors import DIStarError
from .sources import load_failure, local_path_problem

__all__ = ["DTYPES", "ModelLoadError", "default_device", "default_dtype", "load_pipeline"]

#: The dtype names the command line and the export functions accept.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(DIStarError):
    """A model that cannot be found or read; the message says what to download or which path to pass."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp16 on CUDA (the released checkpoints' variant), fp32 elsewhere."""
    return "fp16" if device.startswith("cuda") else "fp32"


def load_pipeline(model: str, dtype: str = "fp32", device: str | None = None, variant: str | None = None):
    """The one-step pipeline of ``model``'s family (``DIStarSDXLPipeline``, ``DIStarSDPipeline``; picked from its
    ``model_index.json``) on ``device``; a missing model or an unknown layout raises :class:`ModelLoadError`."""
    from .families import detect_family

    what = "a Diffusers pipeline folder (with model_index.json)"
    if problem := local_path_problem("--model", model, what):
        raise ModelLoadError(problem)
    try:
        pipeline_class = detect_family(model).pipeline_class()
        pipe = pipeline_class.from_pretrained(model, dtype=DTYPES[dtype], variant=variant)
    except (OSError, ValueError) as err:
        raise ModelLoadError(load_failure("--model", model, err, what)) from err
    # diffusers warns once per module that fp16 "cannot run" on a CPU and "will fail"; with torch 2.13 it runs (tested
    # by test_cli: generate --dtype fp16 --device cpu), so the four identical lines would only mislead.
    return pipe.to(device or default_device(), silence_dtype_warnings=True)
