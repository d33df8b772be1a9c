"""The three DI* networks (docs/math.md §2) and how they share weights (docs/training.md, "LoRA").

The networks are any family's denoiser (an SD/SDXL ``UNet2DConditionModel``, a transformer; ``families/``); "UNet"
below means that network.

* LoRA: generator g_θ and assistant s_ψ are two peft adapters on ONE network and the reference s_ref is that network
  with its adapters disabled. When the generator starts from a different full UNet (DMD2), it is a second UNet with
  its own adapter; assistant and reference still share the base.
* Full finetuning: separate copies; the reference is frozen.

Frozen weights are kept in the weight dtype, trainable ones in float32. :meth:`DIStarNetworks.unet` switches the
adapters for a role; a loss must be backpropagated before another role is used on the same UNet, because peft
toggles ``requires_grad`` on switching (gradients of a graph built under another adapter are silently dropped) and
gradient checkpointing recomputes the forward under the *current* adapter.

Every engine (DDP, FSDP1, FSDP2) wraps :class:`RoleModule` units (DMD2's layout): one per trained role, each holding
the UNets its roles run on and taking the role as its forward's first argument, so that a sharding engine sees every
call of its parameters (no-grad and input-gradient calls included) inside its own wrapped ``forward``.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor

from .config import DIStarConfig

__all__ = ["ROLES", "DIStarNetworks", "RoleModule", "setup_networks"]

#: g_θ, s_ψ and s_ref.
ROLES = ("generator", "assistant", "reference")


@dataclass
class DIStarNetworks:
    """g_θ, s_ψ, s_ref; with LoRA some are the same module with a different adapter (``None`` = adapters off).

    ``prepared`` maps a role to the ``accelerator.prepare``-d :class:`RoleModule` that runs it (see
    :meth:`prepare_units`). A role's *training* forward always goes through it. Frozen evaluations go through it too
    when ``route_frozen_calls`` is set (sharding engines: the bare module holds only this rank's shard); otherwise
    (DDP, one process) they call the bare module, so no gradient-sync hook waits on them.
    """

    generator_unet: torch.nn.Module
    assistant_unet: torch.nn.Module
    reference_unet: torch.nn.Module
    generator_adapter: str | None = None
    assistant_adapter: str | None = None
    prepared: dict[str, torch.nn.Module] = field(default_factory=dict)
    route_frozen_calls: bool = False

    @property
    def use_lora(self) -> bool:
        return self.generator_adapter is not None

    @property
    def shares_one_unet(self) -> bool:
        """LoRA's three-in-one layout: g_θ, s_ψ and s_ref are adapters (or none) on a single UNet."""
        return self.generator_unet is self.assistant_unet

    def bare_unet(self, role: str) -> torch.nn.Module:
        """The unwrapped UNet that plays ``role`` (adapters not switched)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
        return getattr(self, f"{role}_unet")

    def adapter(self, role: str) -> str | None:
        return {"generator": self.generator_adapter, "assistant": self.assistant_adapter}.get(role)

    def activate(self, role: str) -> torch.nn.Module:
        """Activate ``role``'s adapter (or disable adapters for the reference) and return its bare UNet."""
        unet = self.bare_unet(role)
        if getattr(unet, "peft_config", None):
            adapter = self.adapter(role)
            if adapter is None:
                unet.disable_adapters()
            else:
                unet.enable_adapters()
                unet.set_adapter(adapter)
        return unet

    def unet(self, role: str, train: bool = False) -> Callable[..., tuple[torch.Tensor, ...]]:
        """Activate ``role`` and return what to call with the UNet's arguments.

        With ``train=True`` (the forward whose backward updates the role's parameters), or for every call when
        ``route_frozen_calls`` is set, that is the role's prepared module with the role bound as first argument.
        """
        unet = self.activate(role)
        if role in self.prepared and (train or self.route_frozen_calls):
            return functools.partial(self.prepared[role], role)
        return unet

    def prepare_units(self) -> list[RoleModule]:
        """The modules to hand to ``accelerator.prepare``, one per optimiser, in the order (generator, assistant).

        Three-in-one LoRA is one unit for all roles (its two adapters live in one module, so only a replicating
        engine such as DDP can wrap it); otherwise g_θ is one unit and s_ψ with s_ref (DMD2's "guidance") another.
        """
        if self.shares_one_unet:
            return [RoleModule(self, ROLES)]
        return [RoleModule(self, ("generator",)), RoleModule(self, ("assistant", "reference"))]

    def trainable_parameters(self, role: str) -> list[torch.nn.Parameter]:
        """θ (``"generator"``) or ψ (``"assistant"``): the LoRA weights of the role's adapter, or the whole UNet."""
        if role == "reference":
            raise ValueError("the reference network is frozen: it has no trainable parameters")
        unet, adapter = self.bare_unet(role), self.adapter(role)
        if adapter is None:
            return list(unet.parameters())
        return [p for name, p in unet.named_parameters() if f".{adapter}." in name]

    def lora_state_dict(
        self, role: str, unet: torch.nn.Module | None = None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The role's LoRA with PEFT's keys (``<module>.lora_A.weight``), and its peft config as metadata: what the
        family's ``save_lora_weights`` takes.

        Taken from ``unet`` when given (a gathered copy, see ``engine.gather_unet``), else from the role's own UNet;
        FSDP2's shards of the latter are gathered, so then every rank must call this.
        """
        unet, adapter = (self.bare_unet(role) if unet is None else unet), self.adapter(role)
        # peft's get_peft_model_state_dict, by parameter name: it matches modules structurally and finds nothing once
        # FSDP2's activation checkpointing has wrapped the blocks (a `_checkpoint_wrapped_module.` level).
        marker = f".{adapter}."
        state_dict = {
            name.replace(_CHECKPOINT_PREFIX, "").replace(marker, "."): p.detach()
            for name, p in unet.named_parameters()
            if marker in name
        }
        state_dict = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state_dict.items()}
        return state_dict, unet.peft_config[adapter].to_dict()


class RoleModule(torch.nn.Module):
    """Some of g_θ, s_ψ, s_ref behind one ``forward(role, *unet_args, **unet_kwargs)``: the unit an engine wraps.

    Its state dict keys are ``<role>.<UNet key>`` (a UNet shared by two roles appears under both).
    """

    def __init__(self, networks: DIStarNetworks, roles: tuple[str, ...]):
        super().__init__()
        self.roles = tuple(roles)
        for role in self.roles:
            self.add_module(role, networks.bare_unet(role))
        self._activate = networks.activate  # a bound method, not a submodule

    def forward(self, role: str, *args, **kwargs):
        if role not in self.roles:
            raise ValueError(f"this unit runs {self.roles}, not {role!r}")
        self._activate(role)
        return getattr(self, role)(*args, **kwargs)


def setup_networks(
    config: DIStarConfig,
    reference_unet: torch.nn.Module,
    generator_unet: torch.nn.Module | None = None,
    weight_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    separate_bases: bool = False,
) -> DIStarNetworks:
    """Build g_θ, s_ψ, s_ref from the reference network (e.g. SDXL base) and optionally a generator init (DMD2).

    Modifies ``reference_unet`` (and ``generator_unet``) in place: frozen weights are cast to ``weight_dtype``,
    adapters are added in float32. Without LoRA, g_θ and s_ψ are float32 copies; s_ψ always starts as s_ref (§2).
    ``separate_bases`` (for sharding engines, which wrap each trained role in its own unit) gives LoRA's generator its
    own copy of the base, as when it starts from a different UNet; assistant and reference still share one.
    """
    reference_unet.requires_grad_(False).to(dtype=weight_dtype)
    if config.use_lora and separate_bases and generator_unet is None:
        generator_unet = copy.deepcopy(reference_unet)
    if generator_unet is not None:
        generator_unet.requires_grad_(False).to(dtype=weight_dtype)
    if config.use_lora:
        generator_base = reference_unet if generator_unet is None else generator_unet
        generator_base.add_adapter(_lora_config(config, "generator"), adapter_name="generator")
        with warnings.catch_warnings():  # two adapters on one UNet is the design: peft's "multiple adapters" warning
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            reference_unet.add_adapter(_lora_config(config, "assistant"), adapter_name="assistant")
        networks = DIStarNetworks(
            generator_base,
            reference_unet,
            reference_unet,
            generator_adapter="generator",
            assistant_adapter="assistant",
        )
    else:
        generator = copy.deepcopy(reference_unet if generator_unet is None else generator_unet)
        networks = DIStarNetworks(generator, copy.deepcopy(reference_unet), reference_unet)
    if gradient_checkpointing:
        # The frozen reference too: the score term backpropagates through its input (§4), so without checkpointing
        # its activations are kept whole. One UNet playing several roles is enabled once.
        unets = (networks.bare_unet(role) for role in ("generator", "assistant", "reference"))
        for unet in {id(unet): unet for unet in unets}.values():
            unet.enable_gradient_checkpointing()
    for role in ("generator", "assistant"):
        unet = networks.bare_unet(role)
        unet.train()
        if not config.use_lora:
            unet.to(dtype=torch.float32)
        for parameter in networks.trainable_parameters(role):
            parameter.requires_grad_(True)
        cast_training_params(unet, dtype=torch.float32)
    return networks


def _lora_config(config: DIStarConfig, role: str) -> LoraConfig:
    return LoraConfig(
        r=getattr(config, f"{role}_lora_rank"),
        lora_alpha=getattr(config, f"{role}_lora_alpha"),
        init_lora_weights="gaussian",
        target_modules=list(getattr(config, f"{role}_lora_target_modules")),
    )
