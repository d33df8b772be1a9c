"""What the trainer needs to run unchanged under accelerate's engines: DDP (LoRA or full) and FSDP1/FSDP2 (full).

The networks are prepared as :class:`~diffusers_di_star.training.models.RoleModule` units (``DIStarNetworks.
prepare_units``); under a sharding engine every call goes through them and the full weights exist only when
gathered with ``accelerator.get_state_dict`` (all ranks call it, the main process receives them). DeepSpeed is refused
at start: accelerate keeps one DeepSpeed engine per ``Accelerator`` and the trainer has two optimised networks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel

from .models import DIStarNetworks

__all__ = [
    "check_engine",
    "clip_parameters",
    "gather_unet",
    "local_main_first",
    "prepare_networks",
]

T = TypeVar("T")

DDP_CONFIG = "examples/accelerate_configs/multi_gpu.yaml"
FSDP_CONFIG = "examples/accelerate_configs/fsdp_8gpu.yaml"


def check_engine(distributed_type: DistributedType, *, use_lora: bool, use_ema: bool, fsdp_plugin=None) -> bool:
    """Refuse, in one line, what the chosen engine cannot run; return whether it shards parameters (FSDP).

    ``fsdp_plugin`` is accelerate's (``accelerator.state.fsdp_plugin``): FSDP1 must keep the original parameters,
    because the assistant's unit mixes trained and frozen ones and the optimisers are built before ``prepare``.
    """
    if distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "DeepSpeed is not supported (accelerate runs one DeepSpeed engine per Accelerator; DI* optimises two "
            f"networks): use FSDP for full finetuning ({FSDP_CONFIG}) or DDP for LoRA ({DDP_CONFIG})."
        )
    sharded = distributed_type == DistributedType.FSDP
    if sharded and use_lora:
        raise ValueError(
            "--use_lora keeps generator, assistant and reference in one UNet, which FSDP cannot shard: run LoRA on "
            f"DDP ({DDP_CONFIG}), or drop --use_lora for full finetuning on FSDP."
        )
    if sharded and use_ema:
        raise ValueError(
            "--use_ema is not supported under FSDP yet (the EMA copy would be sharded): drop --use_ema, or use DDP "
            f"({DDP_CONFIG})."
        )
    if sharded and fsdp_plugin is not None and fsdp_plugin.fsdp_version == 1 and not fsdp_plugin.use_orig_params:
        raise ValueError(
            "FSDP1 needs `fsdp_use_orig_params: true` in the accelerate config (or use FSDP2, `fsdp_version: 2`, "
            f"as in {FSDP_CONFIG})."
        )
    return sharded


def prepare_networks(
    accelerator: Accelerator, networks: DIStarNetworks, optimizers: dict, lr_schedulers: dict, sharded: bool
) -> tuple[dict, dict]:
    """``accelerator.prepare`` the networks' units with their optimisers and schedulers; fills ``networks.prepared``.

    ``optimizers`` and ``lr_schedulers`` are keyed by role (generator, assistant). One ``prepare`` call per unit:
    FSDP2 takes one model per call, and accelerate's FSDP checkpoints pair the i-th optimiser with the i-th model.
    Three-in-one LoRA is one unit with both optimisers (DDP only, see :func:`check_engine`). Returns the prepared
    optimisers and schedulers, keyed by role.
    """
    roles = ("generator", "assistant")
    units = networks.prepare_units()
    groups = [roles] if len(units) == 1 else [(role,) for role in roles]
    networks.prepared, new_optimizers, new_schedulers = {}, {}, {}
    for unit, group in zip(units, groups, strict=True):
        prepared = accelerator.prepare(unit, *(optimizers[r] for r in group), *(lr_schedulers[r] for r in group))
        new_optimizers.update(zip(group, prepared[1 : 1 + len(group)], strict=True))
        new_schedulers.update(zip(group, prepared[1 + len(group) :], strict=True))
        networks.prepared.update(dict.fromkeys(unit.roles, prepared[0]))
    networks.route_frozen_calls = sharded
    return new_optimizers, new_schedulers


def clip_parameters(networks: DIStarNetworks, role: str) -> list[torch.nn.Parameter]:
    """The parameters to clip and log the gradient norm of, taken after ``prepare``.

    Under sharding, all of the role's prepared unit (frozen ones have no gradient): accelerate's ``clip_grad_norm_``
    recognises a whole FSDP1 module and then computes the norm across shards; FSDP2's are DTensors.
    """
    if networks.route_frozen_calls:
        return list(networks.prepared[role].parameters())
    return networks.trainable_parameters(role)


def gather_unet(accelerator: Accelerator, networks: DIStarNetworks, role: str) -> UNet2DConditionModel | None:
    """``role``'s UNet with its full weights, for validation, checkpoints and the export; all ranks must call it.

    Without sharding that is the bare UNet itself, with ``role`` activated. Under sharding the prepared unit's state
    dict is gathered (``accelerator.get_state_dict``) and loaded into a fresh UNet on the main process; the other
    ranks get ``None``.
    """
    if not networks.route_frozen_calls:
        return networks.activate(role)
    unit = networks.prepared[role]
    state_dict = accelerator.get_state_dict(unit)
    if not accelerator.is_main_process:
        return None
    prefix = f"{role}."  # RoleModule's keys
    state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(networks.bare_unet(role).config)
    unet.load_state_dict(state_dict, strict=True, assign=True)
    return unet.eval()


def local_main_first(accelerator: Accelerator, load: Callable[[], T]) -> T:
    """``load()`` on each node's main process first, then on the others (e.g. from the cache it filled).

    An error on the main process is raised there after the barrier, so the other ranks do not wait forever: they
    run ``load()`` themselves and fail the same way.
    """
    result, error = None, None
    if accelerator.is_local_main_process:
        try:
            result = load()
        except Exception as exception:  # re-raised below, after the other ranks are released
            error = exception
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    return result if accelerator.is_local_main_process else load()
