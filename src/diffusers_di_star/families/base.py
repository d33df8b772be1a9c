"""The family seam: what a diffusion model family gives DI* (``docs/math.md`` §12, ``docs/training.md``).

DI* needs three things from a model: a Gaussian forward kernel x_t = α_t·x0 + σ_t·ε, a network output that converts
to ε̂ (hence to the score −ε̂/σ_t and to x̂0), and prompt / no-prompt conditioning. A :class:`ModelFamily` holds those
for one kind of checkpoint (its schedule and prediction type, read from the checkpoint's scheduler config, and its
text encoders); the objective (``training/steps.py``), the networks (``training/models.py``) and the trainer only
talk to it.

How a new family plugs in
-------------------------
1. Add ``families/<name>.py`` with a subclass of :class:`ModelFamily` and a conditioning dataclass:

   * the conditioning implements :class:`Conditioning`: ``batch_size``, ``dtype``, ``device``, ``unconditional()``
     (∅: SDXL zeros its embeddings, SD1.5/SD3 encode ""), ``cat(other)`` (one batch for CFG's two branches),
     ``empty(batch_size, device)`` (its shapes only: the trainer's FLOP count runs on the meta device) and
     ``network_kwargs()`` (the keyword arguments of the network's forward besides x_t and the timestep); a dataclass
     of tensors gets all but ``unconditional`` and ``network_kwargs`` from :class:`TensorConditioning`;
   * class attributes: ``name`` (the ``--family`` word), ``pipeline_class_names`` (the ``_class_name`` values of a
     ``model_index.json`` that mean this family; the first is diffusers' multi-step pipeline, for baselines),
     ``network_class_name`` (diffusers' class of the network, e.g. ``UNet2DConditionModel``), ``network_subfolder``
     (``"unet"`` / ``"transformer"``),
     ``latent_channels``, ``default_conditioning_timestep``, ``lora_target_modules``, ``pipeline_name`` (its one-step
     ``DIStar*Pipeline``, a name the package exports: :meth:`ModelFamily.pipeline_class` imports it on use, so a
     family module never imports a pipeline module, which imports the family's helpers), and for the model card
     ``display_name``, ``hub_tag`` and ``license``;
   * class method ``load_text_models(name, revision, variant)`` → (tokenizers, text encoders);
   * methods: ``encode(prompts, resolution)`` → a conditioning, and ``pipeline_kwargs()`` (the pipeline's keyword
     arguments besides the VAE, the network, the scheduler and t*: its text models).
   Override :meth:`ModelFamily.load_scheduler` / :meth:`ModelFamily.schedule_from_scheduler` for a non-VP schedule
   (e.g. :class:`~diffusers_di_star.one_step.FlowSchedule`), :meth:`ModelFamily.sample_timesteps` for another π(t),
   :meth:`ModelFamily.denoise` if the network is not called as ``network(x_t, timestep, **cond.network_kwargs())``,
   :meth:`ModelFamily.guided_eps` if CFG is not two branches (a guidance-distilled model: one call with γ),
   :meth:`ModelFamily.baseline_scheduler` if the multi-step baseline does not sample with VP Euler,
   and :meth:`ModelFamily.save_lora_weights` / :meth:`ModelFamily.load_lora_state_dict` if its LoRA is not
   ``unet_lora_layers``.
2. Register the class in ``families/__init__.py`` (:data:`~diffusers_di_star.families.FAMILIES`); detection by
   ``model_index.json`` then finds it for the trainer, ``di-star generate`` and ``di-star eval``.
3. Add a tiny offline version to ``testing.py`` and run the family tests on it (conversions, one-step pipeline equal
   to diffusers' own, Theorem 3.1 for its parameterisation, the trainer for 2–3 steps).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

import diffusers
import torch
from diffusers.utils import convert_state_dict_to_diffusers

from ..defaults import DEFAULT_LORA_TARGET_MODULES
from ..losses import cfg_eps, sample_timesteps
from ..one_step import DEFAULT_CONDITIONING_TIMESTEP, FlowSchedule, VPSchedule, one_step_x0, output_to_eps

__all__ = ["DEFAULT_LORA_TARGET_MODULES", "Conditioning", "ModelFamily", "read_model_index", "token_ids"]


def token_ids(tokenizer, texts: Sequence[str], max_length: int, device) -> torch.Tensor:
    """``texts`` as the diffusers pipelines tokenize a prompt: padded and truncated to ``max_length`` tokens."""
    return tokenizer(
        list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def read_model_index(name: str, revision: str | None = None) -> dict:
    """``model_index.json`` of a Diffusers folder or Hub id (raises ``OSError`` as ``from_pretrained`` would)."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(name, revision=revision))


