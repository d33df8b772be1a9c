"""Model cards and Hub uploads for trained models; a failed upload keeps every file and says how to retry."""

from __future__ import annotations

import logging
import os
import re
import shlex

from .errors import first_line

__all__ = ["TAGS", "VALIDATION_GRID", "create_hub_repo", "push_folder", "validation_progression", "write_model_card"]

logger = logging.getLogger(__name__)

#: Hub tags of every DI* model (and its family's ``hub_tag``).
TAGS = ("diffusers", "text-to-image", "di-star")


#: The trainer's picture of one validation step: its prompts side by side, written beside their PNGs.
VALIDATION_GRID = "grid.png"

#: Settings already stated in the card's text or irrelevant to the weights, left out of its hyperparameter table.
_NOT_IN_TABLE = ("pretrained_model_name_or_path", "pretrained_generator", "pretrained_generator_weight_name", "reward")
_NOT_IN_TABLE += ("push_to_hub", "hub_model_id", "hub_token", "debug", "overwrite_output_dir", "report_to")


def write_model_card(
    output_dir: str,
    base_model: str,
    generator_init: str | None,
    reward: str | None,
    hyperparameters: dict,
    lora: bool,
    repo_id: str | None = None,
    images: list[str] = (),
    generator_weight_name: str | None = None,
    family=None,
) -> str:
    """Write ``output_dir/README.md``: what the model is, how it was trained (DI* settings), how to load it, licence.

    ``reward`` is the reward spec, or ``None`` when no reward was used (``reward_scale`` 0): then none is claimed.
    Only Hub ids go into the ``base_model:`` metadata; a local path is named in the text. ``family`` is the model's
    :class:`~diffusers_di_star.families.ModelFamily` (default SDXL): its pipelines, tag and licence.
    """
    from huggingface_hub import ModelCardData

    from .families import SDXLFamily
    from .training.preflight import is_hub_id

    family = family or SDXLFamily
    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    sources = [base_model] + ([generator_init] if generator_init and generator_init != base_model else [])
    metadata = ModelCardData(
        base_model=[source for source in sources if is_hub_id(source)] or None,
        library_name="diffusers",
        license=family.license[0],
        pipeline_tag="text-to-image",
        tags=[*TAGS, *([family.hub_tag] if family.hub_tag else []), *(["lora"] if lora else [])],
    )
    pipeline, base_pipeline = family.pipeline_name, family.base_pipeline_class().__name__
    if lora:
        weight_arg = f', weight_name="{generator_weight_name}"' if generator_weight_name else ""
        loader = (
            "from diffusers_di_star.export import load_generator_unet\nunet = load_generator_unet"
            if family is SDXLFamily
            else f'from diffusers_di_star.families import FAMILIES\nunet = FAMILIES["{family.name}"].load_generator'
        )
        init_line = f'{loader}("{generator_init}", base_model="{base_model}"{weight_arg})\n' if generator_init else ""
        unet_arg = ", unet=unet" if generator_init else ""
        usage = (
            f'{init_line}pipe = {pipeline}.from_pretrained("{base_model}"{unet_arg})\n'
            f'pipe.load_lora_weights("{name}")\n'
        )
    else:
        usage = f'pipe = {pipeline}.from_pretrained("{name}")\n'
    h = hyperparameters
    if reward is not None:
        objective = (
            f"to maximise the reward `{reward}` (α_rew = {h.get('reward_scale')}) while a score-based divergence "
            "keeps it close to the reference diffusion model"
        )
    else:
        objective = "without a reward (α_rew = 0): a score-based divergence alone pulls it towards the reference model"
    init = f", initialised from `{generator_init}`" if generator_init else ""
    settings = [f"divergence: `{h.get('divergence')}`" + (f" (c = {h['huber_c']})" if "huber_c" in h else "")]
    if h.get("cfg_mode") == "reward":
        settings.append(f"CFG as an implicit reward, α_cfg = {h.get('cfg_reward_scale')}")
    elif h.get("cfg_mode") == "inner":
        settings.append(f"CFG-enhanced reference (DI*-In), γ = {h.get('guidance_scale')}")
    settings.append(f"one-step conditioning timestep t* = {h.get('conditioning_timestep', 399)}")
    if lora:
        settings.append(f"LoRA rank {h.get('generator_lora_rank')}, alpha {h.get('generator_lora_alpha')}")
    settings.append(f"{h.get('max_train_steps')} steps, learning rate {h.get('learning_rate')}")
    table = "\n".join(
        f"| `{key}` | `{value}` |" for key, value in sorted(h.items()) if key not in _NOT_IN_TABLE
    )
    gallery = _gallery(output_dir, images)
    reward_licence = f", and of the reward model `{reward}`," if reward is not None else ""
    text = f"""---
{metadata.to_yaml()}
---

# {name}

A one-step {family.display_name} generator post-trained with Diff-Instruct* (DI*, arXiv 2410.20898)
from `{base_model}`{init}, {objective}. It was trained {"as a LoRA" if lora else "in full"}.

DI* settings: {"; ".join(settings)}.

## Usage

```python
from diffusers_di_star import {pipeline}

{usage}image = pipe("a photo of an astronaut riding a horse on mars").images[0]
```

Plain diffusers works too: `{base_pipeline}` with {
        family.diffusers_one_step_settings(h.get("conditioning_timestep", family.default_conditioning_timestep))
    }{", after `load_lora_weights`" if lora else ""}.

## Licence

{family.license[1]}; check the licence of the base and
initial weights{reward_licence} before use.

## Training hyperparameters

| setting | value |
|---|---|
{table}

{gallery}
"""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def validation_progression(output_dir: str) -> tuple[str, list[int]] | None:
    """Stack the grids of ``validation/step-N/`` into ``validation/progression.png``: a row per step, in step order.

    Returns its path and the steps shown, or ``None`` without grids. Grids of another size than the last one (a
    resumed run with other prompts or resolution) are left out.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image

    folder = os.path.join(output_dir, "validation")
    steps = sorted(
        int(match.group(1))
        for name in (os.listdir(folder) if os.path.isdir(folder) else ())
        if (match := re.fullmatch(r"step-(\d+)", name)) and os.path.isfile(os.path.join(folder, name, VALIDATION_GRID))
    )
    grids = {step: Image.open(os.path.join(folder, f"step-{step}", VALIDATION_GRID)).convert("RGB") for step in steps}
    steps = [step for step in steps if grids[step].size == grids[steps[-1]].size] if steps else []
    if not steps:
        return None
    path = os.path.join(folder, "progression.png")
    make_image_grid([grids[step] for step in steps], rows=len(steps), cols=1).save(path)
    return path, steps


def _gallery(output_dir: str, images) -> str:
    """The card's pictures: the final validation grid (else the images) and the progression across validation steps."""
    lines = []
    grid = os.path.join(os.path.dirname(images[0]), VALIDATION_GRID) if images else None
    if grid and os.path.isfile(grid):
        lines.append(f"![The validation prompts, left to right, after training]({os.path.relpath(grid, output_dir)})")
    else:
        lines += [f"![]({os.path.relpath(image, output_dir)})" for image in images]
    progression = validation_progression(output_dir)
    if progression is not None:
        path, steps = progression
        lines.append(
            f"![Validation during training: a row per validation step (steps {', '.join(map(str, steps))}, top to "
            f"bottom)]({os.path.relpath(path, output_dir)})"
        )
    return "## Samples\n\n" + "\n\n".join(lines) if lines else ""


