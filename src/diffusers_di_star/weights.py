"""Loading weight files safely: safetensors, or a pickled state dict through ``torch.load(weights_only=True)``.

The one place the package reads ``.bin``/``.pt``/``.pth``/``.ckpt`` files (DMD2's UNet, HPSv2, the aesthetic head,
ImageReward). Nothing here ever unpickles code.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .defaults import DTYPE_NAMES
from .errors import DIStarError, first_line

__all__ = ["DTYPES", "CheckpointError", "PICKLE_SUFFIXES", "damaged_safetensors", "load_state_dict_file"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

#: The dtype names the command line and the export functions accept (:data:`~diffusers_di_star.defaults.DTYPE_NAMES`).
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))


class CheckpointError(DIStarError, ValueError):
    """A weights file that cannot or must not be loaded; the message names the file and says what to do."""


def damaged_safetensors(path: str, error: BaseException) -> CheckpointError:
    """The one line for a ``.safetensors`` file that cannot be read (truncated, damaged, or another format)."""
    return CheckpointError(
        f"{path!r} is damaged or not a safetensors file ({first_line(error)}); download or export it again."
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors by name from a ``.safetensors`` file or a plain pickled state dict, on the CPU.

    A pickle that holds anything but tensors and plain containers (a class, a function: code that would run on
    loading) is refused with :class:`CheckpointError`. ``{"state_dict": {...}, ...}`` wrappers (``.ckpt``, HPSv2's
    training checkpoints) are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no such weights file: {path!r}.")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:  # truncated, damaged, or not safetensors at all
            raise damaged_safetensors(path, err) from None
    if not path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path!r}: unknown weights format; expected .safetensors or one of {PICKLE_SUFFIXES}.")
    try:
        # mmap: a 10 GB fp32 UNet is paged in as it is used instead of read whole (zip-format pickles only)
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path!r}: it is not a plain state dict but a pickle of Python objects, and "
            f"unpickling them could run arbitrary code (torch.load(weights_only=True) said: "
            f"{first_line(err, limit=None)}). Convert it to .safetensors in an environment you trust, or ask its "
            f"author for a safetensors file."
        ) from err
    while isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise CheckpointError(f"{path!r} is not a state dict (a flat mapping of names to tensors).")
    return dict(state_dict)
