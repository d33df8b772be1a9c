"""SD3 / SD3.5 (rectified-flow ``SD3Transformer2DModel``, CLIP-L + CLIP-G + optional T5; docs/math.md §12).

The kernel is x_t = (1 − σ)·x0 + σ·ε with t = σ ∈ (0, 1] and the transformer predicts the velocity ε − x0 when called
with timestep σ·1000 (:class:`~diffusers_di_star.one_step.FlowSchedule`). What is chosen here, and why (§12):

* π(t): u ~ U[t_min/N, t_max/N] on the scheduler's N = 1000 training timesteps, σ = shift·u / (1 + (shift − 1)·u)
  with the checkpoint's own ``shift`` (SD3 / SD3.5: 3.0): SDXL's uniform timesteps carried through the σ map the
  model was trained and is sampled with.
* ∅ (CFG's unconditional input) is the encoding of "" through all three encoders, as ``StableDiffusion3Pipeline``
  does; CFG on ε̂ equals CFG on the velocity (ε̂ is affine in the output with the same coefficients in both branches).
* the one-step time is σ* ∈ (0, 1], default 1.0 (pure noise): x0 = z − σ*·v_θ(z, σ*, c).
* no T5 (``text_encoder_3`` absent from the folder): its part of the prompt embeddings is zeros, as diffusers does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..one_step import FlowSchedule
from .base import ModelFamily, TensorConditioning, read_model_index, token_ids

__all__ = [
    "DEFAULT_SIGMA_STAR",
    "SD3_LORA_TARGET_MODULES",
    "SD3Conditioning",
    "SD3Family",
    "check_sigma_star",
    "encode_sd3_prompts",
    "shift_sigmas",
]

#: σ* of the one-step map for a flow model: pure noise.
DEFAULT_SIGMA_STAR = 1.0
#: The transformer's joint-attention projections (image and text streams) that diffusers' SD3 LoRA example adapts.
SD3_LORA_TARGET_MODULES = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
#: T5 tokens of the prompt (``StableDiffusion3Pipeline``'s default ``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 256


def check_sigma_star(sigma_star) -> float:
    """Return σ* as a float, or raise ``ValueError`` unless it is a number in (0, 1] (naming the value)."""
    if isinstance(sigma_star, bool) or not isinstance(sigma_star, int | float) or not 0 < sigma_star <= 1:
        raise ValueError(
            f"the one-step time of a flow model is σ* in (0, 1] (1.0 = pure noise, the default), got {sigma_star!r}; "
            "an SDXL-style integer t* such as 399 does not apply."
        )
    return float(sigma_star)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = shift·u / (1 + (shift − 1)·u), as diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 1: σ = u)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class SD3Conditioning(TensorConditioning):
    """c: CLIP-L|CLIP-G hidden states padded to the T5 width and T5's ``[B, 77 + 256, D]``, pooled ``[B, P]``;
    ∅: the empty prompt's, one row per sample."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def unconditional(self) -> SD3Conditioning:
        """∅ in the place of c (any other field, e.g. FLUX's guidance, kept)."""
        return replace(
            self, prompt_embeds=self.negative_prompt_embeds, pooled_prompt_embeds=self.negative_pooled_prompt_embeds
        )

    def network_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.prompt_embeds, "pooled_projections": self.pooled_prompt_embeds}


@torch.no_grad()
def encode_sd3_prompts(
    prompts: Sequence[str],
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    joint_attention_dim: int,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> SD3Conditioning:
    """As ``StableDiffusion3Pipeline.encode_prompt`` without clip skip, for the prompts and "" (∅) in one call per
    encoder: penultimate CLIP-L and CLIP-G hidden states concatenated and zero-padded to the T5 width, then T5's last
    hidden states (zeros of width ``joint_attention_dim`` without T5) along the sequence; pooled = both CLIP
    projections concatenated."""
    texts = [*prompts, ""]
    hidden, pooled = [], []
    for tokenizer, text_encoder in zip(tokenizers[:2], text_encoders[:2], strict=True):
        input_ids = token_ids(tokenizer, texts, tokenizer.model_max_length, text_encoder.device)
        output = text_encoder(input_ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2].to(text_encoders[0].dtype))
        pooled.append(output[0])
    clip_embeds = torch.cat(hidden, dim=-1)
    if len(text_encoders) == 3:
        input_ids = token_ids(tokenizers[2], texts, max_sequence_length, text_encoders[2].device)
        t5_embeds = text_encoders[2](input_ids)[0].to(clip_embeds.device)
    else:
        t5_embeds = clip_embeds.new_zeros(len(texts), max_sequence_length, joint_attention_dim)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    embeds, pooled_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2), torch.cat(pooled, dim=-1)
    n = len(prompts)
    return SD3Conditioning(
        embeds[:n], pooled_embeds[:n], embeds[n:].expand(n, -1, -1), pooled_embeds[n:].expand(n, -1)
    )


