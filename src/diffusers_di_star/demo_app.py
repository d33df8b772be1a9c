"""The demo app's logic without a UI: a model cache, one-step generation with each image's latency, the before/after
comparison of two models on the same seed, and PNGs that carry their settings.

``demo_ui.py`` puts a Gradio page over these functions (``di-star serve``); the tests call them directly. Image ``i``
of a request is the model family's one-step pipeline (``DIStarSDXLPipeline``, ``DIStarSDPipeline``,
``DIStarSD3Pipeline``, ``DIStarFluxPipeline``) called with ``generator=torch.Generator("cpu").manual_seed(seed + i)``,
one pipeline call per image, so every image can be regenerated alone from the seed in its PNG.
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import PIL.Image
import torch
from PIL.PngImagePlugin import PngInfo

from .errors import ModelLoadError
from .runtime import default_device, default_dtype, load_pipeline

__all__ = [
    "MAX_IMAGES",
    "DemoError",
    "GeneratedImage",
    "ModelCache",
    "Settings",
    "compare",
    "generate",
    "random_seed",
    "read_png_settings",
]

#: Most images one request makes (the batch grid); a page is shared, so a typo must not queue hundreds.
MAX_IMAGES = 8
#: Largest width × height the app makes by default (2048²); ``di-star serve --max-pixels`` changes it.
MAX_PIXELS = 2048 * 2048
_SEEDS = 2**32
_PNG_KEY = "di_star"


class DemoError(ValueError):
    """A request the app cannot run; the message is shown in the page and says what to change."""


@dataclass(frozen=True)
class Settings:
    """One request: the prompt, the model (Hub id or local folder of any family: SDXL, SD1.5/2.x, SD3, FLUX.1), an
    optional LoRA and the sampling."""

    prompt: str
    model: str
    seed: int = 0
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    lora: str | None = None
    lora_scale: float = 1.0

    def check(self, max_pixels: int | None = MAX_PIXELS) -> None:
        """Raise :class:`DemoError` for a request that must not reach the model (checked before anything loads)."""
        if not self.prompt.strip():
            raise DemoError("Type a prompt.")
        if not self.model.strip():
            raise DemoError("Pick a model: a Hub id such as XDG-XHS/distar_long_1step, or a local folder.")
        if not 0 <= self.seed < _SEEDS:
            raise DemoError(f"The seed must be in [0, {_SEEDS - 1}], got {self.seed}.")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise DemoError(f"Images per request must be in [1, {MAX_IMAGES}], got {self.num_images}.")
        for name, value in (("width", self.width), ("height", self.height)):
            if value < 8 or value % 8:
                raise DemoError(f"The {name} must be a positive multiple of 8, got {value}.")
        if max_pixels is not None and self.width * self.height > max_pixels:
            raise DemoError(
                f"{self.width}×{self.height} = {self.width * self.height:,} pixels is above this app's limit of "
                f"{max_pixels:,} pixels per image: pick a smaller size."
            )

    def image_seed(self, index: int) -> int:
        """The seed of image ``index`` of this request: ``seed + index`` (modulo 2³²)."""
        return (self.seed + index) % _SEEDS


@dataclass
class GeneratedImage:
    """An image, the settings and seed that made it, and the seconds its pipeline call took."""

    image: PIL.Image.Image
    settings: Settings
    seed: int
    seconds: float

    def metadata(self) -> dict:
        """What the PNG stores: the request's settings with this image's own seed, one image."""
        return asdict(self.settings) | {"seed": self.seed, "num_images": 1, "steps": 1}

    def save(self, path: str) -> str:
        """Write the PNG with its settings as text chunks: ``di_star`` (JSON) and A1111's ``parameters`` line."""
        meta = self.metadata()
        info = PngInfo()
        info.add_text(_PNG_KEY, json.dumps(meta, sort_keys=True))
        lora = f", LoRA: {meta['lora']} ({meta['lora_scale']:g})" if meta["lora"] else ""
        info.add_text(
            "parameters",
            f"{meta['prompt']}\nSteps: 1, Sampler: DI* one-step, CFG scale: 0, Seed: {meta['seed']}, "
            f"Size: {meta['width']}x{meta['height']}, Model: {meta['model']}{lora}",
        )
        tmp = f"{path}.tmp"
        self.image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        return path


