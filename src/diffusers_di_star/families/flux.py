"""FLUX.1 (rectified-flow ``FluxTransformer2DModel``, CLIP-L pooled + T5, guidance-distilled; docs/math.md §12).

The kernel, the velocity and σ* are SD3's (:mod:`~diffusers_di_star.families.sd3`, whose family this one extends).
What FLUX adds, and what is chosen here (§12):

* packed latents: the transformer reads 2×2 patches of the (B, 16, H/8, W/8) latents as a sequence of (H/16)·(W/16)
  tokens with (text, row, column) position ids; :meth:`FluxFamily.denoise` packs and unpacks inside the network
  call (with diffusers' own ``FluxPipeline`` helpers), so the trainer sees image-shaped latents as for every family.
* π(t): SD3's shifted uniform σ, with the shift exp(μ) where μ is linear in the image sequence length at the
  training resolution, as ``FluxPipeline`` computes it from the scheduler config (``use_dynamic_shifting``; a fixed
  ``shift`` when the config has none).
* ∅ is the encoding of "" (CLIP-L pooled and T5), as ``FluxPipeline`` encodes an empty prompt.
* guidance: FLUX.1-dev has no true CFG; it was distilled to take the guidance scale g as an input. Every network
  call gets g from the conditioning: the generator and the assistant the family's ``guidance`` (default 3.5,
  ``FluxPipeline``'s; stored with the checkpoint), the CFG-enhanced reference ε̂_ref^γ is ONE call with g = γ
  (:meth:`FluxFamily.guided_eps`), and γ = 1 (no CFG: ``cfg_mode="reward"``) gives the reference g = 1. A
  transformer without the guidance embedding (FLUX.1-schnell's layout) ignores g and gets SD3's two-branch CFG.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..one_step import FlowSchedule
from .base import token_ids
from .sd3 import SD3Conditioning, SD3Family

__all__ = [
    "DEFAULT_FLUX_GUIDANCE",
    "FLUX_LORA_TARGET_MODULES",
    "FluxConditioning",
    "FluxFamily",
    "dynamic_shift",
    "encode_flux_prompts",
    "flux_velocity",
]

#: g of the generator and the assistant: ``FluxPipeline``'s default ``guidance_scale`` (FLUX.1-dev's recommended).
DEFAULT_FLUX_GUIDANCE = 3.5
#: T5 tokens of the prompt (``FluxPipeline``'s default ``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 512
#: Both streams' attention and feed-forward layers (the ``--lora_layers`` list commonly given to diffusers' FLUX
#: DreamBooth LoRA script; docs/training.md).
FLUX_LORA_TARGET_MODULES = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


@dataclass
class FluxConditioning(SD3Conditioning):
    """c: T5's ``[B, L, D]`` and CLIP-L's pooled ``[B, P]``, and the guidance g ``[B]`` the network gets; ∅: the
    empty prompt's, one row per sample, with the same g (SD3's fields and ∅, plus g)."""

    guidance: torch.Tensor

    def with_guidance(self, guidance: float) -> FluxConditioning:
        """The same prompts with g = ``guidance`` for every sample."""
        return dataclasses.replace(self, guidance=torch.full_like(self.guidance, guidance))


@torch.no_grad()
def encode_flux_prompts(
    prompts: Sequence[str],
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    guidance: float = DEFAULT_FLUX_GUIDANCE,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> FluxConditioning:
    """As ``FluxPipeline.encode_prompt``, for the prompts and "" (∅) in one call per encoder: CLIP-L's pooled output
    and T5's last hidden states (``max_sequence_length`` tokens); g = ``guidance`` for every sample."""
    texts = [*prompts, ""]
    outputs = []
    for tokenizer, text_encoder, length in zip(
        tokenizers, text_encoders, (tokenizers[0].model_max_length, max_sequence_length), strict=True
    ):
        input_ids = token_ids(tokenizer, texts, length, text_encoder.device)
        outputs.append(text_encoder(input_ids, output_hidden_states=False))
    pooled, embeds = outputs[0].pooler_output, outputs[1][0].to(text_encoders[1].dtype)
    n = len(prompts)
    guidance = torch.full((n,), float(guidance), device=embeds.device)
    return FluxConditioning(embeds[:n], pooled[:n], embeds[n:].expand(n, -1, -1), pooled[n:].expand(n, -1), guidance)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as ``FluxPipeline`` feeds them: (B, H/2 · W/2, 4C) 2×2 patches."""
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, *latents.shape)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for (B, C, ``height``, ``width``) latents."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """The (row, column) position ids of the packed tokens of (·, ·, ``height``, ``width``) latents."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(None, height // 2, width // 2, device, dtype)


