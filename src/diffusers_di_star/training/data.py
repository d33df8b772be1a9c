"""Prompt data for DI* training: prompts only, no images (the generator makes its own), loaded with ``datasets``."""

from __future__ import annotations

import os

import torch

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
    """The training prompts from a Hub dataset (``dataset_name``) or a local txt/csv/json(l)/parquet file.

    ``prompt_column`` defaults to ``"text"`` for ``.txt`` files and ``"prompt"`` otherwise. Raises ``ValueError``
    with the fix when there is no source or two, the file is missing or of unknown type, the column is missing,
    a row is not a non-empty string, or there are no prompts: all before any model is loaded.
    """
    import datasets

    if (dataset_name is None) == (train_data_file is None):
        raise ValueError("Pass exactly one prompt source: --dataset_name (a Hub dataset) or --train_data_file.")
    if train_data_file is not None:
        train_data_file = os.fspath(train_data_file)
        suffix = os.path.splitext(train_data_file)[1].lower()
        if suffix not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"--train_data_file {train_data_file!r}: unknown type {suffix!r}; "
                f"use one of {sorted(DATA_FILE_BUILDERS)}."
            )
        if not os.path.isfile(train_data_file):
            raise ValueError(f"--train_data_file {train_data_file!r} does not exist.")
        if os.path.getsize(train_data_file) == 0:
            raise ValueError(f"--train_data_file {train_data_file!r} is empty: it must hold at least one prompt.")
        builder, data_files = DATA_FILE_BUILDERS[suffix], {split: train_data_file}
        prompt_column = prompt_column or ("text" if builder == "text" else "prompt")
        dataset = datasets.load_dataset(builder, data_files=data_files, split=split, cache_dir=cache_dir)
        source = train_data_file
    else:
        prompt_column = prompt_column or "prompt"
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        source = dataset_name
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