def read_png_settings(source) -> dict:
    """The settings a PNG written by :meth:`GeneratedImage.save` carries (path, file object or PIL image)."""
    image = source if isinstance(source, PIL.Image.Image) else PIL.Image.open(source)
    if _PNG_KEY not in image.info:
        raise DemoError("This PNG carries no di-star settings.")
    return json.loads(image.info[_PNG_KEY])


def random_seed() -> int:
    return secrets.randbelow(_SEEDS)


class ModelCache:
    """The last ``size`` pipelines by (model, LoRA), loaded on first use; one generation at a time (``lock``).

    ``size=2`` keeps both sides of a before/after comparison loaded. ``variant`` picks weight files (e.g. ``"fp16"``,
    as the released checkpoints ship them) where a model has them, its default files otherwise.
    """

    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        variant: str | None = None,
        size: int = 2,
        loader=load_pipeline,
    ):
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.variant = variant
        self.size = size
        self.lock = threading.Lock()
        self._loader = loader
        self._pipes: OrderedDict[tuple[str, str | None], object] = OrderedDict()

    def get(self, model: str, lora: str | None = None):
        """The pipeline of ``model`` with ``lora`` loaded (adapter ``"lora"``); errors as :class:`DemoError`."""
        key = (model.strip(), (lora or "").strip() or None)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        try:
            pipe = self._load(key[0])
        except ModelLoadError as err:
            raise DemoError(str(err).replace("--model ", "a model ")) from err
        if key[1] is not None:
            try:
                pipe.load_lora_weights(key[1], adapter_name="lora")
            except (OSError, ValueError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DemoError(
                    f"Could not load the LoRA {key[1]!r} ({reason}): pass a folder or Hub id holding "
                    "pytorch_lora_weights.safetensors, made for this model."
                ) from err
        pipe.set_progress_bar_config(disable=True)
        self._pipes[key] = pipe
        while len(self._pipes) > self.size:
            self._pipes.popitem(last=False)
        return pipe


    def _load(self, model: str):
        try:
            return self._loader(model, dtype=self.dtype, device=self.device, variant=self.variant)
        except ModelLoadError as err:
            if self.variant is None or f"variant={self.variant}" not in str(err):
                raise
        # This model has no files of the variant (e.g. a user's finetune beside a released fp16 checkpoint): its own.
        return self._loader(model, dtype=self.dtype, device=self.device)


def _attention_kwargs(pipe) -> str:
    """The call argument that takes the LoRA scale: UNet pipelines' ``cross_attention_kwargs``, transformer pipelines'
    (SD3, FLUX) ``joint_attention_kwargs``."""
    parameters = inspect.signature(pipe.__call__).parameters
    return "joint_attention_kwargs" if "joint_attention_kwargs" in parameters else "cross_attention_kwargs"


def generate(
    cache: ModelCache,
    settings: Settings,
    max_pixels: int | None = MAX_PIXELS,
) -> list[GeneratedImage]:
    """``settings.num_images`` images, one pipeline call each (seeds ``seed``, ``seed + 1``, ...), each timed."""
    settings.check(max_pixels)
    with cache.lock:
        pipe = cache.get(settings.model, settings.lora)
        scale = {_attention_kwargs(pipe): {"scale": settings.lora_scale}} if settings.lora else {}
        images = []
        for index in range(settings.num_images):
            seed = settings.image_seed(index)
            generator = torch.Generator("cpu").manual_seed(seed)
            start = time.perf_counter()
            try:
                image = pipe(
                    settings.prompt,
                    width=settings.width,
                    height=settings.height,
                    generator=generator,
                    **scale,
                ).images[0]
            except ValueError as err:  # check_inputs: names the value and the fix
                raise DemoError(str(err)) from err
            images.append(GeneratedImage(image, settings, seed, time.perf_counter() - start))
    return images


def compare(
    cache: ModelCache, before: Settings, after_model: str, after_lora: str | None = None, **kwargs
) -> tuple[list[GeneratedImage], list[GeneratedImage]]:
    """The same prompt, seeds and size through two models (e.g. a base one-step model and its DI* finetune)."""
    after = replace(before, model=after_model, lora=after_lora or None)
    after.check(kwargs.get("max_pixels", MAX_PIXELS))  # both sides checked before either loads
    return generate(cache, before, **kwargs), generate(cache, after, **kwargs)
