# Copyright 2026 The diffusers-di-star authors. Licensed under the Apache License, Version 2.0.
"""`DIStarSDXLPipeline`: one-step 1024² text-to-image with a Diff-Instruct* (or DMD2-style) SDXL generator."""

import importlib.util
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .defaults import MAX_BATCH_SIZE, MAX_IMAGE_PIXELS
from .one_step import DEFAULT_CONDITIONING_TIMESTEP, check_conditioning_timestep, decode_latents, generate_x0

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_di_star import DIStarSDXLPipeline

        >>> pipe = DIStarSDXLPipeline.from_pretrained(
        ...     "XDG-XHS/distar_long_1step", dtype=torch.float16, variant="fp16"
        ... ).to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: SDXL `__call__` arguments that a one-step generator has no use for, with the value that means "not used":
#: accepted so SDXL code runs unchanged, each ignored with one warning when given another value.
IGNORED_SDXL_ARGUMENTS = {
    "num_inference_steps": 1,
    "timesteps": None,
    "sigmas": None,
    "denoising_end": None,
    "eta": 0.0,
    "guidance_scale": 0.0,
    "guidance_rescale": 0.0,
    "negative_prompt": None,
    "negative_prompt_2": None,
    "negative_prompt_embeds": None,
    "negative_pooled_prompt_embeds": None,
    "negative_original_size": None,
    "negative_crops_coords_top_left": (0, 0),
    "negative_target_size": None,
}
_WHY_IGNORED = {
    "num_inference_steps": "DIStarSDXLPipeline generates in exactly one step (for multi-step sampling use "
    "`StableDiffusionXLPipeline` with an `LCMScheduler`)",
    "timesteps": "the one step runs at the conditioning timestep t*; pass `conditioning_timestep=` to change it",
    "sigmas": "the one step runs at the conditioning timestep t*; pass `conditioning_timestep=` to change it",
    "denoising_end": "there is a single step, so there is no denoising schedule to end early",
    "eta": "there is no sampler step to add noise to",
}
_NO_CFG = "one-step DI* generators do not use classifier-free guidance (it is distilled into the generator)"


def as_lcm_scheduler(scheduler):
    """``scheduler`` as an `LCMScheduler` with the same betas (hence ᾱ) and `prediction_type`; None and LCM pass.

    A saved one-step folder then runs in plain diffusers with `timesteps=[t*]`.
    """
    if scheduler is None or isinstance(scheduler, LCMScheduler):
        return scheduler
    # Drop the other scheduler's own options quietly, but keep the private keys: `_use_default_values` lets LCM keep
    # its defaults (e.g. clip_sample=False).
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in scheduler.config.items() if k in accepted or k.startswith("_")}
    return LCMScheduler.from_config(config)