def flux_velocity(
    network: Callable,
    x_t: torch.Tensor,
    sigmas: torch.Tensor,
    guidance: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """A ``FluxTransformer2DModel``'s velocity at (B, C, H, W) latents ``x_t``, in x_t's shape: x_t packed, the
    transformer called as ``FluxPipeline`` calls it (σ itself, which it multiplies by 1000; text ids of zeros; the
    packed tokens' position ids; g or ``None``), its output unpacked. x_t and σ are cast to the text embeddings' dtype;
    ``kwargs`` go to the transformer (e.g. ``joint_attention_kwargs``)."""
    height, width = x_t.shape[-2:]
    dtype = encoder_hidden_states.dtype
    output = network(
        hidden_states=pack_latents(x_t.to(dtype)),
        timestep=sigmas.to(dtype),
        guidance=guidance,
        pooled_projections=pooled_projections,
        encoder_hidden_states=encoder_hidden_states,
        txt_ids=x_t.new_zeros(encoder_hidden_states.shape[1], 3, dtype=dtype),
        img_ids=latent_image_ids(height, width, x_t.device, dtype),
        return_dict=False,
        **kwargs,
    )[0]
    return unpack_latents(output, height, width)


def dynamic_shift(scheduler_config, image_seq_len: int) -> float:
    """The σ shift of ``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` at ``image_seq_len`` packed
    tokens, μ as ``FluxPipeline`` computes it: exp(μ) (``time_shift_type="exponential"``) or μ (``"linear"``); both
    are shift_sigmas(σ, shift) of the SD3 family."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu) if scheduler_config.get("time_shift_type", "exponential") == "exponential" else mu


class FluxFamily(SD3Family):
    """FLUX.1 folders (``FluxPipeline``): a flow-matching transformer on packed latents, velocity prediction, and
    (FLUX.1-dev) a guidance embedding instead of true CFG.

    Besides the base class's arguments it takes ``guidance`` (g of the generator and the assistant),
    ``guidance_embeds`` (whether the transformer has the guidance embedding; the network config's) and
    ``max_sequence_length`` (T5 tokens).
    """

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    pipeline_name = "DIStarFluxPipeline"
    network_class_name = "FluxTransformer2DModel"
    display_name = "FLUX.1"
    hub_tag = "flux"  # as diffusers' FLUX training scripts tag their model cards
    license = ("other", "the licence of the FLUX.1 model these weights derive from (FLUX.1-dev: non-commercial)")
    lora_target_modules = FLUX_LORA_TARGET_MODULES

    def __init__(
        self,
        schedule: FlowSchedule,
        tokenizers: Sequence = (),
        text_encoders: Sequence[torch.nn.Module] = (),
        scheduler=None,
        guidance: float = DEFAULT_FLUX_GUIDANCE,
        guidance_embeds: bool = True,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        super().__init__(schedule, tokenizers, text_encoders, scheduler, max_sequence_length=max_sequence_length)
        self.guidance = float(guidance)
        self.guidance_embeds = guidance_embeds

    @classmethod
    def load_text_models(cls, name: str, revision: str | None = None, variant: str | None = None):
        """CLIP-L (``text_encoder``) and T5 (``text_encoder_2``) with their tokenizers."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        kwargs = {"revision": revision, "variant": variant}
        tokenizers = [
            AutoTokenizer.from_pretrained(name, subfolder=f"tokenizer{s}", revision=revision) for s in ("", "_2")
        ]
        text_encoders = [
            CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kwargs),
            T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", **kwargs),
        ]
        return tokenizers, text_encoders

    @classmethod
    def from_pretrained(cls, name: str, revision: str | None = None, variant: str | None = None) -> FluxFamily:
        tokenizers, text_encoders = cls.load_text_models(name, revision=revision, variant=variant)
        scheduler = cls.load_scheduler(name, revision)
        guidance_embeds = bool(cls.load_network_config(name, revision).get("guidance_embeds"))
        schedule = cls.schedule_from_scheduler(scheduler)
        return cls(schedule, tokenizers, text_encoders, scheduler, guidance_embeds=guidance_embeds)

    @classmethod
    def schedule_from_scheduler(cls, scheduler) -> FlowSchedule:
        """The flow schedule of a ``FlowMatchEulerDiscreteScheduler`` (fixed or dynamic shift: :meth:`sigma_shift`)."""
        return FlowSchedule(scheduler.config.num_train_timesteps)

    @classmethod
    def diffusers_one_step_settings(cls, conditioning_timestep) -> str:
        """At σ* = 1 diffusers' one Euler step; otherwise ``sigmas=[σ*]`` with the shift switched off; the trainer's
        g of the generator as ``guidance_scale``."""
        guidance = f"`guidance_scale={DEFAULT_FLUX_GUIDANCE}` (the generator's guidance embedding)"
        if conditioning_timestep == 1:
            return f"`num_inference_steps=1` and {guidance}"
        return (
            f"`sigmas=[{conditioning_timestep}]` on an unshifted scheduler (`use_dynamic_shifting=False`, "
            f"`shift=1.0`) and {guidance}"
        )

    def sigma_shift(self, resolution: int) -> float:
        """exp(μ) at the (resolution/16)² packed tokens of a square image with dynamic shifting, else ``shift``."""
        if self.scheduler is None or not self.scheduler.config.get("use_dynamic_shifting"):
            return self.shift
        return dynamic_shift(self.scheduler.config, (resolution // (2 * self.vae_scale_factor)) ** 2)

    def encode(self, prompts: Sequence[str], resolution: int) -> FluxConditioning:
        return encode_flux_prompts(
            prompts, self.tokenizers, self.text_encoders, self.guidance, self.max_sequence_length
        )

    def denoise(self, network: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning):
        """The transformer's velocity at (x_t, σ, c, g) (:func:`flux_velocity`; g only with the guidance embedding)."""
        guidance = cond.guidance if self.guidance_embeds else None
        return flux_velocity(network, x_t, timesteps, guidance, **cond.network_kwargs())

    def guided_eps(
        self, network: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning, guidance_scale
    ) -> torch.Tensor:
        """ε̂_ref^γ of a guidance-distilled transformer: one call with g = γ (docs/math.md §12); SD3's two-branch CFG
        for a transformer without the guidance embedding."""
        if not self.guidance_embeds:
            return super().guided_eps(network, x_t, timesteps, cond, guidance_scale)
        return self.eps(network, x_t, timesteps, cond.with_guidance(guidance_scale))

    def pipeline_kwargs(self) -> dict:
        return {
            "text_encoder": self.text_encoders[0],
            "text_encoder_2": self.text_encoders[1],
            "tokenizer": self.tokenizers[0],
            "tokenizer_2": self.tokenizers[1],
            "guidance": self.guidance,
        }