class Conditioning(Protocol):
    """c of docs/math.md §1 for one family: what a network call needs besides x_t and t."""

    @property
    def batch_size(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def unconditional(self) -> Conditioning:
        """∅, the family's no-prompt input, same batch size."""

    def cat(self, other: Conditioning) -> Conditioning:
        """``self`` then ``other`` in one batch."""

    def empty(self, batch_size: int, device: torch.device | str) -> Conditioning:
        """Uninitialised float32 tensors of the same per-sample shapes, ``batch_size`` samples, on ``device``."""

    def network_kwargs(self) -> dict:
        """Keyword arguments of the network's forward (e.g. ``encoder_hidden_states``)."""


class TensorConditioning:
    """What every family's conditioning dataclass shares: its fields are tensors with the batch first, and
    ``prompt_embeds`` gives the batch size, dtype and device (the :class:`Conditioning` protocol)."""

    prompt_embeds: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embeds.dtype

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    def cat(self, other):
        """``self`` then ``other`` in one batch, field by field."""
        return type(self)(*(torch.cat([a, b]) for a, b in zip(self._tensors(), other._tensors(), strict=True)))

    def empty(self, batch_size: int, device: torch.device | str):
        """Uninitialised float32 tensors of the same per-sample shapes, ``batch_size`` samples, on ``device`` (e.g. the
        meta device, where ``training/throughput.py`` counts FLOPs without memory)."""
        shapes = ((batch_size, *t.shape[1:]) for t in self._tensors())
        return type(self)(*(torch.empty(shape, device=device, dtype=torch.float32) for shape in shapes))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))