@dataclass
class DIStarSDXLPipelineOutput(BaseOutput):
    """Output of [`DIStarSDXLPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (`output_type="pil"`, `"np"` or `"pt"`), or the latents x0 (`output_type="latent"`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class StandardFolderMixin:
    """What every DI* pipeline adds to its diffusers base class ``_standard_pipeline``: loading in float32 unless a
    dtype is given, and saving a folder whose ``model_index.json`` names the base class."""

    _standard_pipeline: ClassVar[type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, with every component in float32 when no dtype is given.

        Without a dtype, diffusers loads its models (UNet, VAE) in float32 but transformers >= 5 keeps the stored
        dtype of the text encoders, so an fp16 folder (e.g. one converted back from a ComfyUI checkpoint) would load
        as a mixed pipeline that fails with "mat1 and mat2 must have the same dtype". Pass `dtype` (or the
        deprecated `torch_dtype`) to load in another precision.
        """
        if kwargs.get("torch_dtype") is None and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float32
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _check_one_step_inputs(
        self, height, width, num_images_per_prompt, batch_size, generator, latents, latent_shape, output_type
    ) -> None:
        """What one step adds to a flow pipeline's `check_inputs`: the size limit, the batch of generators, the shape
        of `latents` (``latent_shape`` for the whole batch), the output type."""
        if self.max_image_pixels is not None and height * width > self.max_image_pixels:
            raise ValueError(
                f"{height}×{width} pixels is above `pipe.max_image_pixels` ({self.max_image_pixels:,}); pass a "
                "smaller size, or raise the limit (None lifts it)."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images: pass one per image, or one.")
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"`latents` must have shape {latent_shape}, got {tuple(latents.shape)}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

    def _finish_one_step(self, tensors: dict, sigma_star, callback_on_step_end, names, output_type):
        """After a flow pipeline's one step: the step-end callback (given the ``names`` it asked for among
        ``tensors``, which holds x0 as ``"latents"``), the decode (:func:`~diffusers_di_star.one_step.decode_latents`;
        ``"latent"``: x0 as it is), the offload. Returns the images."""
        latents = tensors["latents"]
        if callback_on_step_end is not None:
            callback_outputs = callback_on_step_end(self, 0, sigma_star, {k: tensors[k] for k in names}) or {}
            latents = callback_outputs.pop("latents", latents)
        if output_type == "latent":
            image = latents
        else:
            image = decode_latents(self.vae, latents.to(self.vae.dtype))
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return image

    def to_json_string(self) -> str:
        """`model_index.json` as diffusers writes it, with `_class_name` set to the diffusers base class.

        A saved folder is then a standard folder of its family: `DiffusionPipeline.from_pretrained`,
        `AutoPipelineForText2Image` and the Hub's widgets load it, and the DI* pipeline's `from_pretrained` still
        finds `conditioning_timestep`, which plain diffusers ignores.
        """
        model_index = json.loads(super().to_json_string())
        model_index["_class_name"] = self._standard_pipeline.__name__
        return json.dumps(model_index, indent=2, sort_keys=True) + "\n"


class DIStarSDXLPipeline(StandardFolderMixin, StableDiffusionXLPipeline):
    r"""
    One-step text-to-image generation with an SDXL-layout generator trained by Diff-Instruct* (DI*) or DMD2.

    One UNet evaluation per image: x0 = (z − σ_{t*}·ε̂_θ(z, t*, c)) / α_{t*} (see `one_step.generate_x0`), then one VAE
    decode. No classifier-free guidance: the guidance is distilled into the generator. The result equals diffusers'
    `StableDiffusionXLPipeline` with `LCMScheduler`, `timesteps=[t*]` and `guidance_scale=0`, the recipe of the
    released DI* checkpoints, without its pitfalls.

    Loads from any SDXL-layout folder or Hub id; every loader of `StableDiffusionXLPipeline` works
    (`from_pretrained`, `from_pipe`, `from_single_file`, `load_lora_weights`, `fuse_lora`) except `load_ip_adapter`,
    which is refused. A UNet with `time_cond_proj_dim` (the LCM-distilled layout) gets the guidance embedding of
    w = `guidance_scale` − 1 as diffusers' SDXL pipeline gives it (`guidance_scale` 0 by default), so the equality
    above holds for it too.

    Args:
        vae ([`AutoencoderKL`]): decodes latents to images. An fp16 VAE with `force_upcast=True` (SDXL's own, which
            overflows in fp16) is decoded in fp32, as diffusers does; the fp16-fix VAE and bf16 decode without upcast.
        text_encoder ([`~transformers.CLIPTextModel`]): SDXL's CLIP ViT-L text encoder.
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`]): SDXL's OpenCLIP bigG text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]), tokenizer_2 ([`~transformers.CLIPTokenizer`]): their tokenizers.
        unet ([`UNet2DConditionModel`]): the one-step generator g_θ, ε- or v-prediction (SDXL v-pred finetunes) as
            the scheduler's `prediction_type` says.
        scheduler ([`SchedulerMixin`]): only its training schedule (`alphas_cumprod`) and `prediction_type` are
            used. Any SDXL scheduler is converted to an `LCMScheduler` with the same betas (`as_lcm_scheduler`), so
            that a saved folder runs in plain diffusers with `timesteps=[t*]`. May be None to build the pipeline (e.g.
            only to encode prompts); a call then refuses.
        force_zeros_for_empty_prompt (`bool`, defaults to `True`): as in `StableDiffusionXLPipeline`.
        add_watermarker (`bool`, *optional*): as in `StableDiffusionXLPipeline`.
        conditioning_timestep (`int`, defaults to 399): t*, the timestep the generator is conditioned on. Stored in
            `model_index.json` by `save_pretrained`; plain diffusers ignores the key.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers | LCMScheduler,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    ):
        scheduler = as_lcm_scheduler(scheduler)
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self._check_conditioning_timestep(conditioning_timestep)
        self.register_to_config(conditioning_timestep=int(conditioning_timestep))

    @property
    def conditioning_timestep(self) -> int:
        """t*, the default conditioning timestep of this generator (stored with the checkpoint)."""
        return self.config.conditioning_timestep

    @property
    def num_train_timesteps(self) -> int:
        """Of the scheduler's training schedule; SDXL's 1000 while no scheduler is set (`scheduler=None`)."""
        return 1000 if self.scheduler is None else self.scheduler.config.num_train_timesteps

    def load_ip_adapter(self, *args, **kwargs):
        """Refused: a one-step DI* generator is not trained with image prompts, and its UNet call passes none."""
        raise NotImplementedError(
            "DIStarSDXLPipeline does not support IP-Adapters: the one-step generator was not trained with image "
            "prompts. Use StableDiffusionXLPipeline for IP-Adapter generation."
        )

    def _check_conditioning_timestep(self, conditioning_timestep) -> None:
        check_conditioning_timestep(conditioning_timestep, self.num_train_timesteps)

    _standard_pipeline = StableDiffusionXLPipeline
    #: Largest height × width accepted by `__call__`; set to None to lift the limit. See `MAX_IMAGE_PIXELS`.
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    #: Most images one `__call__` makes (prompts × num_images_per_prompt); None lifts the limit. See `MAX_BATCH_SIZE`.
    max_batch_size: int | None = MAX_BATCH_SIZE

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None):
        """Use xFormers attention; raises a clear error where xFormers or CUDA is missing.

        PyTorch's scaled-dot-product attention (the default) is already memory efficient; xFormers is optional
        (`pip install "diffusers-di-star[xformers]"`).
        """
        if importlib.util.find_spec("xformers") is None:
            raise ImportError(
                'xformers is not installed. Install it with `pip install "diffusers-di-star[xformers]"`, or keep '
                "the default PyTorch SDPA attention, which is already memory efficient."
            )
        if self.device.type != "cuda":
            raise RuntimeError(
                f"xformers attention runs on CUDA only, but this pipeline is on '{self.device.type}'. Move it first "
                "(`pipe.to('cuda')`), or keep the default PyTorch SDPA attention."
            )
        super().enable_xformers_memory_efficient_attention(attention_op)

    def check_inputs(
        self,
        prompt,
        prompt_2,
        height,
        width,
        num_images_per_prompt=1,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        latents=None,
        generator=None,
        conditioning_timestep=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
    ):
        """Validate every argument of `__call__`; each error names the value and the fix."""
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, float | np.floating):
                raise ValueError(f"`{name}` must be an integer number of pixels, got the float {value!r}.")
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < factor:
                raise ValueError(
                    f"`{name}` must be a positive multiple of the VAE factor {factor}, got {value!r}. Pass e.g. "
                    f"{self.default_sample_size * factor}, or None for the model's native size."
                )
        limit = self.max_image_pixels
        if limit is not None and height * width > limit:
            raise ValueError(
                f"{height}×{width} = {height * width:,} pixels is above the limit of {limit:,} pixels per image "
                f"(`pipe.max_image_pixels`, 4096×4096 by default; this model's native size is "
                f"{self.default_sample_size * factor}²). Pass a smaller size, or raise `pipe.max_image_pixels` (None "
                "lifts the limit) to make it anyway."
            )
        if height % factor != 0 or width % factor != 0:
            raise ValueError(
                f"`height` and `width` must be multiples of the VAE factor {factor}, got {height}×{width}. Try "
                f"{max(factor, height // factor * factor)}×{max(factor, width // factor * factor)}."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds` (with `pooled_prompt_embeds`), not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a `prompt` (a string or a list of strings) or `prompt_embeds`.")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("`prompt_2` cannot be combined with `prompt_embeds`: encode both prompts yourself.")
        for name, value in (("prompt", prompt), ("prompt_2", prompt_2)):
            if value is None:
                continue
            if isinstance(value, list):
                if len(value) == 0:
                    raise ValueError(f"`{name}` is an empty list: pass at least one prompt.")
                if not all(isinstance(p, str) for p in value):
                    raise ValueError(f"`{name}` must be a string or a list of strings, got {value!r}.")
            elif not isinstance(value, str):
                raise ValueError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}.")
        if prompt_2 is not None and isinstance(prompt_2, list):
            num_prompts = len(prompt) if isinstance(prompt, list) else 1
            if len(prompt_2) != num_prompts:
                raise ValueError(
                    f"`prompt_2` has {len(prompt_2)} prompts but `prompt` has {num_prompts}: pass one `prompt_2` "
                    "per prompt, or a single string for all."
                )
        if prompt_embeds is not None:
            if pooled_prompt_embeds is None:
                raise ValueError(
                    "`prompt_embeds` needs `pooled_prompt_embeds` from the same `encode_prompt` call: "
                    "`prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_"
                    "guidance=False)`."
                )
            if prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
                raise ValueError(
                    f"`prompt_embeds` has batch size {prompt_embeds.shape[0]} but `pooled_prompt_embeds` has "
                    f"{pooled_prompt_embeds.shape[0]}: they must come from the same prompts."
                )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        batch_size = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        if self.max_batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(
                f"{batch_size:,} images in one call (prompts × num_images_per_prompt) is above the limit of "
                f"{self.max_batch_size} (`pipe.max_batch_size`): call the pipeline several times, or raise "
                "`pipe.max_batch_size` (None lifts the limit)."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for {batch_size} images (prompts × num_images_per_prompt): pass "
                "one generator per image, or a single generator."
            )
        if latents is not None:
            expected = (batch_size, self.unet.config.in_channels, height // factor, width // factor)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` must have shape {expected} (images, channels, height/{factor}, width/{factor}), "
                    f"got {tuple(latents.shape)}."
                )
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` hold NaN or infinite values: pass finite noise (or None to draw it).")
        if conditioning_timestep is not None:
            self._check_conditioning_timestep(conditioning_timestep)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and not set(callback_on_step_end_tensor_inputs) <= set(
            self._callback_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

    @staticmethod
    def _batch_size(prompt, prompt_embeds) -> int:
        if prompt is None:
            return prompt_embeds.shape[0]
        return 1 if isinstance(prompt, str) else len(prompt)

    @staticmethod
    def _warn_unused(sdxl_arguments: dict[str, Any]) -> None:
        """One warning per SDXL argument (`IGNORED_SDXL_ARGUMENTS`) given a value that would matter to SDXL."""
        for name, value in sdxl_arguments.items():
            unused = IGNORED_SDXL_ARGUMENTS[name]
            if value is None or (name == "guidance_scale" and value in (0.0, 1.0)):  # 1.0 also disables CFG
                continue
            array = isinstance(value, torch.Tensor) or hasattr(value, "__array__")  # tensors, NumPy arrays
            if not array and (tuple(value) if isinstance(value, list) else value) == unused:
                continue
            shown = "an array" if array else repr(value)
            warnings.warn(
                f"`{name}={shown}` is ignored: {_WHY_IGNORED.get(name, _NO_CFG)}. Drop the argument.",
                UserWarning,
                stacklevel=3,
            )

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """z ~ N(0, I) in latent shape (docs/math.md §2): no scheduler-dependent scaling of the noise."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode x0 to pixels in [−1, 1], upcasting an fp16 VAE with `force_upcast=True` as diffusers does."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        try:
            image = decode_latents(self.vae, latents.to(self.vae.device, self.vae.dtype))
        finally:
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
        if self.vae.dtype == torch.float16 and torch.isnan(image).any():
            warnings.warn(
                "The VAE produced NaNs in float16. SDXL's VAE overflows in fp16: load `madebyollin/sdxl-vae-fp16-fix` "
                "as `vae=`, use bfloat16, or set `pipe.vae.config.force_upcast=True`.",
                UserWarning,
                stacklevel=2,
            )
        return image

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        conditioning_timestep: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        eta: float | None = None,
        guidance_rescale: float | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
    ):
        r"""
        Generate images in one step.

        Args:
            prompt (`str` or `list[str]`): the prompt(s). Give `prompt_embeds` instead to reuse encodings.
            prompt_2 (`str` or `list[str]`, *optional*): prompt(s) for `text_encoder_2`; default `prompt`.
            height (`int`, *optional*), width (`int`, *optional*): image size in pixels, multiples of the VAE factor
                (8); default the UNet's native size × 8 (1024 for SDXL).
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): seeds z; one per image, or one.
            latents (`torch.Tensor`, *optional*): the noise z ~ N(0, I), shape `[B, 4, height/8, width/8]`.
            prompt_embeds (`torch.Tensor`, *optional*), pooled_prompt_embeds (`torch.Tensor`, *optional*): from
                `encode_prompt(..., do_classifier_free_guidance=False)`.
            conditioning_timestep (`int`, *optional*): t* for this call; default the one stored with the checkpoint.
            original_size, crops_coords_top_left, target_size: SDXL micro-conditioning, as in
                `StableDiffusionXLPipeline`; default `(height, width)`, `(0, 0)`, `(height, width)`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (x0 before decoding).
            return_dict (`bool`, defaults to `True`): return a [`DIStarSDXLPipelineOutput`] instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): forwarded to the UNet (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip (`int`, *optional*): CLIP layers to skip when encoding the prompt.
            callback_on_step_end (`Callable`, *optional*): called once, after the UNet step, as
                `callback_on_step_end(pipe, 0, t*, callback_kwargs)`; may return replacements for its tensors.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed to the callback, from
                `_callback_tensor_inputs`; default `["latents"]`.
            guidance_scale, negative_prompt, negative_prompt_2, num_inference_steps, timesteps, sigmas,
            denoising_end, eta, guidance_rescale, negative_prompt_embeds, negative_pooled_prompt_embeds,
            negative_original_size, negative_crops_coords_top_left, negative_target_size: SDXL arguments that one
                step makes meaningless (`IGNORED_SDXL_ARGUMENTS`); accepted so SDXL code runs unchanged and ignored
                with one warning each (none for the values of the one-step recipe: `num_inference_steps=1`,
                `guidance_scale=0`, ...).

        Examples:

        Returns:
            [`DIStarSDXLPipelineOutput`] or `tuple`: the images (or latents) as the first element.
        """
        # 0. Default size and arguments that one-step generation does not use
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        arguments = locals()
        guided = self.unet.config.time_cond_proj_dim is not None  # an LCM-distilled UNet takes w as an input
        unused = [name for name in IGNORED_SDXL_ARGUMENTS if not (guided and name == "guidance_scale")]
        self._warn_unused({name: arguments[name] for name in unused})

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            num_images_per_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            latents,
            generator,
            conditioning_timestep,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        if self.scheduler is None:
            raise ValueError(
                "This pipeline has no scheduler (scheduler=None): the one-step map needs its training schedule. Set "
                "one, e.g. `pipe.scheduler = LCMScheduler.from_pretrained(model, subfolder='scheduler')`."
            )
        conditioning_timestep = self.conditioning_timestep if conditioning_timestep is None else conditioning_timestep
        self._guidance_scale = 0.0  # read by the parent's `do_classifier_free_guidance`
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self._num_timesteps = 1
        batch_size = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 2. Encode the prompt (no unconditional branch)
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs is not None else None
        prompt_embeds, _, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

        # 3. Noise z
        latents = self.prepare_latents(
            batch_size,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 4. Micro-conditioning
        text_encoder_projection_dim = (
            int(pooled_prompt_embeds.shape[-1])
            if self.text_encoder_2 is None
            else self.text_encoder_2.config.projection_dim
        )
        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        added_cond_kwargs = {
            "text_embeds": pooled_prompt_embeds.to(device),
            "time_ids": add_time_ids.to(device).repeat(batch_size, 1),
        }

        # 5. The one step: x0 = g_θ(z, c); a UNet with `time_cond_proj_dim` (LCM-distilled) gets the embedding of
        # w = guidance_scale − 1 as diffusers' SDXL pipeline gives it (default 0, the one-step recipe)
        timestep_cond = None
        if guided:
            w = torch.tensor((guidance_scale or 0.0) - 1).repeat(batch_size)
            timestep_cond = self.get_guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=latents.dtype)
        latents = generate_x0(
            self.unet,
            latents,
            prompt_embeds.to(device),
            added_cond_kwargs,
            self.scheduler.alphas_cumprod,
            conditioning_timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            prediction_type=self.scheduler.config.prediction_type,
            timestep_cond=timestep_cond,
        ).to(prompt_embeds.dtype)

        if callback_on_step_end is not None:
            callback_kwargs = {
                "latents": latents,
                "prompt_embeds": prompt_embeds,
                "add_text_embeds": added_cond_kwargs["text_embeds"],
                "add_time_ids": added_cond_kwargs["time_ids"],
            }
            callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
            callback_outputs = callback_on_step_end(self, 0, conditioning_timestep, callback_kwargs) or {}
            latents = callback_outputs.pop("latents", latents)

        # 6. Decode
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(latents)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)

        # 7. Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return DIStarSDXLPipelineOutput(images=image)
