"""Prompt sets of the paper's tables, from their real sources, or from a local file.

* ``parti``: PartiPrompts, 1,632 prompts (Table 1), the Hub dataset ``nateraw/parti-prompts``, column ``Prompt``.
* ``coco``: COCO-2017 captions (Table 1): the first caption of each of the 5,000 val2017 images, images ordered by id,
  from the Hub dataset ``phiyodr/coco2017`` (split ``validation``, captions only).
* ``hpsv2``: the HPSv2 benchmark (Table 3), 800 prompts in each of its styles ``anime``, ``concept-art``,
  ``paintings``, ``photo``: ``<style>.json`` from an installed ``hpsv2`` package, hpsv2's cache, or the Hub dataset
  ``zhwang/HPDv2`` (``benchmark/``).
* a local file: ``.txt`` (one prompt a line), ``.csv`` (a header row and a ``prompt`` column, the trainer's layout)
  or ``.json`` (a list of prompts, or ``{style: [prompts]}``); a local
  folder holding the four HPSv2 ``<style>.json`` files is read as the HPSv2 benchmark.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import DIStarError

__all__ = ["HPS_STYLES", "PROMPT_SETS", "Prompt", "PromptSet", "PromptSetError", "load_prompt_set"]

#: The HPSv2 benchmark's styles, in the order of its tables.
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
_HPD_REPO = "zhwang/HPDv2"
#: The column a ``.csv`` prompt file is read from: the trainer's default ``--prompt_column`` for non-text files.
CSV_PROMPT_COLUMN = "prompt"


class PromptSetError(DIStarError, ValueError):
    """A prompt set that cannot be read; the message says what to download or pass instead."""


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``index`` is its position in the whole prompt set: it names the image and seeds its noise."""

    index: int
    text: str
    style: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """An ordered prompt set; ``styles`` are its groups (the HPSv2 benchmark's four), empty when it has none."""

    name: str
    prompts: tuple[Prompt, ...]

    @property
    def styles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(prompt.style for prompt in self.prompts if prompt.style is not None))

    def fingerprint(self) -> str:
        """A hash of every prompt and style: a resumed run must use the same prompts."""
        content = json.dumps([[prompt.text, prompt.style] for prompt in self.prompts])
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def select(self, num_prompts: int | None = None) -> list[Prompt]:
        """The first ``num_prompts`` prompts of each style (of the whole set when it has no styles); all if None."""
        if num_prompts is None:
            return list(self.prompts)
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (or None for all), got {num_prompts}.")
        taken: dict[str | None, int] = {}
        selected = []
        for prompt in self.prompts:
            if taken.get(prompt.style, 0) < num_prompts:
                taken[prompt.style] = taken.get(prompt.style, 0) + 1
                selected.append(prompt)
        return selected


def load_prompt_set(source: str) -> PromptSet:
    """``"parti"``, ``"coco"``, ``"hpsv2"``, a ``.txt``/``.json`` prompt file, or a folder of HPSv2 style files."""
    if source in PROMPT_SETS:
        return PROMPT_SETS[source]()
    if os.path.isdir(source):
        return _read_style_files(source, {style: os.path.join(source, f"{style}.json") for style in HPS_STYLES})
    if os.path.isfile(source):
        return _read_prompt_file(source)
    raise PromptSetError(
        f"prompt set {source!r} is neither one of {', '.join(PROMPT_SETS)} nor an existing file or folder: pass a "
        f".txt file (one prompt a line), a .json file (a list of prompts, or {{style: [prompts]}}) or a folder with "
        f"the HPSv2 benchmark's {', '.join(f'{style}.json' for style in HPS_STYLES)}."
    )


def _make_set(name: str, texts_by_style: dict[str | None, Sequence[str]]) -> PromptSet:
    prompts = []
    for style, texts in texts_by_style.items():
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise PromptSetError(f"{name}: every prompt must be a non-empty string, got {text!r}.")
            prompts.append(Prompt(len(prompts), text.strip(), style))
    if not prompts:
        raise PromptSetError(f"{name} holds no prompts.")
    return PromptSet(name, tuple(prompts))


def _read_prompt_file(path: str) -> PromptSet:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as err:
        raise PromptSetError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 (one prompt a line)."
        ) from None
    if path.lower().endswith(".csv"):
        return _make_set(path, {None: _csv_column(path, text)})
    if not path.lower().endswith(".json"):
        return _make_set(path, {None: [line for line in text.splitlines() if line.strip()]})
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptSetError(f"{path} is not valid JSON ({err}).") from err
    if isinstance(content, list):
        return _make_set(path, {None: content})
    if isinstance(content, dict) and all(isinstance(texts, list) for texts in content.values()):
        return _make_set(path, content)
    raise PromptSetError(f"{path} must hold a JSON list of prompts or an object {{style: [prompts]}}.")


