"""Finding and safely loading reward checkpoints: Hub ids or local paths, safetensors or ``weights_only`` pickles."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

__all__ = ["build_pretrained", "load_state_dict_file", "resolve_checkpoint_file"]


def resolve_checkpoint_file(location: str | os.PathLike, filename: str) -> str:
    """A local file, ``filename`` inside a local folder, or ``filename`` downloaded from the Hub repo ``location``."""
    location = os.fspath(location)
    if os.path.isfile(location):
        return location
    if os.path.isdir(location):
        path = os.path.join(location, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{location!r} is a folder without {filename!r}: pass the file itself or its folder."
            )
        return path
    return hf_hub_download(repo_id=location, filename=filename)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors by name from a ``.safetensors`` file or a plain pickled state dict, never running pickled code.

    Pickles go through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
    A training checkpoint that wraps the weights as ``{"state_dict": {...}, ...}`` (HPSv2's) is unwrapped.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"{path!r} is not a plain state dict: it pickles Python objects that torch.load(weights_only=True) "
            f"refuses to run ({reason}). Load it only if you trust it, and re-save its tensors with safetensors."
        ) from error
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()
    ):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict (names -> tensors).")
    return dict(checkpoint)


def build_pretrained(model_class, config, state_dict: Mapping[str, torch.Tensor], **model_kwargs):
    """``model_class(config, **model_kwargs)`` with exactly ``state_dict``'s weights; a missing or extra name fails.

    transformers' ``from_pretrained(None, state_dict=...)`` skips random initialisation but silently re-initialises
    missing weights, so the names are checked first against the model built on the meta device.
    """
    with torch.device("meta"):
        expected = set(model_class(config, **model_kwargs).state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The converted checkpoint does not fit {model_class.__name__}: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all). "
            "Check that the checkpoint and the configuration describe the same architecture."
        )
    return model_class.from_pretrained(None, config=config, state_dict=dict(state_dict), **model_kwargs)