def create_hub_repo(repo_id: str, token: str | None = None) -> str:
    """Create the Hub model repo (or find it, if it exists) before training, as Diffusers' examples do; its full id.

    A bad token, a name in someone else's namespace, or no network raises ``ValueError`` in one line: nothing is
    trained. The token is never logged.
    """
    from huggingface_hub import create_repo

    try:
        return create_repo(repo_id, token=token, exist_ok=True).repo_id
    except Exception as error:  # network, auth, name or server errors: all stop the run before it starts
        reason = first_line(error, limit=None)
        raise ValueError(
            f"--push_to_hub: cannot create or reach the Hub repo {repo_id!r} ({type(error).__name__}: {reason}). "
            "Check the network, `hf auth login` (or --hub_token) with write access and --hub_model_id; "
            "or drop --push_to_hub and upload later with `hf upload`. Nothing was trained."
        ) from None


def push_folder(output_dir: str, repo_id: str, token: str | None = None, ignore_patterns=("checkpoint-*",)) -> bool:
    """Upload ``output_dir`` to the Hub model repo ``repo_id``; on failure log why and the retry command, return False.

    The token is never logged. Nothing on disk is changed either way.
    """
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(repo_id, token=token, exist_ok=True).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, ignore_patterns=list(ignore_patterns))
    except Exception as error:  # network, auth or server errors: the files stay, the user retries
        excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in ignore_patterns)
        logger.error(
            "Upload to the Hub failed (%s: %s). Everything is kept in %s. Retry with:\n  hf upload %s %s . %s",
            type(error).__name__,
            first_line(error, limit=None),
            output_dir,
            shlex.quote(repo_id),
            shlex.quote(output_dir),
            excludes,
        )
        return False
    logger.info("Uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return True
