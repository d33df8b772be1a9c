"""Generate, score, resume: ``evaluate(models, prompt_set, out_dir)`` writes the paper's tables for any checkpoint.

Output folder::

    OUT/run.json                 the run's settings (prompt set, seed, size, metrics): a later run must match them;
                                 and every model evaluated into OUT so far: the table has a row for each
    OUT/<model>/model.json       the model's settings (model, steps, guidance scale, dtype, variant)
    OUT/<model>/images/NNNNN.png one image per prompt, named by the prompt's index in the prompt set
    OUT/<model>/scores.jsonl     one line per image, appended and flushed after every batch
    OUT/scores.csv, scores.json  every image of every model; scores.json also holds the settings and the means
    OUT/table.md                 the Markdown table (paper layout), OUT/contact_sheet.png the first prompts' images
                                 of every model, a row each

Image ``i`` is generated from its own ``torch.Generator("cpu").manual_seed(seed * 1_000_000 + i)``, so an image
depends on the seed and its prompt only: not on the batch size (up to float rounding in batched matmuls, at most
1/255 in a few pixels), not on ``num_prompts``, not on where a run was interrupted. ``di-star generate --seed
<seed * 1000000 + i>`` regenerates it alone. An interrupted run continues where it stopped: the prompts with a line
in ``scores.jsonl`` are skipped (a model whose images are all scored is not even loaded).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DIStarError
from ..families import FAMILIES
from ..rewards import WeightedSumReward, load_reward
from ..runtime import default_device, load_pipeline
from ..sources import reward_load_failure
from ..weights import DTYPES
from .prompts import Prompt, PromptSet
from .report import (
    TABLE_1_METRICS,
    TABLE_3_METRICS,
    format_table,
    get_metric,
    summarize,
    write_contact_sheet,
    write_scores,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "EvaluationError",
    "EvaluationResult",
    "ModelSpec",
    "evaluate",
    "generate_images",
    "image_seed",
    "load_model",
]

#: Classifier-free guidance scale of multi-step baselines when none is given (diffusers' SDXL default).
DEFAULT_GUIDANCE_SCALE = 5.0
_SEED_STRIDE = 1_000_000  # image i of seed s uses s * _SEED_STRIDE + i: readable, and unique while i < 10^6


class EvaluationError(DIStarError, ValueError):
    """An evaluation that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """One row of the table: a model (Hub id or SDXL-layout folder) and how to sample it.

    ``steps=1`` runs our one-step pipeline (:class:`DIStarSDXLPipeline`); ``steps > 1`` runs SDXL's own Euler sampler
    with classifier-free guidance ``guidance_scale`` (default 5.0), for multi-step baselines such as SDXL base at 50.
    ``dtype`` is ``"fp32"``, ``"fp16"`` or ``"bf16"``; ``variant`` picks weight files (e.g. ``"fp16"``).
    """

    model: str
    steps: int = 1
    guidance_scale: float | None = None
    dtype: str = "fp32"
    variant: str | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise EvaluationError(f"steps must be >= 1, got {self.steps}.")
        if self.steps == 1 and self.guidance_scale is not None:
            raise EvaluationError(
                f"guidance_scale={self.guidance_scale} needs steps > 1: one-step generators have the guidance "
                f"distilled in. Drop it, or pass steps (e.g. 50) to sample a multi-step baseline."
            )
        if self.dtype not in DTYPES:
            raise EvaluationError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")

    @property
    def cfg(self) -> float | None:
        """The guidance scale actually used (None for one step)."""
        if self.steps == 1:
            return None
        return DEFAULT_GUIDANCE_SCALE if self.guidance_scale is None else self.guidance_scale

    @property
    def label(self) -> str:
        """The row name: the model, with the sampler when it is multi-step."""
        return self.model if self.steps == 1 else f"{self.model} ({self.steps} steps, CFG {self.cfg:g})"

    @property
    def folder(self) -> str:
        """The model's subfolder of the output folder."""
        name = _safe_name(self.model) or _safe_name(os.path.abspath(self.model))  # "." is a model folder too
        return name if self.steps == 1 else f"{name}_{self.steps}steps_cfg{self.cfg:g}"

    def settings(self) -> dict:
        return asdict(self) | {"guidance_scale": self.cfg}


@dataclass
class EvaluationResult:
    """What :func:`evaluate` wrote: the Markdown ``table``, the per-model ``summary``, the per-image ``records``, and
    the ``files`` (``table``, ``csv``, ``json``, ``contact_sheet``) by kind."""

    table: str
    summary: dict
    records: list[dict]
    files: dict[str, str]


def image_seed(seed: int, index: int) -> int:
    """The seed of the image of prompt ``index``: ``seed * 1_000_000 + index``."""
    if not 0 <= index < _SEED_STRIDE:
        raise EvaluationError(f"prompt index {index} is out of range: a prompt set holds at most {_SEED_STRIDE}.")
    return seed * _SEED_STRIDE + index


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-.")


