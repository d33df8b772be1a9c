"""Model cards and Hub uploads for trained models; a failed upload keeps every file and says how to retry."""

from __future__ import annotations

import logging
import os
import shlex

__all__ = ["TAGS", "write_model_card", "push_folder"]

logger = logging.getLogger(__name__)

#: Hub tags of every DI* model.
TAGS = ("diffusers", "text-to-image", "di-star", "stable-diffusion-xl")


def write_model_card(
    output_dir: str,
    base_model: str,
    generator_init: str | None,
    reward: str,
    hyperparameters: dict,
    lora: bool,
    repo_id: str | None = None,
    images: list[str] = (),
    generator_weight_name: str | None = None,
) -> str:
    """Write ``output_dir/README.md``: base model, init weights, reward, hyperparameters, licences, usage, tags."""
    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    init = generator_init or base_model
    if lora:
        weight_arg = f', weight_name="{generator_weight_name}"' if generator_weight_name else ""
        init_line = (
            "from diffusers_di_star.export import load_generator_unet\n"
            f'unet = load_generator_unet("{generator_init}", base_model="{base_model}"{weight_arg})\n'
            if generator_init
            else ""
        )
        unet_arg = ", unet=unet" if generator_init else ""
        usage = (
            f'{init_line}pipe = DIStarSDXLPipeline.from_pretrained("{base_model}"{unet_arg})\n'
            f'pipe.load_lora_weights("{name}")\n'
        )
    else:
        usage = f'pipe = DIStarSDXLPipeline.from_pretrained("{name}")\n'
    table = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(hyperparameters.items()))
    gallery = "\n".join(f"![]({os.path.relpath(image, output_dir)})" for image in images)
    tags = "\n".join(f"- {tag}" for tag in (*TAGS, "lora") if tag != "lora" or lora)
    text = f"""---
base_model: {init}
tags:
{tags}
license: openrail++
---

# {name}

A one-step SDXL generator post-trained with Diff-Instruct* (DI*, arXiv 2410.20898) to maximise the reward
`{reward}` while a score-based divergence keeps it close to the reference diffusion model `{base_model}`.
The generator was initialised from `{init}`; it was trained {"as a LoRA" if lora else "in full"}.

## Usage

```python
from diffusers_di_star import DIStarSDXLPipeline

{usage}image = pipe("a photo of an astronaut riding a horse on mars").images[0]
```

Plain diffusers works too: `StableDiffusionXLPipeline` with `LCMScheduler`, `timesteps=[{
        hyperparameters.get("conditioning_timestep", 399)
    }]` and `guidance_scale=0`.

## Licence

The weights derive from `{base_model}` (CreativeML Open RAIL++-M licence) and `{init}`; check the licence of
both, and of the reward model `{reward}`, before use.

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
            str(error).splitlines()[0] if str(error) else "",
            output_dir,
            shlex.quote(repo_id),
            shlex.quote(output_dir),
            excludes,
        )
        return False
    logger.info("Uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return True
