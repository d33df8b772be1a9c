"""The Gradio page of ``di-star serve``: a thin layer over :mod:`diffusers_di_star.demo_app`.

Typing a prompt, Enter and the Generate button are one Gradio event with ``trigger_mode="always_last"``: a page has
at most one request in flight, and what the user does meanwhile becomes one request, sent with the page's newest
values when the one in flight has shown its images. The browser orders the requests, so the page always ends on the
newest prompt, whatever the server's threads do. Errors are shown in the page's status line, never as a traceback.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import gradio as gr

from .demo_app import MAX_IMAGES, MAX_PIXELS, DemoError, ModelCache, Settings, compare, generate
from .demo_app import random_seed as new_seed

__all__ = ["build_app"]

_TITLE = "# DI\\* one-step text-to-image\nOne UNet call per image: the image follows your typing."


def _status(images, prompt: str) -> str:
    latencies = ", ".join(f"{image.seconds * 1000:.0f} ms" for image in images)
    first = images[0]
    return (
        f"**{prompt}** · {len(images)} image{'s' if len(images) > 1 else ''} {first.settings.width}×"
        f"{first.settings.height} · seed {first.seed} · latency per image: {latencies}"
    )


def build_app(
    model: str,
    compare_model: str | None = None,
    size: int = 1024,
    device: str | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    max_pixels: int | None = MAX_PIXELS,
    output_dir: str | None = None,
) -> gr.Blocks:
    """The page: live generation, seed, size, batch grid, model and LoRA pickers, PNG download, before/after."""
    cache = ModelCache(device=device, dtype=dtype, variant=variant)
    output_dir = output_dir or tempfile.mkdtemp(prefix="di-star-demo-")
    counter = itertools.count()

    def save(images) -> tuple[list, list[str]]:
        paths = [image.save(os.path.join(output_dir, f"{next(counter):06d}_{image.seed}.png")) for image in images]
        captions = [f"seed {image.seed} · {image.seconds * 1000:.0f} ms" for image in images]
        gallery = list(zip(paths, captions, strict=True))
        return gallery, paths

    def settings(prompt, model_id, lora, lora_scale, seed, randomize, width, height, num_images) -> Settings:
        seed = new_seed() if randomize else int(seed or 0)
        return Settings(
            prompt=prompt or "",
            model=model_id or "",
            seed=seed,
            width=int(width or 0),
            height=int(height or 0),
            num_images=int(num_images or 1),
            lora=(lora or "").strip() or None,
            lora_scale=float(lora_scale),
        )

    def run(*values):
        try:
            request = settings(*values)
            images = generate(cache, request, max_pixels=max_pixels)
        except DemoError as err:
            return None, None, f"⚠️ {err}", gr.skip()
        gallery, paths = save(images)
        return gallery, paths, _status(images, request.prompt), request.seed

    def run_compare(prompt, before_model, before_lora, after_model, after_lora, lora_scale, seed, randomize, w, h, n):
        try:
            before = settings(prompt, before_model, before_lora, lora_scale, seed, randomize, w, h, n)
            pair = compare(cache, before, after_model or "", after_lora, max_pixels=max_pixels)
        except DemoError as err:
            return None, None, f"⚠️ {err}"
        (before_gallery, _), (after_gallery, _) = save(pair[0]), save(pair[1])
        return before_gallery, after_gallery, "before: " + _status(pair[0], prompt) + "  \nafter: " + _status(
            pair[1], prompt
        )

    with gr.Blocks(title="DI* one-step demo") as app:
        gr.Markdown(_TITLE)
        prompt = gr.Textbox(label="Prompt", placeholder="a photo of an astronaut riding a horse on mars",
                            elem_id="prompt")
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
            randomize = gr.Checkbox(label="Random seed", value=False, elem_id="random-seed")
            width = gr.Number(label="Width", value=size, precision=0, step=8, elem_id="width")
            height = gr.Number(label="Height", value=size, precision=0, step=8, elem_id="height")
            num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images", elem_id="num-images")
        with gr.Tab("Generate"):
            with gr.Row():
                model_box = gr.Textbox(label="Model (Hub id or local folder)", value=model, elem_id="model")
                lora = gr.Textbox(label="LoRA (optional: folder or Hub id)", elem_id="lora")
                lora_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale", elem_id="lora-scale")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            status = gr.Markdown(elem_id="status")
            gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery")
            files = gr.File(label="Download PNG (settings in its metadata)", file_count="multiple",
                            elem_id="downloads")
        with gr.Tab("Before / after"):
            with gr.Row():
                before_model = gr.Textbox(label="Before: model", value=model, elem_id="before-model")
                before_lora = gr.Textbox(label="Before: LoRA (optional)", elem_id="before-lora")
                after_model = gr.Textbox(label="After: model", value=compare_model or model, elem_id="after-model")
                after_lora = gr.Textbox(label="After: LoRA (optional)", elem_id="after-lora")
            compare_button = gr.Button("Compare on the same seed", elem_id="compare")
            compare_status = gr.Markdown(elem_id="compare-status")
            with gr.Row():
                before_gallery = gr.Gallery(label="Before", format="png", elem_id="before")
                after_gallery = gr.Gallery(label="After", format="png", elem_id="after")

        gr.on(
            [prompt.input, prompt.submit, button.click, model_box.submit, lora.submit],
            run,
            [prompt, model_box, lora, lora_scale, seed, randomize, width, height, num_images],
            [gallery, files, status, seed],
            trigger_mode="always_last",  # one request in flight per page; the next is sent with the newest values
            show_progress="minimal",
        )
        compare_button.click(
            run_compare,
            [prompt, before_model, before_lora, after_model, after_lora, lora_scale, seed, randomize, width, height,
             num_images],
            [before_gallery, after_gallery, compare_status],
        )
    return app
