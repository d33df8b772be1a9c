# Copyright 2026 The diffusers-di-star authors. Licensed under the Apache License, Version 2.0.
"""`DIStarSD3Pipeline`: one-step text-to-image with a DI* SD3 / SD3.5 (rectified-flow transformer) generator."""

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .families.sd3 import DEFAULT_SIGMA_STAR, check_sigma_star
from .one_step import FlowSchedule, one_step_x0
from .pipeline_di_star_sdxl import MAX_IMAGE_PIXELS, DIStarSDXLPipeline, StandardFolderMixin

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_di_star import DIStarSD3Pipeline

        >>> pipe = DIStarSD3Pipeline.from_pretrained("path/to/di-star-sd35", dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]
        ```
"""

#: SD3 `__call__` arguments that a one-step generator has no use for (warned once each, as in the SDXL pipeline).
IGNORED_SD3_ARGUMENTS = (
    "num_inference_steps",
    "sigmas",
    "guidance_scale",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


class DIStarSD3Pipeline(StandardFolderMixin, StableDiffusion3Pipeline):
    r"""
    One-step text-to-image generation with an SD3 / SD3.5-layout generator trained by DI*.

    One transformer evaluation per image: x0 = z − σ*·v_θ(z, σ*, c) (rectified flow, velocity prediction; see
    `one_step.one_step_x0`), then one VAE decode. No classifier-free guidance. The result equals diffusers'
    `StableDiffusion3Pipeline` with `num_inference_steps=1` and `guidance_scale=0` at σ* = 1 (its one Euler step from
    σ = 1 to 0 is exactly z − v), and with `sigmas=[σ*]` on an unshifted scheduler for another σ*.

    Args:
        transformer ([`SD3Transformer2DModel`]): the one-step generator g_θ.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): kept for diffusers' loaders; the one step does not use it.
        vae ([`AutoencoderKL`]), text_encoder, text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`]),
            tokenizer, tokenizer_2 ([`~transformers.CLIPTokenizer`]), text_encoder_3
            ([`~transformers.T5EncoderModel`], optional), tokenizer_3 ([`~transformers.T5TokenizerFast`],
            optional), image_encoder, feature_extractor: as in `StableDiffusion3Pipeline`.
        conditioning_timestep (`float`, defaults to 1.0): σ* ∈ (0, 1], the flow time the generator is conditioned on
            (the transformer sees σ*·1000). Stored in `model_index.json`; plain diffusers ignores the key.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel = None,
        tokenizer_3: T5TokenizerFast = None,
        image_encoder=None,
        feature_extractor=None,
        conditioning_timestep: float = DEFAULT_SIGMA_STAR,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(conditioning_timestep=check_sigma_star(conditioning_timestep))

    #: T5 is optional (diffusers drops it from a saved folder's `model_index.json`; the prompt's T5 part is zeros).
    _optional_components = ["text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"]

    @property
    def conditioning_timestep(self) -> float:
        """σ*, the default one-step time of this generator (stored with the checkpoint)."""
        return self.config.conditioning_timestep

    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    _warn_unused = staticmethod(DIStarSDXLPipeline._warn_unused)
    _batch_size = staticmethod(DIStarSDXLPipeline._batch_size)

    _standard_pipeline = StableDiffusion3Pipeline

    def check_inputs(
        self,
        prompt,
        prompt_2,
        prompt_3,
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
        max_sequence_length=None,
    ):
        """`StableDiffusion3Pipeline.check_inputs`, then what one step adds: σ*, the size limit, the batch of
        generators and latents, the output type."""
        super().check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if conditioning_timestep is not None:
            check_sigma_star(conditioning_timestep)
        batch_size = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        factor = self.vae_scale_factor
        latent_shape = (batch_size, self.transformer.config.in_channels, height // factor, width // factor)
        self._check_one_step_inputs(
            height, width, num_images_per_prompt, batch_size, generator, latents, latent_shape, output_type
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        conditioning_timestep: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 256,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        r"""
        Generate images in one step.

        Args:
            prompt, prompt_2, prompt_3 (`str` or `list[str]`): the prompt(s) for CLIP-L, CLIP-G and T5 (default
                `prompt` for all). Give `prompt_embeds` and `pooled_prompt_embeds` instead to reuse encodings.
            height (`int`, *optional*), width (`int`, *optional*): image size in pixels, multiples of 16 (VAE factor
                × patch size); default the transformer's native size × 8 (1024 for SD3 / SD3.5).
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): seeds z; one per image, or one.
            latents (`torch.Tensor`, *optional*): the noise z ~ N(0, I), shape `[B, 16, height/8, width/8]`.
            prompt_embeds (`torch.Tensor`, *optional*), pooled_prompt_embeds (`torch.Tensor`, *optional*): from
                `encode_prompt(..., do_classifier_free_guidance=False)`.
            conditioning_timestep (`float`, *optional*): σ* for this call; default the one stored with the checkpoint.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (x0 before decoding).
            return_dict (`bool`, defaults to `True`): return a `StableDiffusion3PipelineOutput` instead of a tuple.
            joint_attention_kwargs (`dict`, *optional*): forwarded to the transformer (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip (`int`, *optional*): CLIP layers to skip when encoding the prompt.
            callback_on_step_end (`Callable`, *optional*), callback_on_step_end_tensor_inputs (`list[str]`,
                *optional*): called once after the transformer step, as `callback_on_step_end(pipe, 0, σ*, tensors)`.
            max_sequence_length (`int`, defaults to 256): T5 tokens.
            num_inference_steps, sigmas, guidance_scale, negative_prompt, negative_prompt_2, negative_prompt_embeds,
            negative_pooled_prompt_embeds: SD3 arguments that one step makes meaningless (`IGNORED_SD3_ARGUMENTS`);
                accepted and ignored with one warning each (none for `num_inference_steps=1`, `guidance_scale=0`).

        Examples:

        Returns:
            `StableDiffusion3PipelineOutput` or `tuple`: the images (or latents) as the first element.
        """
        # 0. Default size and arguments that one-step generation does not use
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        arguments = locals()
        self._warn_unused({name: arguments[name] for name in IGNORED_SD3_ARGUMENTS})

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
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
            max_sequence_length,
        )
        sigma_star = self.conditioning_timestep if conditioning_timestep is None else float(conditioning_timestep)
        self._guidance_scale = 0.0  # read by the parent's `do_classifier_free_guidance`
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        self._num_timesteps = 1
        batch_size = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 2. Encode the prompt (no unconditional branch)
        lora_scale = joint_attention_kwargs.get("scale") if joint_attention_kwargs is not None else None
        prompt_embeds, _, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )

        # 3. Noise z
        latents = self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 4. The one step: x0 = z − σ*·v_θ(z, σ*, c), in the transformer's dtype (a trainer's generator may be
        # float32 next to bfloat16 text encoders)
        dtype = self.transformer.dtype

        def velocity(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=x.to(dtype),
                timestep=schedule.network_timestep(sigmas),
                encoder_hidden_states=prompt_embeds.to(dtype),
                pooled_projections=pooled_prompt_embeds.to(dtype),
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]

        schedule = FlowSchedule(self.scheduler.config.num_train_timesteps)
        latents = one_step_x0(velocity, latents, sigma_star, schedule).to(prompt_embeds.dtype)

        # 5. The step-end callback, decode, offload
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
        image = self._finish_one_step(
            tensors, sigma_star, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type
        )

        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)
