"""Reading and writing weight files safely: safetensors or ``torch.load(weights_only=True)`` in, atomic writes out.

Every problem a user can fix (an existing output, a full disk, a pickle that carries code, ...) is raised as
:class:`ExportError` with a message that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DIStarError, is_disk_full
from ..weights import DTYPES, damaged_safetensors, load_state_dict_file

__all__ = [
    "ExportError",
    "resolve_dtype",
    "cast_floating",
    "check_output_free",
    "atomic_write",
    "save_safetensors",
    "load_state_dict_file",
    "read_metadata",
    "read_keys",
]


class ExportError(DIStarError):
    """A problem with the user's input or output that they can fix; the message says how."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` or a ``torch.dtype`` -> ``torch.dtype`` (``None`` keeps the stored dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def cast_floating(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast the floating-point tensors to ``dtype`` (integer tensors such as ``position_ids`` keep theirs)."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def check_output_free(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an existing file or folder unless ``overwrite`` is set (checked before any heavy work)."""
    if os.path.lexists(path) and not overwrite:
        raise ExportError(f"{os.fspath(path)!r} already exists; pass --overwrite (overwrite=True) to replace it.")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool, is_dir: bool = False) -> str:
    """Run ``write(tmp)`` on a temporary file (or folder) next to ``path``, then move it into place.

    The move is an ``os.replace`` on the same file system, so readers never see a half-written file, and a failure
    while writing (full disk, no permission) leaves neither a partial output nor a temporary file behind; an existing
    output is only replaced once the new one is complete.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_free(path, overwrite)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = _temporary_sibling(path, is_dir)
    except OSError as err:
        raise ExportError(
            f"cannot write to the folder {parent!r}: {err}. Check that it exists and is writable."
        ) from err
    try:
        write(tmp)
        _move_into_place(tmp, path)
    except (OSError, SafetensorError) as err:
        _remove(tmp)
        kept = "is unchanged" if os.path.lexists(path) else "was not created"
        if is_disk_full(err):
            raise ExportError(
                f"disk full at {parent}: nothing was written ({path!r} {kept}); free space or pass another --out."
            ) from None
        raise ExportError(f"writing {path!r} failed: {err}. Nothing was written; choose another --out.") from err
    except BaseException:
        _remove(tmp)
        raise
    return path


def _temporary_sibling(path: str, is_dir: bool) -> str:
    prefix = f".{os.path.basename(path)}."
    if is_dir:
        return tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    return tmp


def _move_into_place(tmp: str, path: str) -> None:
    umask = os.umask(0)  # temporary files are private (0600/0700); give the output the usual permissions
    os.umask(umask)
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~umask)
    if not os.path.isdir(tmp) or not os.path.lexists(path):
        os.replace(tmp, path)
        return
    # A folder cannot replace a non-empty folder in one step: park the old one, move the new one in, then delete.
    parking = _temporary_sibling(path, is_dir=True)
    previous = os.path.join(parking, "previous")
    os.replace(path, previous)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(previous, path)
        raise
    finally:
        shutil.rmtree(parking)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str], overwrite: bool
) -> str:
    """Write ``state_dict`` as one safetensors file with ``metadata``, atomically. Returns the absolute path."""
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **metadata}), overwrite)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other formats)."""
    if not os.fspath(path).endswith(".safetensors"):
        return {}
    with _open_safetensors(path) as f:
        return f.metadata() or {}


@contextlib.contextmanager
def _open_safetensors(path: str | os.PathLike):
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise damaged_safetensors(os.fspath(path), err) from None


def read_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a weights file; cheap for safetensors (only the header is read)."""
    if os.fspath(path).endswith(".safetensors"):
        with _open_safetensors(path) as f:
            return list(f.keys())
    return list(load_state_dict_file(path))
