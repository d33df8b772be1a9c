"""Where a model comes from: a local file, a local folder or a Hub id, and one message for each way it can fail.

Every command and the trainer decide "Hub id or local path?" with :func:`is_hub_id` and word their errors with
:func:`load_failure` (a local path is never given ``hf download`` advice; a Hub id always is, spelled one way).
Where outputs go is checked once too: :func:`folder_write_problem`.
"""

from __future__ import annotations

import json
import os
import tempfile

from .errors import first_line

__all__ = [
    "folder_write_problem",
    "is_hub_id",
    "lora_run",
    "load_failure",
    "local_path_problem",
    "not_cached",
    "reward_load_failure",
    "reward_option_problem",
]


def is_hub_id(name: str) -> bool:
    """``owner/name`` or ``name``, not an existing path and not shaped like one (``./x``, ``/x``, ``a/b/c``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


#: What the trainer leaves in a LoRA run's --output_dir (besides checkpoints and images).
LORA_RUN_FILES = ("pytorch_lora_weights.safetensors", "training_args.json")


def lora_run(path: str) -> dict | None:
    """The settings of a trainer's LoRA run folder (``training_args.json``: its base model, generator init and t*),
    or None for anything else (a Diffusers folder, a file, a Hub id)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "model_index.json")):
        return None
    if not all(os.path.isfile(os.path.join(path, name)) for name in LORA_RUN_FILES):
        return None
    with open(os.path.join(path, "training_args.json"), encoding="utf-8") as f:
        settings = json.load(f)
    if not (isinstance(settings, dict) and settings.get("use_lora") and settings.get("pretrained_model_name_or_path")):
        return None
    return settings


def _named(flag: str | None, name: str) -> str:
    return f"{flag} {name!r}" if flag else repr(name)


def not_cached(flag: str | None, name: str, what: str, repo_type: str | None = None) -> str:
    """The advice for a Hub id that is neither in the local cache nor reachable."""
    option = f" --repo-type {repo_type}" if repo_type else ""
    return (
        f"{_named(flag, name)}: not in the local Hugging Face cache and the Hub is unreachable (or HF_HUB_OFFLINE is "
        f"set). Download it on a connected machine with `hf download {name}{option}`, or pass {what} (a local path)."
    )


def local_path_problem(flag: str | None, name: str, what: str) -> str | None:
    """Why ``name`` cannot be used, when it is not a Hub id and no such path exists; None otherwise."""
    if is_hub_id(name) or os.path.exists(name):
        return None
    return f"{_named(flag, name)}: no such file or folder; pass {what}."


def load_failure(flag: str | None, name: str, error: BaseException, what: str) -> str:
    """The one line for ``name`` that could not be loaded: a missing or unreadable local path, or a Hub id that is
    unknown, private, has no such revision, or is not cached while offline."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not is_hub_id(name):
        return local_path_problem(flag, name, what) or f"{_named(flag, name)} is not {what} ({first_line(error)})."
    if isinstance(error, RevisionNotFoundError):
        return f"{_named(flag, name)}: the Hub repo has no such --revision."
    if isinstance(error, RepositoryNotFoundError):
        return f"{_named(flag, name)}: no such Hub repo (or it is private or gated: log in with `hf auth login`)."
    return not_cached(flag, name, what)


def reward_option_problem(options: dict[str, dict[str, str]], flag: str) -> str | None:
    """A reward option naming a local path that does not exist (checked before anything loads); None if all exist."""
    for name, values in options.items():
        for option, value in values.items():
            looks_local = value.startswith((".", "/", "~")) or os.sep in value.strip(os.sep).replace(os.sep, "", 1)
            if looks_local and not os.path.exists(value):
                return f"{flag} {name}.{option}={value}: no such file or folder; pass a local copy of the checkpoint."
    return None


def reward_load_failure(spec: str, options: dict[str, dict[str, str]], error: BaseException, flag: str) -> str:
    """Why the rewards of ``spec`` could not load: a local copy the user passed is unreadable, or a Hub checkpoint is
    not cached while offline (then: which repos to download, and the options that take local copies)."""
    import inspect

    from .rewards.registry import REWARDS, parse_reward_spec

    local = [f"{name}.{option}={value}" for name, values in options.items() for option, value in values.items()
             if not is_hub_id(value)]  # fmt: skip
    if local:
        return f"--reward {spec!r}: could not load it with {flag} {', '.join(local)} ({first_line(error)})."
    sources = [
        (f"{name}.{option}", parameter.default)
        for name in parse_reward_spec(spec)
        for option, parameter in inspect.signature(REWARDS[name].loader).parameters.items()
        if isinstance(parameter.default, str) and "/" in parameter.default and is_hub_id(parameter.default)
    ]
    return (
        f"--reward {spec!r}: a checkpoint is not in the local Hugging Face cache and the Hub is unreachable "
        f"({first_line(error)}). Download it on a connected machine with "
        + " and ".join(f"`hf download {repo}`" for repo in sorted({repo for _, repo in sources}))
        + ", or pass local copies: "
        + " ".join(f"{flag} {option}=PATH" for option, _ in sources)
    )


def folder_write_problem(folder: str) -> str | None:
    """Why ``folder`` (created if missing) cannot be written, else ``None``: the nearest existing path at or above it
    must be a writable folder. Writing is tried (an empty folder made and removed), since ``os.access`` says yes to
    root on read-only mounts and pseudo file systems such as ``/proc``."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing!r} is not writable"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".di-star-write-check-", dir=existing))
    except OSError as err:
        return f"writing in {existing!r} failed ({first_line(err)})"
    return None