def _csv_column(path: str, text: str, column: str = CSV_PROMPT_COLUMN) -> list[str]:
    """The ``column`` of a CSV file with a header row (the trainer's ``--train_data_file`` layout)."""
    rows = csv.DictReader(io.StringIO(text))
    if column not in (rows.fieldnames or ()):
        raise PromptSetError(
            f"{path}: a .csv prompt file needs a header row with a {column!r} column (as the trainer reads it); "
            f"its header is {rows.fieldnames or 'empty'}."
        )
    prompts = [row[column] for row in rows if (row[column] or "").strip()]
    if not prompts:
        raise PromptSetError(f"{path} has a header but no prompts in its {column!r} column.")
    return prompts


def _read_style_files(name: str, files: dict[str, str]) -> PromptSet:
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise PromptSetError(
            f"{name} is not an HPSv2 benchmark folder: {', '.join(missing)} missing. Download "
            f"benchmark/{{{','.join(HPS_STYLES)}}}.json from the Hub dataset {_HPD_REPO} (see docs/evaluation.md)."
        )
    texts = {}
    for style, path in files.items():
        with open(path, encoding="utf-8") as file:
            texts[style] = json.load(file)
        if not isinstance(texts[style], list):
            raise PromptSetError(f"{path} must hold a JSON list of prompts, as the HPSv2 benchmark's files do.")
    return _make_set(name, texts)


def _load_hub_dataset(repo: str, split: str, what: str):
    try:
        import datasets
    except ImportError as err:
        raise PromptSetError(f"{what} need the `datasets` package: pip install 'diffusers-di-star[eval]'.") from err
    try:
        return datasets.load_dataset(repo, split=split)
    except OSError as err:  # offline (ConnectionError) or not in the cache
        raise PromptSetError(
            f"could not load {what} (Hub dataset {repo!r}): it is not in the local cache and the Hub is unreachable "
            f"(or HF_HUB_OFFLINE is set). On a connected machine with the same HF_HOME, run "
            f"`python -c \"import datasets; datasets.load_dataset('{repo}', split='{split}')\"`, "
            f"or write the prompts to a .txt file (one a line) and pass that instead."
        ) from err


def _load_parti() -> PromptSet:
    rows = _load_hub_dataset("nateraw/parti-prompts", "train", "the Parti prompts")
    return _make_set("parti", {None: list(rows["Prompt"])})


def _load_coco() -> PromptSet:
    rows = _load_hub_dataset("phiyodr/coco2017", "validation", "the COCO-2017 captions")
    captions, image_ids = list(rows["captions"]), list(rows["image_id"])
    order = sorted(range(len(image_ids)), key=image_ids.__getitem__)
    return _make_set("coco", {None: [captions[row][0] for row in order]})


def _hps_local_folders() -> list[str]:
    """Where the HPSv2 benchmark prompts may already be: in the ``hpsv2`` package, or in hpsv2's own cache."""
    folders = []
    spec = importlib.util.find_spec("hpsv2")  # located, not imported: hpsv2 imports open_clip and torchvision
    if spec is not None and spec.submodule_search_locations:
        folders += [os.path.join(location, "benchmark", "datasets") for location in spec.submodule_search_locations]
    hps_root = os.environ.get("HPS_ROOT") or os.path.expanduser("~/.cache/hpsv2")
    return [*folders, os.path.join(hps_root, "datasets", "benchmark")]


def _load_hpsv2() -> PromptSet:
    for folder in _hps_local_folders():
        files = {style: os.path.join(folder, f"{style}.json") for style in HPS_STYLES}
        if all(os.path.isfile(path) for path in files.values()):
            return _read_style_files("hpsv2", files)
    from huggingface_hub import hf_hub_download

    try:
        files = {
            style: hf_hub_download(_HPD_REPO, f"benchmark/{style}.json", repo_type="dataset") for style in HPS_STYLES
        }
    except OSError as err:  # offline, not cached, or the Hub is unreachable
        raise PromptSetError(
            f"could not find the HPSv2 benchmark prompts: not in an installed hpsv2 package or hpsv2's cache "
            f"({_hps_local_folders()[-1]}), and the Hub dataset {_HPD_REPO!r} is unreachable (or HF_HUB_OFFLINE is "
            f"set). On a connected machine run `hf download {_HPD_REPO} --repo-type dataset --include "
            f"'benchmark/*.json' --local-dir HPDv2` and pass the folder HPDv2/benchmark instead of hpsv2."
        ) from err
    return _read_style_files("hpsv2", files)


#: The named prompt sets and their loaders.
PROMPT_SETS: dict[str, Callable[[], PromptSet]] = {"parti": _load_parti, "coco": _load_coco, "hpsv2": _load_hpsv2}
