# Copyright 2026 The diffusers-di-star authors. Licensed under the Apache License, Version 2.0.
"""`DIStarFluxPipeline`: one-step text-to-image with a DI* FLUX.1 (rectified-flow, packed-latent) generator."""

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux import FluxPipelineOutput
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .families.flux import DEFAULT_FLUX_GUIDANCE, flux_velocity
from .families.sd3 import DEFAULT_SIGMA_STAR, check_sigma_star
from .one_step import FlowSchedule, one_step_x0
from .pipeline_di_star_sdxl import MAX_IMAGE_PIXELS, DIStarSDXLPipeline, StandardFolderMixin

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_di_star import DIStarFluxPipeline

        >>> pipe = DIStarFluxPipeline.from_pretrained("path/to/di-star-flux", dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]
        ```
"""

#: FLUX `__call__` arguments that a one-step generator has no use for (warned once each, as in the SDXL pipeline).
IGNORED_FLUX_ARGUMENTS = (
    "num_inference_steps",
    "sigmas",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


class DIStarFluxPipeline(StandardFolderMixin, FluxPipeline):
    r"""
    One-step text-to-image generation with a FLUX.1-layout generator trained by DI*.

    One transformer evaluation per image: x0 = z − σ*·v_θ(z, σ*, c, g) (rectified flow, velocity prediction, the
    latents packed in 2×2 patches inside the call; see `one_step.one_step_x0`), then one VAE decode. No classifier-free
    guidance; a transformer with the guidance embedding (FLUX.1-dev's layout) gets g, the value it was trained with.
    The result equals diffusers' `FluxPipeline` with `num_inference_steps=1` and `guidance_scale=g` at σ* = 1 (its one
    Euler step from σ = 1 to 0 is exactly z − v, whatever the shift), and with `sigmas=[σ*]` on an unshifted scheduler
    (`use_dynamic_shifting=False`, `shift=1.0`) for another σ*.

    Args:
        transformer ([`FluxTransformer2DModel`]): the one-step generator g_θ.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): kept for diffusers' loaders; the one step does not use it.
        vae ([`AutoencoderKL`]), text_encoder ([`~transformers.CLIPTextModel`]), tokenizer
            ([`~transformers.CLIPTokenizer`]), text_encoder_2 ([`~transformers.T5EncoderModel`]), tokenizer_2
            ([`~transformers.T5TokenizerFast`]), image_encoder, feature_extractor: as in `FluxPipeline`.
        conditioning_timestep (`float`, defaults to 1.0): σ* ∈ (0, 1], the flow time the generator is conditioned on.
        guidance (`float`, defaults to 3.5): g, the guidance embedding the generator was trained with.
            Both are stored in `model_index.json`; plain diffusers ignores the keys.
    """

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder=None,
        feature_extractor=None,
        conditioning_timestep: float = DEFAULT_SIGMA_STAR,
        guidance: float = DEFAULT_FLUX_GUIDANCE,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(
            conditioning_timestep=check_sigma_star(conditioning_timestep), guidance=_check_guidance(guidance)
        )

    @property
    def conditioning_timestep(self) -> float:
        """σ*, the default one-step time of this generator (stored with the checkpoint)."""
        return self.config.conditioning_timestep

    @property
    def guidance(self) -> float:
        """g, the guidance embedding this generator was trained with (stored with the checkpoint)."""
        return self.config.guidance

    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    _warn_unused = staticmethod(DIStarSDXLPipeline._warn_unused)
    _batch_size = staticmethod(DIStarSDXLPipeline._batch_size)

    _standard_pipeline = FluxPipeline

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
        guidance_scale=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        max_sequence_length=None,
    ):
        """`FluxPipeline.check_inputs`, then what one step adds: the size (multiples of 16, the limit), σ*, g, the
        batch of generators and latents, the output type."""
        factor = 2 * self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} (VAE factor × 2×2 packing), got {height}×{width}."
            )
        super().check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if conditioning_timestep is not None:
            check_sigma_star(conditioning_timestep)
        if guidance_scale is not None:
            _check_guidance(guidance_scale)
        batch_size = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        latent_shape = (
            batch_size,
            self.transformer.config.in_channels // 4,
            height // factor * 2,
            width // factor * 2,
        )
        self._check_one_step_inputs(
            height, width, num_images_per_prompt, batch_size, generator, latents, latent_shape, output_type
        )

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
        conditioning_timestep: float | None = None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        r"""
        Generate images in one step.

        Args:
            prompt, prompt_2 (`str` or `list[str]`): the prompt(s) for CLIP-L and T5 (default `prompt` for both).
                Give `prompt_embeds` and `pooled_prompt_embeds` instead to reuse encodings.
            height (`int`, *optional*), width (`int`, *optional*): image size in pixels, multiples of 16 (VAE factor
                × 2×2 packing); default 1024 (`FluxPipeline`'s).
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): seeds z; one per image, or one.
            latents (`torch.Tensor`, *optional*): the noise z ~ N(0, I), NOT packed: `[B, 16, height/8, width/8]`.
            prompt_embeds (`torch.Tensor`, *optional*), pooled_prompt_embeds (`torch.Tensor`, *optional*): from
                `encode_prompt`.
            conditioning_timestep (`float`, *optional*): σ* for this call; default the one stored with the checkpoint.
            guidance_scale (`float`, *optional*): g for this call (the guidance embedding, not CFG); default the one
                stored with the checkpoint. Ignored by a transformer without the guidance embedding.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (x0 before decoding,
                `[B, 16, height/8, width/8]`, not packed).
            return_dict (`bool`, defaults to `True`): return a `FluxPipelineOutput` instead of a tuple.
            joint_attention_kwargs (`dict`, *optional*): forwarded to the transformer (e.g. `{"scale": 0.5}` for LoRA).
            callback_on_step_end (`Callable`, *optional*), callback_on_step_end_tensor_inputs (`list[str]`,
                *optional*): called once after the transformer step, as `callback_on_step_end(pipe, 0, σ*, tensors)`.
            max_sequence_length (`int`, defaults to 512): T5 tokens.
            num_inference_steps, sigmas, negative_prompt, negative_prompt_2, negative_prompt_embeds,
            negative_pooled_prompt_embeds: FLUX arguments that one step makes meaningless (`IGNORED_FLUX_ARGUMENTS`);
                accepted and ignored with one warning each (none for `num_inference_steps=1`).

        Examples:

        Returns:
            `FluxPipelineOutput` or `tuple`: the images (or latents) as the first element.
        """
        # 0. Default size and arguments that one-step generation does not use
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        arguments = locals()
        self._warn_unused({name: arguments[name] for name in IGNORED_FLUX_ARGUMENTS})

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
            guidance_scale,
            output_type,
            callback_on_step_end_tensor_inputs,
            max_sequence_length,
        )
        sigma_star = self.conditioning_timestep if conditioning_timestep is None else float(conditioning_timestep)
        self._guidance_scale = self.guidance if guidance_scale is None else float(guidance_scale)
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        self._num_timesteps = 1
        batch_size = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 2. Encode the prompt (no unconditional branch)
        lora_scale = joint_attention_kwargs.get("scale") if joint_attention_kwargs is not None else None
        prompt_embeds, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )

        # 3. Noise z, drawn in FluxPipeline's (unpacked) shape
        factor = 2 * self.vae_scale_factor
        shape = (batch_size, self.transformer.config.in_channels // 4, height // factor * 2, width // factor * 2)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device=device, dtype=prompt_embeds.dtype)

        # 4. The one step: x0 = z − σ*·v_θ(z, σ*, c, g), in the transformer's dtype (a trainer's generator may be
        # float32 next to bfloat16 text encoders)
        dtype = self.transformer.dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch_size,), self._guidance_scale, device=device, dtype=torch.float32)

        def velocity(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            return flux_velocity(
                self.transformer,
                x,
                sigmas,
                guidance,
                prompt_embeds.to(dtype),
                pooled_prompt_embeds.to(dtype),
                joint_attention_kwargs=joint_attention_kwargs,
            )

        schedule = FlowSchedule(self.scheduler.config.num_train_timesteps)
        latents = one_step_x0(velocity, latents, sigma_star, schedule).to(prompt_embeds.dtype)

        # 5. The step-end callback, decode, offload
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
        image = self._finish_one_step(
            tensors, sigma_star, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type
        )

        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)


def _check_guidance(guidance) -> float:
    """g as a float, or ``ValueError`` unless it is a finite number >= 0 (naming the value)."""
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance < float("inf"):
        raise ValueError(
            f"`guidance` (the generator's guidance embedding) must be a number >= 0, got {guidance!r}; FLUX.1-dev "
            f"is sampled with {DEFAULT_FLUX_GUIDANCE}."
        )
    return float(guidance)
