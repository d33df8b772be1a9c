"""Finding reward checkpoints (Hub ids or local paths) and building models from converted state dicts."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from huggingface_hub import hf_hub_download

__all__ = ["build_pretrained", "resolve_checkpoint_file"]


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
