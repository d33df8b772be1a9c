"""Prompt data for DI* training: prompts only, no images (the generator makes its own), loaded with ``datasets``."""

from __future__ import annotations

import os

import torch

from ..errors import first_line

__all__ = ["DATA_FILE_BUILDERS", "load_prompts", "prompt_batch"]

#: File suffix -> ``datasets`` builder. A ``.txt`` file holds one prompt per line (column ``text``).
DATA_FILE_BUILDERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_prompts(
    dataset_name: str | None = None,
    train_data_file: str | os.PathLike | None = None,
    prompt_column: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> list[str]:
    """The training prompts from a Hub dataset (``dataset_name``), a local txt/csv/json(l)/parquet file, or a
    ``datasets`` ``save_to_disk`` folder (passed as either).

    ``prompt_column`` defaults to ``"text"`` for ``.txt`` files and ``"prompt"`` otherwise. Raises ``ValueError``
    with the fix when there is no source or two, the file is missing, unreadable, binary or of unknown type, a Hub
    dataset is unreachable, the column is missing, a row is not a non-empty string, or there are no prompts: all
    before any model is loaded.
    """
    import datasets

    if (dataset_name is None) == (train_data_file is None):
        raise ValueError("Pass exactly one prompt source: --dataset_name (a Hub dataset) or --train_data_file.")
    flag = "--train_data_file" if train_data_file is not None else "--dataset_name"
    location = os.fspath(train_data_file if train_data_file is not None else dataset_name)
    if _is_saved_dataset(location):  # a `Dataset.save_to_disk` folder, accepted by either flag
        dataset = datasets.load_from_disk(location)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{flag} {location!r} has no split {split!r}; its splits are {list(dataset)}.")
            dataset = dataset[split]
        prompt_column = prompt_column or "prompt"
    elif train_data_file is not None:
        dataset, prompt_column = _load_file(location, prompt_column, split, cache_dir)
    else:
        from ..sources import is_hub_id, not_cached

        if not is_hub_id(location):
            raise ValueError(
                f"--dataset_name {location!r}: no such folder (a local path, not a Hub id); pass a "
                "`save_to_disk` folder here or a prompt file with --train_data_file."
            )
        prompt_column = prompt_column or "prompt"
        try:
            dataset = datasets.load_dataset(location, dataset_config_name, split=split, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError) as error:  # offline, or no such Hub dataset
            what = "a `save_to_disk` folder or a prompt file with --train_data_file"
            raise ValueError(
                not_cached("--dataset_name", location, what, repo_type="dataset") + " (Or no such Hub dataset.)"
            ) from error
    source = location
    if prompt_column not in dataset.column_names:
        raise ValueError(
            f"{source!r} has no column {prompt_column!r}; its columns are {dataset.column_names}. "
            "Choose one with --prompt_column."
        )
    prompts = dataset[prompt_column]
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"{source!r}, column {prompt_column!r}, row {row}: expected a non-empty string, got {prompt!r}."
            )
    if not prompts:
        raise ValueError(f"{source!r} has no prompts in column {prompt_column!r}.")
    return list(prompts)


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )


def _load_file(path: str, prompt_column: str | None, split: str, cache_dir: str | None):
    """A local prompt file with its ``datasets`` builder; a missing, unreadable, binary or malformed file is named."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise ValueError(
            f"--train_data_file {path!r} is a folder: pass a prompt file or a `save_to_disk` folder (with state.json)."
        )
    if suffix not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"--train_data_file {path!r}: unknown type {suffix!r}; use one of {sorted(DATA_FILE_BUILDERS)}."
        )
    if not os.path.isfile(path):
        raise ValueError(f"--train_data_file {path!r} does not exist.")
    if not os.access(path, os.R_OK):
        raise ValueError(f"--train_data_file {path!r} is not readable (check its permissions).")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--train_data_file {path!r} is empty: it must hold at least one prompt.")
    builder = DATA_FILE_BUILDERS[suffix]
    if builder != "parquet":
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        nul = head.find(b"\x00")
        reason = f"a NUL byte at byte {nul}" if nul >= 0 else None
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.reason != "unexpected end of data":  # a multi-byte character cut by the 1 MiB read is fine
                reason = reason or f"{error.reason} at byte {error.start}"
        if reason:
            raise ValueError(
                f"--train_data_file {path!r} is not UTF-8 text ({reason}): a {suffix} file must be text; "
                "is it binary or in another encoding?"
            )
    try:
        dataset = datasets.load_dataset(builder, data_files={split: path}, split=split, cache_dir=cache_dir)
    except ValueError as error:  # e.g. a CSV holding only its header: 'Instruction "train" corresponds to no data!'
        raise ValueError(f"--train_data_file {path!r} holds no prompts ({first_line(error)}).") from error
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        reason = first_line(cause, limit=None)
        raise ValueError(f"--train_data_file {path!r} cannot be read as {suffix}: {reason}") from error
    return dataset, prompt_column or ("text" if builder == "text" else "prompt")


def prompt_batch(prompts: list[str], index: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The ``index``-th batch of one process: epochs of seeded permutations, split across ``world_size`` processes.

    A pure function of its arguments, so a resumed run draws exactly the prompts the uninterrupted run would have.
    """
    start = (index * world_size + rank) * batch_size
    batch = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
        batch.append(prompts[order[offset]])
    return batch