class ModelFamily:
    """One model family's frozen non-network parts: its schedule (with prediction type) and its text models.

    Build it with :meth:`from_pretrained` (a Diffusers folder or Hub id) or directly from components
    (``SDXLFamily(VPSchedule.from_scheduler(scheduler), tokenizers, text_encoders, scheduler)``). ``scheduler`` (the
    diffusers scheduler) is only needed to build a pipeline. See the module docstring for what a subclass provides.
    """

    name: ClassVar[str]
    pipeline_class_names: ClassVar[tuple[str, ...]]
    pipeline_name: ClassVar[str]
    network_class_name: ClassVar[str]
    network_subfolder: ClassVar[str] = "unet"
    #: LoRA keys saved as Diffusers' training scripts save them for this network: UNets through
    #: ``convert_state_dict_to_diffusers`` (``to_q.lora.down``), transformers with PEFT's own keys (``lora_A``).
    converts_lora_keys: ClassVar[bool] = True
    latent_channels: ClassVar[int] = 4
    vae_scale_factor: ClassVar[int] = 8
    #: What a training resolution must be a multiple of: the VAE factor, times the patch size of a transformer.
    resolution_multiple: ClassVar[int] = 8
    default_conditioning_timestep: ClassVar = DEFAULT_CONDITIONING_TIMESTEP
    lora_target_modules: ClassVar[tuple[str, ...]] = DEFAULT_LORA_TARGET_MODULES
    #: For the model card (``hub.write_model_card``): what the model is, its Hub tag, its licence (Hub id, sentence).
    display_name: ClassVar[str] = "diffusion"
    hub_tag: ClassVar[str | None] = None
    license: ClassVar[tuple[str, str]] = ("other", "the licence of the base model")

    def __init__(
        self,
        schedule: VPSchedule | FlowSchedule,
        tokenizers: Sequence = (),
        text_encoders: Sequence[torch.nn.Module] = (),
        scheduler=None,
    ):
        self.schedule = schedule
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.scheduler = scheduler

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    # ---- what a subclass provides ----------------------------------------------------------------------------

    @classmethod
    def network_class(cls) -> type[torch.nn.Module]:
        """``diffusers.<network_class_name>``."""
        return getattr(diffusers, cls.network_class_name)

    @classmethod
    def pipeline_class(cls) -> type:
        """The one-step pipeline, ``diffusers_di_star.<pipeline_name>``."""
        return getattr(importlib.import_module(__package__.rpartition(".")[0]), cls.pipeline_name)

    @classmethod
    def base_pipeline_class(cls) -> type:
        """diffusers' multi-step pipeline of the family (the first of ``pipeline_class_names``), for baselines."""
        return getattr(diffusers, cls.pipeline_class_names[0])

    @classmethod
    def load_text_models(cls, name: str, revision: str | None = None, variant: str | None = None):
        raise NotImplementedError

    def encode(self, prompts: Sequence[str], resolution: int) -> Conditioning:
        raise NotImplementedError

    def pipeline_kwargs(self) -> dict:
        raise NotImplementedError

    # ---- loading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name: str, revision: str | None = None, variant: str | None = None) -> ModelFamily:
        """The scheduler (schedule and prediction type) and text models of a Diffusers folder or Hub id."""
        tokenizers, text_encoders = cls.load_text_models(name, revision=revision, variant=variant)
        scheduler = cls.load_scheduler(name, revision)
        return cls(cls.schedule_from_scheduler(scheduler), tokenizers, text_encoders, scheduler)

    @classmethod
    def load_scheduler(cls, name: str, revision: str | None = None):
        """The training scheduler; a DDPM scheduler reads any VP ``scheduler_config.json`` (betas, prediction type)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(name, subfolder="scheduler", revision=revision)

    @classmethod
    def schedule_from_scheduler(cls, scheduler) -> VPSchedule | FlowSchedule:
        return VPSchedule.from_scheduler(scheduler)

    @classmethod
    def baseline_scheduler(cls, scheduler):
        """The sampler of a multi-step baseline (``di-star eval`` with steps > 1): Euler on ``scheduler``'s schedule
        (a one-step folder keeps its training schedule as an ``LCMScheduler``)."""
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(scheduler.config)

    @classmethod
    def load_network(cls, name: str, revision: str | None = None, variant: str | None = None) -> torch.nn.Module:
        return cls.network_class().from_pretrained(
            name, subfolder=cls.network_subfolder, revision=revision, variant=variant
        )

    @classmethod
    def load_generator(
        cls, name: str, base_model: str | None = None, weight_name: str | None = None, variant: str | None = None
    ) -> torch.nn.Module:
        """A generator init (``--pretrained_generator``): here a Diffusers pipeline folder or Hub id (its network
        subfolder) or a network folder; a family that reads more layouts (SDXL: DMD2 files) overrides this."""
        import os

        if weight_name is not None:
            raise ValueError(
                f"--pretrained_generator_weight_name: the {cls.name} family loads a generator from a Diffusers "
                "pipeline or UNet folder (or Hub id) only; pass that instead of one weights file."
            )
        is_network_folder = os.path.isfile(os.path.join(name, "config.json"))
        subfolder = None if is_network_folder else cls.network_subfolder
        return cls.network_class().from_pretrained(name, subfolder=subfolder, variant=variant)

    @classmethod
    def check_conditioning_timestep(cls, conditioning_timestep):
        """Return t* of the one-step map, or raise ``ValueError`` naming it (VP: an integer in [0, 1000))."""
        from ..one_step import check_conditioning_timestep

        check_conditioning_timestep(conditioning_timestep)
        return conditioning_timestep

    @classmethod
    def check_resolution(cls, resolution: int) -> None:
        """Raise ``ValueError`` naming ``resolution`` unless it is a multiple of :attr:`resolution_multiple`."""
        if resolution % cls.resolution_multiple:
            raise ValueError(
                f"--resolution {resolution}: the {cls.name} family needs a multiple of {cls.resolution_multiple} "
                f"(VAE factor {cls.vae_scale_factor} × the network's patch size), e.g. "
                f"{max(cls.resolution_multiple, resolution // cls.resolution_multiple * cls.resolution_multiple)}."
            )

    @classmethod
    def diffusers_one_step_settings(cls, conditioning_timestep) -> str:
        """How diffusers' own pipeline gives the same one step (for model cards): VP, LCM at t*, no guidance."""
        return f"`LCMScheduler`, `timesteps=[{conditioning_timestep}]` and `guidance_scale=0`"

    @classmethod
    def load_network_config(cls, name: str, revision: str | None = None) -> dict:
        """The network's config (a few kB), e.g. to check LoRA targets on the meta device."""
        return dict(cls.network_class().load_config(name, subfolder=cls.network_subfolder, revision=revision))

    def to(self, device, dtype: torch.dtype | None = None) -> ModelFamily:
        """Move the schedule, and the frozen text encoders (``requires_grad`` off) in ``dtype``, to ``device``."""
        self.schedule = self.schedule.to(device)
        for text_encoder in self.text_encoders:
            text_encoder.requires_grad_(False).to(device, dtype=dtype)
        return self

    # ---- the network in DI*'s terms ----------------------------------------------------------------------------

    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, int, int, int]:
        size = resolution // self.vae_scale_factor
        return (batch_size, self.latent_channels, size, size)

    def sample_timesteps(self, batch_size: int, config, generator=None, device=None) -> torch.Tensor:
        """t ~ π(t): U{min_timestep, …, max_timestep} of the ``DIStarConfig`` (docs/math.md §5)."""
        return sample_timesteps(batch_size, config.min_timestep, config.max_timestep, generator, device)

    def coefficients(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) of the forward kernel, shaped to broadcast against ``like``."""
        return self.schedule.coefficients(timesteps, like)

    def denoise(self, network: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning):
        """The network's raw output at (x_t, t, c); x_t is cast to the conditioning's dtype."""
        return network(
            x_t.to(cond.dtype), self.schedule.network_timestep(timesteps), **cond.network_kwargs(), return_dict=False
        )[0]

    def eps(self, network: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning):
        """ε̂(x_t, t, c): :meth:`denoise` converted by the prediction type (docs/math.md §12)."""
        output = self.denoise(network, x_t, timesteps, cond)
        alpha_t, sigma_t = self.coefficients(timesteps, output)
        return output_to_eps(output, x_t, alpha_t, sigma_t, self.prediction_type)

    def guided_eps(
        self, network: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        """ε̂^γ(x_t, t, c), the CFG-enhanced reference (docs/math.md §4 Choice 2): the unconditional (∅) and
        conditional outputs in one batch, combined by :func:`~diffusers_di_star.losses.cfg_eps`; plain ε̂ at γ = 1. A
        guidance-distilled family (FLUX.1-dev) overrides this with one call that gives γ to the network."""
        if guidance_scale == 1:
            return self.eps(network, x_t, timesteps, cond)
        both = self.eps(network, torch.cat([x_t, x_t]), timesteps.repeat(2), cond.unconditional().cat(cond))
        eps_uncond, eps_cond = both.chunk(2)
        return cfg_eps(eps_uncond, eps_cond, guidance_scale)

    def generate_x0(self, network: Callable, noise: torch.Tensor, cond: Conditioning, conditioning_timestep):
        """The one-step map x0 = g_θ(z, c) (:func:`~diffusers_di_star.one_step.one_step_x0`)."""
        noise = noise.to(cond.dtype)
        return one_step_x0(lambda x, t: self.denoise(network, x, t, cond), noise, conditioning_timestep, self.schedule)

    # ---- pipelines and LoRA files ------------------------------------------------------------------------------

    def build_pipeline(self, network: torch.nn.Module, vae, conditioning_timestep):
        """The family's one-step pipeline around a generator network (validation images, the export)."""
        return self.pipeline_class()(
            vae=vae,
            **self.pipeline_kwargs(),
            **{self.network_subfolder: network},
            scheduler=self.scheduler,
            conditioning_timestep=conditioning_timestep,
        )

    @classmethod
    def save_lora_weights(cls, folder: str, state_dict: dict, metadata: dict) -> None:
        """A network LoRA (PEFT keys, ``get_peft_model_state_dict``'s) as ``pytorch_lora_weights.safetensors``, in the
        key layout of Diffusers' training scripts for this network (:attr:`converts_lora_keys`), which its pipeline's
        ``load_lora_weights`` reads in full (SD3's and FLUX's drop the ``lora.down`` keys of a UNet-style file when its
        first key is PEFT's)."""
        if cls.converts_lora_keys:
            state_dict = convert_state_dict_to_diffusers(state_dict)
        cls.pipeline_class().save_lora_weights(
            folder,
            **{f"{cls.network_subfolder}_lora_layers": state_dict},
            **{f"{cls.network_subfolder}_lora_adapter_metadata": metadata},
        )

    @classmethod
    def load_lora_state_dict(cls, folder: str) -> dict:
        """The network's LoRA from a :meth:`save_lora_weights` folder, keys without the ``unet.`` prefix."""
        loaded = cls.pipeline_class().lora_state_dict(folder)  # (state_dict, alphas) for UNets, a dict for SD3
        state_dict = loaded[0] if isinstance(loaded, tuple) else loaded
        prefix = f"{cls.network_subfolder}."
        return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