class SD3Family(ModelFamily):
    """SD3 and SD3.5 folders (``StableDiffusion3Pipeline``): a flow-matching transformer, velocity prediction.

    Besides the base class's arguments it takes ``joint_attention_dim`` (the T5 width the transformer reads, for the
    zeros that stand in for an absent T5) and ``max_sequence_length`` (T5 tokens).
    """

    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    pipeline_name = "DIStarSD3Pipeline"
    network_class_name = "SD3Transformer2DModel"
    display_name = "SD3 / SD3.5"
    hub_tag = "sd3"  # as diffusers' SD3 training scripts tag their model cards
    license = ("other", "the Stability AI Community License of SD3 / SD3.5, which these weights derive from")
    network_subfolder = "transformer"
    converts_lora_keys = False  # PEFT's keys, as diffusers' train_dreambooth_lora_sd3.py / _flux.py save them
    latent_channels = 16
    resolution_multiple = 16  # 2×2 patches of the latents
    default_conditioning_timestep = DEFAULT_SIGMA_STAR
    lora_target_modules = SD3_LORA_TARGET_MODULES

    def __init__(
        self,
        schedule: FlowSchedule,
        tokenizers: Sequence = (),
        text_encoders: Sequence[torch.nn.Module] = (),
        scheduler=None,
        joint_attention_dim: int = 4096,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        super().__init__(schedule, tokenizers, text_encoders, scheduler)
        self.joint_attention_dim = joint_attention_dim
        self.max_sequence_length = max_sequence_length
        self.shift = float(scheduler.config.shift) if scheduler is not None else 1.0

    @classmethod
    def load_text_models(cls, name: str, revision: str | None = None, variant: str | None = None):
        """CLIP-L, CLIP-G and, when the folder has one, T5 (``text_encoder_3``), with their tokenizers."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        kwargs = {"revision": revision, "variant": variant}
        with_t5 = any(read_model_index(name, revision).get("text_encoder_3") or ())
        suffixes = ("", "_2", "_3") if with_t5 else ("", "_2")
        tokenizers = [
            AutoTokenizer.from_pretrained(name, subfolder=f"tokenizer{s}", revision=revision) for s in suffixes
        ]
        text_encoders = [
            CLIPTextModelWithProjection.from_pretrained(name, subfolder=f"text_encoder{s}", **kwargs)
            for s in ("", "_2")
        ]
        if with_t5:
            text_encoders.append(T5EncoderModel.from_pretrained(name, subfolder="text_encoder_3", **kwargs))
        return tokenizers, text_encoders

    @classmethod
    def from_pretrained(cls, name: str, revision: str | None = None, variant: str | None = None) -> SD3Family:
        tokenizers, text_encoders = cls.load_text_models(name, revision=revision, variant=variant)
        scheduler = cls.load_scheduler(name, revision)
        joint_attention_dim = cls.load_network_config(name, revision)["joint_attention_dim"]
        schedule = cls.schedule_from_scheduler(scheduler)
        return cls(schedule, tokenizers, text_encoders, scheduler, joint_attention_dim=joint_attention_dim)

    @classmethod
    def load_scheduler(cls, name: str, revision: str | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", revision=revision)

    @classmethod
    def baseline_scheduler(cls, scheduler):
        """Flow-matching Euler on ``scheduler``'s config (its shift, or its dynamic shift), as diffusers samples."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    @classmethod
    def schedule_from_scheduler(cls, scheduler) -> FlowSchedule:
        """The flow schedule of a ``FlowMatchEulerDiscreteScheduler`` with a fixed shift (SD3 / SD3.5's)."""
        if scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                "the scheduler uses resolution-dependent (dynamic) shifting, which the sd3 family does not implement "
                "(SD3 and SD3.5 use a fixed `shift`)."
            )
        return FlowSchedule(scheduler.config.num_train_timesteps)

    @classmethod
    def check_conditioning_timestep(cls, conditioning_timestep) -> float:
        return check_sigma_star(conditioning_timestep)

    @classmethod
    def diffusers_one_step_settings(cls, conditioning_timestep) -> str:
        """At σ* = 1 diffusers' one Euler step; otherwise ``sigmas=[σ*]`` with the shift switched off."""
        if conditioning_timestep == 1:
            return "`num_inference_steps=1` and `guidance_scale=0`"
        return f"`sigmas=[{conditioning_timestep}]` on an unshifted scheduler (`shift=1.0`) and `guidance_scale=0`"

    def encode(self, prompts: Sequence[str], resolution: int) -> SD3Conditioning:
        return encode_sd3_prompts(
            prompts, self.tokenizers, self.text_encoders, self.joint_attention_dim, self.max_sequence_length
        )

    def sigma_shift(self, resolution: int) -> float:
        """The shift of σ at ``resolution`` pixels: the scheduler's fixed ``shift`` (SD3 / SD3.5: 3.0)."""
        return self.shift

    def sample_timesteps(self, batch_size: int, config, generator=None, device=None) -> torch.Tensor:
        """σ ~ π: u ~ U[min_timestep/N, max_timestep/N], σ = shift(u) with the scheduler's shift at the training
        resolution (:meth:`sigma_shift`; docs/math.md §12)."""
        n = self.schedule.num_train_timesteps
        low, high = config.min_timestep / n, config.max_timestep / n
        u = low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
        return shift_sigmas(u, self.sigma_shift(config.resolution))

    def denoise(self, network: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, cond: SD3Conditioning):
        """The transformer's velocity at (x_t, σ·1000, c), called by name (its forward takes the text first)."""
        return network(
            hidden_states=x_t.to(cond.dtype),
            timestep=self.schedule.network_timestep(timesteps),
            **cond.network_kwargs(),
            return_dict=False,
        )[0]

    def pipeline_kwargs(self) -> dict:
        tokenizers = [*self.tokenizers, None][:3]
        text_encoders = [*self.text_encoders, None][:3]
        return {
            "text_encoder": text_encoders[0],
            "text_encoder_2": text_encoders[1],
            "text_encoder_3": text_encoders[2],
            "tokenizer": tokenizers[0],
            "tokenizer_2": tokenizers[1],
            "tokenizer_3": tokenizers[2],
        }
