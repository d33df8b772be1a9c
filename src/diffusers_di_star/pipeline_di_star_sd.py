# Copyright 2026 The diffusers-di-star authors. Licensed under the Apache License, Version 2.0.
"""`DIStarSDPipeline`: one-step text-to-image with a DI* (or DMD2-style) SD1.5 / SD2.x generator."""

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput, StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import replace_example_docstring
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .one_step import DEFAULT_CONDITIONING_TIMESTEP, generate_x0
from .pipeline_di_star_sdxl import (
    MAX_BATCH_SIZE,
    MAX_IMAGE_PIXELS,
    DIStarSDXLPipeline,
    StandardFolderMixin,
    as_lcm_scheduler,
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_di_star import DIStarSDPipeline

        >>> pipe = DIStarSDPipeline.from_pretrained("path/to/di-star-sd15", dtype=torch.float16).to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]
        ```
"""

#: SD `__call__` arguments that a one-step generator has no use for (a subset of the SDXL pipeline's, same rules).
IGNORED_SD_ARGUMENTS = (
    "num_inference_steps",
    "timesteps",
    "sigmas",
    "eta",
    "guidance_scale",
    "guidance_rescale",
    "negative_prompt",
    "negative_prompt_embeds",
)


class DIStarSDPipeline(StandardFolderMixin, StableDiffusionPipeline):
    r"""
    One-step text-to-image generation with an SD1.5 / SD2.x-layout generator trained by DI* (or DMD2).

    One UNet evaluation per image, x0 = x̂0 of g_θ(z, t*, c) (see `one_step.generate_x0`; ε- or v-prediction as the
    scheduler's `prediction_type` says, e.g. SD2.1-768 is v), then one VAE decode. No classifier-free guidance. The
    result equals diffusers' `StableDiffusionPipeline` with `LCMScheduler`, `timesteps=[t*]` and `guidance_scale=0`.
    The same conventions as [`DIStarSDXLPipeline`]: `conditioning_timestep` is stored in `model_index.json`, a saved
    folder is a plain `StableDiffusionPipeline` folder, SD arguments that one step makes meaningless warn once.

    Args:
        vae ([`AutoencoderKL`]), text_encoder ([`~transformers.CLIPTextModel`]), tokenizer
            ([`~transformers.CLIPTokenizer`]): as in `StableDiffusionPipeline`.
        unet ([`UNet2DConditionModel`]): the one-step generator g_θ.
        scheduler ([`SchedulerMixin`]): only its training schedule and `prediction_type` are used; converted to an
            `LCMScheduler` with the same betas.
        safety_checker, feature_extractor, image_encoder: optional, as in `StableDiffusionPipeline`; the safety
            checker runs when given.
        requires_safety_checker (`bool`, defaults to `False`): as in `StableDiffusionPipeline` (warns when True and
            no safety checker is given).
        conditioning_timestep (`int`, defaults to 399): t*, the timestep the generator is conditioned on.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers | LCMScheduler,
        safety_checker: StableDiffusionSafetyChecker = None,
        feature_extractor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = False,
        conditioning_timestep: int = DEFAULT_CONDITIONING_TIMESTEP,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=as_lcm_scheduler(scheduler),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.default_sample_size = self.unet.config.sample_size if getattr(self, "unet", None) else 64
        self._check_conditioning_timestep(conditioning_timestep)
        self.register_to_config(conditioning_timestep=int(conditioning_timestep))

    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    # The one-step conventions shared with the SDXL pipeline (its methods use no SDXL component).
    conditioning_timestep = DIStarSDXLPipeline.conditioning_timestep
    num_train_timesteps = DIStarSDXLPipeline.num_train_timesteps
    _check_conditioning_timestep = DIStarSDXLPipeline._check_conditioning_timestep
    _batch_size = staticmethod(DIStarSDXLPipeline._batch_size)
    _warn_unused = staticmethod(DIStarSDXLPipeline._warn_unused)
    prepare_latents = DIStarSDXLPipeline.prepare_latents
    decode_latents = DIStarSDXLPipeline.decode_latents
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    max_batch_size: int | None = MAX_BATCH_SIZE

    _standard_pipeline = StableDiffusionPipeline

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_images_per_prompt=1,
        prompt_embeds=None,
        latents=None,
        generator=None,
        conditioning_timestep=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
    ):
        """Validate every argument of `__call__` with the SDXL pipeline's checks (SD has no `prompt_2` or pooled
        embeddings: ``prompt_embeds`` stands in for the pooled ones, so those two checks always pass)."""
        DIStarSDXLPipeline.check_inputs(
            self,
            prompt,
            None,
            height,
            width,
            num_images_per_prompt,
            prompt_embeds,
            prompt_embeds,
            latents,
            generator,
            conditioning_timestep,
            output_type,
            callback_on_step_end_tensor_inputs,
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        conditioning_timestep: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        eta: float | None = None,
        guidance_rescale: float | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ):
        r"""
        Generate images in one step.

        Args:
            prompt (`str` or `list[str]`): the prompt(s). Give `prompt_embeds` instead to reuse encodings.
            height (`int`, *optional*), width (`int`, *optional*): image size in pixels, multiples of the VAE factor
                (8); default the UNet's native size × 8 (512 for SD1.5, 768 for SD2.1-768).
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): seeds z; one per image, or one.
            latents (`torch.Tensor`, *optional*): the noise z ~ N(0, I), shape `[B, 4, height/8, width/8]`.
            prompt_embeds (`torch.Tensor`, *optional*): from `encode_prompt(..., do_classifier_free_guidance=False)`.
            conditioning_timestep (`int`, *optional*): t* for this call; default the one stored with the checkpoint.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (x0 before decoding).
            return_dict (`bool`, defaults to `True`): return a `StableDiffusionPipelineOutput` instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): forwarded to the UNet (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip (`int`, *optional*): CLIP layers to skip when encoding the prompt.
            callback_on_step_end (`Callable`, *optional*), callback_on_step_end_tensor_inputs (`list[str]`,
                *optional*): called once after the UNet step, as in `DIStarSDXLPipeline`.
            guidance_scale, negative_prompt, num_inference_steps, timesteps, sigmas, eta, guidance_rescale,
            negative_prompt_embeds: SD arguments that one step makes meaningless (`IGNORED_SD_ARGUMENTS`); accepted
                and ignored with one warning each (none for the one-step recipe's values).

        Examples:

        Returns:
            `StableDiffusionPipelineOutput` or `tuple`: the images (or latents) and the safety checker's flags.
        """
        # 0. Default size and arguments that one-step generation does not use
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        arguments = locals()
        self._warn_unused({name: arguments[name] for name in IGNORED_SD_ARGUMENTS})

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            num_images_per_prompt,
            prompt_embeds,
            latents,
            generator,
            conditioning_timestep,
            output_type,
            callback_on_step_end_tensor_inputs,
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
        prompt_embeds, _ = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

        # 3. Noise z
        latents = self.prepare_latents(
            batch_size, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )

        # 4. The one step: x0 = g_θ(z, c)
        latents = generate_x0(
            self.unet,
            latents,
            prompt_embeds.to(device),
            None,
            self.scheduler.alphas_cumprod,
            conditioning_timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            prediction_type=self.scheduler.config.prediction_type,
        ).to(prompt_embeds.dtype)

        if callback_on_step_end is not None:
            callback_kwargs = {"latents": latents, "prompt_embeds": prompt_embeds}
            callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
            callback_outputs = callback_on_step_end(self, 0, conditioning_timestep, callback_kwargs) or {}
            latents = callback_outputs.pop("latents", latents)

        # 5. Decode and run the safety checker (when there is one)
        has_nsfw_concept = None
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(latents)
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            denormalize = None if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)

        # 6. Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