def load_model(spec: ModelSpec, device: str | None = None):
    """Load ``spec.model`` as its family's one-step pipeline (e.g. :class:`DIStarSDXLPipeline`) or, for
    ``steps > 1``, as the family's diffusers pipeline (e.g. SDXL) with an Euler sampler."""
    pipe = load_pipeline(spec.model, dtype=spec.dtype, device=device, variant=spec.variant)
    if spec.steps > 1:
        # Our pipeline keeps only the training schedule; the family's baseline samples with Euler on it.
        family = next(family for family in FAMILIES.values() if isinstance(pipe, family.pipeline_class()))
        pipe = family.base_pipeline_class().from_pipe(pipe, scheduler=family.baseline_scheduler(pipe.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_images(
    pipe, spec: ModelSpec, prompts: Sequence[Prompt], seed: int, height: int | None = None, width: int | None = None
) -> list[Image.Image]:
    """One image per prompt, each from its own generator seeded by :func:`image_seed`."""
    generators = [torch.Generator("cpu").manual_seed(image_seed(seed, prompt.index)) for prompt in prompts]
    sampling = {} if spec.steps == 1 else {"num_inference_steps": spec.steps, "guidance_scale": spec.cfg}
    texts = [prompt.text for prompt in prompts]
    return pipe(texts, height=height, width=width, generator=generators, output_type="pil", **sampling).images


def evaluate(
    models: Sequence[ModelSpec],
    prompt_set: PromptSet,
    out_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    reward_options: Mapping[str, Mapping[str, object]] | None = None,
    load_pipeline: Callable[[ModelSpec], object] | None = None,
) -> EvaluationResult:
    """Generate an image per prompt with every model, score it, and write the tables (see the module docstring).

    Args:
        models: the table's rows.
        prompt_set: from :func:`load_prompt_set`; ``num_prompts`` keeps the first N (of each style).
        metrics: reward names (:data:`METRICS`); default Table 1's four, or HPSv2.1 for a prompt set with styles.
        seed, height, width: the images (default size: the model's native 1024x1024).
        batch_size: images generated and scored at once; it does not change the images.
        device: for the models and the rewards (default cuda if available).
        reward_options: loader options per reward, e.g. ``{"pickscore": {"model": "/ckpt/PickScore_v1"}}``.
        load_pipeline: ``spec -> pipeline``; default :func:`load_model` on ``device``.
    """
    out_dir = os.fspath(out_dir)
    device = device or default_device()
    metrics = list(metrics or (TABLE_3_METRICS if prompt_set.styles else TABLE_1_METRICS))
    _check_arguments(models, metrics, seed, batch_size)
    prompts = prompt_set.select(num_prompts)
    # The prompt set is compared by content, so a moved prompt file still resumes.
    run_settings = {"prompt_set": prompt_set.fingerprint(), "seed": seed, "height": height, "width": width}
    run_settings["metrics"] = metrics
    folders = _record_settings(out_dir, run_settings, models)

    pending = {spec: _pending(out_dir, spec, prompts) for spec in models}
    if any(pending.values()):
        reward = _load_rewards(metrics, device, reward_options or {})
        load_pipeline = load_pipeline or functools.partial(load_model, device=device)
        sampling = {"seed": seed, "height": height, "width": width}
        for spec in models:
            if pending[spec]:
                _generate_and_score(
                    load_pipeline(spec), spec, pending[spec], reward, metrics, out_dir, batch_size, sampling
                )
    return _report(out_dir, folders, prompts, prompt_set, metrics, run_settings)


def _check_arguments(models: Sequence[ModelSpec], metrics: Sequence[str], seed: int, batch_size: int) -> None:
    if not models:
        raise EvaluationError("no model to evaluate: pass at least one.")
    folders = [spec.folder for spec in models]
    if len(set(folders)) != len(folders):
        raise EvaluationError(f"two models share an output folder name ({folders}): evaluate each model once.")
    for name in metrics:
        get_metric(name)
    if len(set(metrics)) != len(metrics):
        raise EvaluationError(f"metrics {metrics} name a metric twice.")
    if seed < 0:
        raise EvaluationError(f"seed must be >= 0, got {seed}.")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}.")


def _record_settings(out_dir: str, run_settings: Mapping, models: Sequence[ModelSpec]) -> list[str]:
    """Check the settings against those of an earlier run into ``out_dir`` and write them.

    Returns the folders of every model evaluated into ``out_dir`` so far, in the order they were first evaluated:
    the table has a row for each, so models sampled differently (``steps``) can share one table.
    """
    run_path = os.path.join(out_dir, "run.json")
    model_paths = {os.path.join(out_dir, spec.folder, "model.json"): spec.settings() for spec in models}
    stored = _check_settings(run_path, run_settings)
    for path, settings in model_paths.items():
        _check_settings(path, settings)
    folders = list(dict.fromkeys([*stored.get("models", []), *(spec.folder for spec in models)]))
    _write_json(run_path, {**run_settings, "models": folders})
    for path, settings in model_paths.items():
        _write_json(path, settings)
    return folders


def _check_settings(path: str, settings: Mapping) -> dict:
    """The settings stored at ``path`` by an earlier run (``{}`` if none), which must agree with ``settings``."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as file:
        stored = json.load(file)
    changed = [
        f"{key}={stored.get(key)!r} (now {value!r})" for key, value in settings.items() if stored.get(key) != value
    ]
    if changed:
        raise EvaluationError(
            f"{path} was written by a run with other settings: {', '.join(changed)}. Resume with the same "
            f"settings, or write to another output folder."
        )
    return stored


def _write_json(path: str, content) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=1)


def _scores_path(out_dir: str, spec: ModelSpec) -> str:
    return os.path.join(out_dir, spec.folder, "scores.jsonl")


def _read_scores(path: str) -> dict[int, dict]:
    """Finished images' records by prompt index; a last line cut off by a crash is dropped (its batch is redone)."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as file:
        content = file.read()
    complete = content[: content.rfind(b"\n") + 1]
    if len(complete) < len(content):
        with open(path, "r+b") as file:
            file.truncate(len(complete))
    return {record["index"]: record for record in map(json.loads, complete.decode("utf-8").splitlines())}


def _pending(out_dir: str, spec: ModelSpec, prompts: Sequence[Prompt]) -> list[Prompt]:
    done = _read_scores(_scores_path(out_dir, spec))
    return [prompt for prompt in prompts if prompt.index not in done]


def _load_rewards(metrics: Sequence[str], device: str, options: Mapping) -> WeightedSumReward:
    try:
        return load_reward(",".join(metrics), device=device, **options)
    except OSError as err:  # a checkpoint that is neither local nor reachable, or a local copy that is unreadable
        raise EvaluationError(reward_load_failure(",".join(metrics), dict(options), err, "--reward-option")) from err


def _generate_and_score(pipe, spec, prompts, reward, metrics, out_dir, batch_size, sampling) -> None:
    """Generate, save and score ``prompts`` in batches, appending each batch's records to ``scores.jsonl``."""
    os.makedirs(os.path.join(out_dir, spec.folder, "images"), exist_ok=True)
    with (
        open(_scores_path(out_dir, spec), "a", encoding="utf-8") as file,
        tqdm(total=len(prompts), desc=spec.label, unit="image") as progress,
    ):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            images = generate_images(pipe, spec, batch, **sampling)
            scores = _score(reward, images, [prompt.text for prompt in batch], metrics)
            for prompt, image, values in zip(batch, images, scores, strict=True):
                record = _save_image(out_dir, spec, prompt, image, sampling["seed"]) | values
                file.write(json.dumps(record) + "\n")
            file.flush()
            progress.update(len(batch))


def _save_image(out_dir: str, spec: ModelSpec, prompt: Prompt, image: Image.Image, seed: int) -> dict:
    """Save the image of ``prompt``; returns its record (without scores), the image path relative to ``out_dir``."""
    name = os.path.join(spec.folder, "images", f"{prompt.index:05d}.png")
    image.save(os.path.join(out_dir, name))
    record = {"index": prompt.index, "style": prompt.style, "prompt": prompt.text}
    return record | {"seed": image_seed(seed, prompt.index), "image": name}


def _score(reward: WeightedSumReward, images: Sequence[Image.Image], texts: list[str], metrics) -> list[dict]:
    """Each metric of each image, in the paper's scale, scored on the saved 8-bit pixels."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    pixels = pixels.permute(0, 3, 1, 2).to(reward.device, torch.float32) / 255
    with torch.no_grad():
        components = reward.components(pixels, texts)
    columns = {name: (components[name] * get_metric(name).scale).tolist() for name in metrics}
    return [{name: columns[name][i] for name in metrics} for i in range(len(images))]


def _report(out_dir, folders, prompts, prompt_set, metrics, run_settings) -> EvaluationResult:
    """Write the scores, the table and the contact sheet of every model in ``out_dir`` scored on all ``prompts``."""
    records, incomplete = [], []
    for folder in folders:
        with open(os.path.join(out_dir, folder, "model.json"), encoding="utf-8") as file:
            spec = ModelSpec(**json.load(file))
        done = _read_scores(_scores_path(out_dir, spec))
        if all(prompt.index in done for prompt in prompts):
            records += [{"model": spec.label, **done[prompt.index]} for prompt in prompts]
        else:
            incomplete.append(spec.label)
    summary = summarize(records, metrics, prompt_set.styles)
    height, width = run_settings["height"], run_settings["width"]
    size = f"{height or 'native'}x{width or 'native'}" if height or width else "native size"
    caption = f"{prompt_set.name}: {len(prompts)} prompts, seed {run_settings['seed']}, {size}"
    table = format_table(summary, metrics, prompt_set.styles, caption)
    if incomplete:
        table += f"\nNot scored on all these prompts (rerun with their --model to complete): {', '.join(incomplete)}\n"
    files = write_scores(out_dir, records, {"prompts": prompt_set.name, **run_settings}, summary)
    files["contact_sheet"] = write_contact_sheet(out_dir, records)
    files["table"] = os.path.join(out_dir, "table.md")
    with open(files["table"], "w", encoding="utf-8") as file:
        file.write(table)
    return EvaluationResult(table, summary, records, files)
