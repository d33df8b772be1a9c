"""The engine room (docs/training.md, "Multi-GPU and multi-node"): everything the trainer does differently per engine.

One branch per engine, chosen from accelerate's state (:func:`engine_name`): one process or DDP (replicated
modules), FSDP2 and FSDP1 (sharded :class:`~diffusers_di_star.training.models.RoleModule` units; every network call
goes through them and the full weights exist only when gathered with ``accelerator.get_state_dict``), DeepSpeed
(refused at start, :func:`check_engine`). Here live: the refusals, the dtype policy, ``prepare``, one optimisation
step per role (accumulated backward, clipping, a non-finite step skipped on all ranks), the gather for saving and the
checkpoint save/load hooks. ``examples/train_di_star_sdxl.py`` and ``benchmarking/training.py`` both run on it; with
``accelerator=None`` a step is plain single-process PyTorch (the benchmark's case).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import DistributedType
from peft import set_peft_model_state_dict

from ..defaults import TRAINED_ROLES
from ..export.lora import diffusers_lora_to_peft
from .models import DIStarNetworks

__all__ = [
    "RoleOptimisation",
    "all_finite",
    "backward",
    "check_accelerator",
    "check_engine",
    "dtype_policy",
    "engine_name",
    "gather_unet",
    "load_state",
    "local_main_first",
    "optimisation_step",
    "prepare_networks",
    "register_checkpoint_hooks",
]

T = TypeVar("T")

DDP_CONFIG = "examples/accelerate_configs/multi_gpu.yaml"
FSDP_CONFIG = "examples/accelerate_configs/fsdp_8gpu.yaml"
#: accelerate's ``mixed_precision`` -> the dtype of frozen weights.
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def engine_name(distributed_type: DistributedType, fsdp_plugin=None) -> str:
    """``"single"``, ``"ddp"``, ``"fsdp2"``, ``"fsdp1"`` or ``"deepspeed"``: the branch the trainer takes."""
    if distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if distributed_type == DistributedType.FSDP:
        return "fsdp1" if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 1 else "fsdp2"
    return "single" if distributed_type == DistributedType.NO else "ddp"


def check_engine(distributed_type: DistributedType, *, use_lora: bool, use_ema: bool, fsdp_plugin=None) -> bool:
    """Refuse, in one line, what the chosen engine cannot run; return whether it shards parameters (FSDP).

    ``fsdp_plugin`` is accelerate's (``accelerator.state.fsdp_plugin``): FSDP1 must keep the original parameters,
    because the assistant's unit mixes trained and frozen ones and the optimisers are built before ``prepare``.
    """
    engine = engine_name(distributed_type, fsdp_plugin)
    if engine == "deepspeed":
        raise ValueError(
            "DeepSpeed is not supported (accelerate's backward reaches only the first DeepSpeed engine, DI* trains "
            "two networks, and DeepSpeed loads checkpoints with torch.load(weights_only=False)): use FSDP for full "
            f"finetuning ({FSDP_CONFIG}) or DDP for LoRA ({DDP_CONFIG})."
        )
    sharded = engine in ("fsdp1", "fsdp2")
    if engine == "fsdp1" and (use_lora or use_ema):
        flag = "--use_lora" if use_lora else "--use_ema"
        raise ValueError(
            f"{flag} is not supported under FSDP1 (only FSDP2 runs it sharded): use FSDP2 (`fsdp_version: 2`, as in "
            f"{FSDP_CONFIG}) or DDP ({DDP_CONFIG})."
        )
    if engine == "fsdp1" and not fsdp_plugin.use_orig_params:
        raise ValueError(
            "FSDP1 needs `fsdp_use_orig_params: true` in the accelerate config (or use FSDP2, `fsdp_version: 2`, "
            f"as in {FSDP_CONFIG})."
        )
    return sharded


def check_accelerator(accelerator: Accelerator) -> None:
    """A precision the device cannot honour (fp16 on a CPU, where accelerate silently runs fp16 weights)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 or no.")


@dataclass(frozen=True)
class DtypePolicy:
    """Frozen modules in ``weight``; the UNets as loaded in ``unet`` (trained weights are cast to float32 later)."""

    weight: torch.dtype
    unet: torch.dtype
    vae: torch.dtype


def dtype_policy(mixed_precision: str, sharded: bool, vae_force_upcast: bool) -> DtypePolicy:
    """The dtypes per module for accelerate's ``mixed_precision``.

    Under FSDP the UNets stay float32 (its mixed-precision policy casts for compute) and are sharded as such. SDXL's
    VAE overflows in fp16, so it stays float32 there when its config says ``force_upcast`` (diffusers' rule).
    """
    weight = WEIGHT_DTYPES[mixed_precision]
    vae = torch.float32 if weight == torch.float16 and vae_force_upcast else weight
    return DtypePolicy(weight, torch.float32 if sharded else weight, vae)


@dataclass
class RoleOptimisation:
    """One trained role's optimiser, learning-rate schedule and the parameters to clip (taken after ``prepare``)."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: object | None
    parameters: list[torch.nn.Parameter]


def prepare_networks(
    accelerator: Accelerator, networks: DIStarNetworks, optimizers: dict, lr_schedulers: dict, sharded: bool
) -> dict[str, RoleOptimisation]:
    """``accelerator.prepare`` the networks' units with their optimisers and schedulers; fills ``networks.prepared``.

    ``optimizers`` and ``lr_schedulers`` are keyed by role (generator, assistant). One ``prepare`` call per unit:
    FSDP2 takes one model per call, and accelerate's FSDP checkpoints pair the i-th optimiser with the i-th model.
    Three-in-one LoRA is one unit with both optimisers (DDP only, see :func:`check_engine`). Returns each role's
    prepared optimiser, scheduler and parameters to clip.
    """
    roles = TRAINED_ROLES
    units = networks.prepare_units()
    groups = [roles] if len(units) == 1 else [(role,) for role in roles]
    networks.prepared, new_optimizers, new_schedulers = {}, {}, {}
    for unit, group in zip(units, groups, strict=True):
        prepared = accelerator.prepare(unit, *(optimizers[r] for r in group), *(lr_schedulers[r] for r in group))
        new_optimizers.update(zip(group, prepared[1 : 1 + len(group)], strict=True))
        new_schedulers.update(zip(group, prepared[1 + len(group) :], strict=True))
        networks.prepared.update(dict.fromkeys(unit.roles, prepared[0]))
    networks.route_frozen_calls = sharded
    return {
        role: RoleOptimisation(new_optimizers[role], new_schedulers[role], _clip_parameters(networks, role))
        for role in roles
    }


def _clip_parameters(networks: DIStarNetworks, role: str) -> list[torch.nn.Parameter]:
    """The parameters to clip and log the gradient norm of, taken after ``prepare``.

    Under sharding, all of the role's prepared unit (frozen ones have no gradient): accelerate's ``clip_grad_norm_``
    recognises a whole FSDP1 module and then computes the norm across shards; FSDP2's are DTensors. LoRA (FSDP2 only)
    gives its adapter's: accelerate compares the list with each prepared unit's parameters, and LoRA's two units have
    equally many, compared element by element (a DTensor error).
    """
    if networks.route_frozen_calls and not networks.use_lora:
        return list(networks.prepared[role].parameters())
    return networks.trainable_parameters(role)


def backward(accelerator: Accelerator | None, loss: torch.Tensor, accumulation_steps: int = 1) -> None:
    """Backpropagate one of ``accumulation_steps`` micro-batches' losses (gradients add up to their mean's)."""
    loss = loss / accumulation_steps
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def all_finite(accelerator: Accelerator | None, *values) -> bool:
    """True on every process when all values are finite on every process (so all ranks skip together)."""
    device = None if accelerator is None else accelerator.device
    bad = torch.tensor([float(not torch.isfinite(torch.as_tensor(v)).all()) for v in values], device=device)
    if accelerator is not None:
        bad = accelerator.reduce(bad.sum(), reduction="sum")
    return bool(bad.sum() == 0)


def optimisation_step(
    accelerator: Accelerator | None,
    role: RoleOptimisation,
    losses: Sequence[torch.Tensor],
    max_grad_norm: float,
    finite: Callable[..., bool] = all_finite,
) -> torch.Tensor | None:
    """Clip the accumulated gradients, then step (or skip, on every rank alike, when a loss or the norm is not finite).

    ``max_grad_norm`` 0 means no clipping (the norm is still computed and logged). ``finite(accelerator, *values)``
    decides whether to step: :func:`all_finite`, unless the caller runs on tensors without values (the memory
    estimate's fake tensors, ``benchmarking/memory.py``). Returns the gradient norm before clipping, or ``None`` when
    the step was skipped. Gradients are freed either way (``set_to_none``).
    """
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    if accelerator is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(role.parameters, max_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(role.parameters, max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    if not finite(accelerator, *losses, grad_norm):
        role.optimizer.zero_grad(set_to_none=True)
        return None
    role.optimizer.step()
    if role.lr_scheduler is not None:
        role.lr_scheduler.step()
    role.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def gather_unet(accelerator: Accelerator, networks: DIStarNetworks, role: str) -> torch.nn.Module | None:
    """``role``'s UNet with its full weights, for validation, checkpoints and the export; all ranks must call it.

    Without sharding that is the bare UNet itself, with ``role`` activated. Under sharding the prepared unit's state
    dict is gathered (``accelerator.get_state_dict``) and loaded into a fresh UNet (with the role's LoRA adapter, if
    any) on the main process; the other ranks get ``None``.
    """
    if not networks.route_frozen_calls:
        return networks.activate(role)
    state_dict = _full_state_dict(accelerator, networks.prepared[role])
    if not accelerator.is_main_process:
        return None
    prefix = f"{role}."  # RoleModule's keys
    state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    bare = networks.bare_unet(role)
    with init_empty_weights():
        unet = _model_class(bare).from_config(bare.config)
        for adapter, lora_config in getattr(bare, "peft_config", {}).items():
            unet.add_adapter(lora_config, adapter_name=adapter)
    unet.load_state_dict(state_dict, strict=True, assign=True)
    return unet.eval()


def _model_class(module: torch.nn.Module) -> type[torch.nn.Module]:
    """The family's model class of ``module`` (FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _full_state_dict(accelerator: Accelerator, unit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded ``unit``'s full state dict on the main process (all ranks call it).

    accelerate's ``get_state_dict``, except FSDP1 on a CPU: its copy to the CPU (``offload_to_cpu=True``) crashes
    rank 0 with a segmentation fault there (torch 2.13, gloo), and the weights are on the CPU already.
    """
    if engine_name(accelerator.distributed_type, getattr(accelerator.state, "fsdp_plugin", None)) != "fsdp1":
        return accelerator.get_state_dict(unit)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=accelerator.device.type != "cpu", rank0_only=True)
    with FSDP.state_dict_type(unit, StateDictType.FULL_STATE_DICT, config):
        return unit.state_dict()


def register_checkpoint_hooks(accelerator: Accelerator, networks: DIStarNetworks, family) -> None:
    """Checkpoints hold the generator and assistant as LoRA (the ``family``'s ``save_lora_weights`` format) or full
    networks.

    Whatever the engine, ``generator/`` and ``assistant/`` are plain Diffusers folders (gathered from the shards under
    FSDP, see :func:`gather_unet`). Under FSDP accelerate also writes its own (sharded) model and optimiser states
    and resumes from those; otherwise the folders are what resuming loads. A write that fails on the main process is
    raised after both roles' gathers, so no other rank is left in one (``checkpointing.save_checkpoint`` then stops
    every rank alike).
    """

    def save_hook(models, weights, output_dir):
        failure = None
        for role in TRAINED_ROLES:
            path = os.path.join(output_dir, role)
            if networks.use_lora:
                state_dict, metadata = networks.lora_state_dict(role)  # every rank: FSDP2 gathers the shards
                write = functools.partial(family.save_lora_weights, path, state_dict, metadata)
            else:
                unet = gather_unet(accelerator, networks, role)  # every rank takes part in the gather
                write = functools.partial(unet.save_pretrained, path) if accelerator.is_main_process else None
            if accelerator.is_main_process and failure is None:
                try:
                    write()
                except Exception as error:  # raised after the next role's gather, which the other ranks are in
                    failure = error
        weights.clear()  # accelerate would otherwise save the prepared modules a second time
        if failure is not None:
            raise failure

    def load_hook(models, input_dir):
        if networks.route_frozen_calls:
            return  # accelerate's FSDP checkpoint restores the sharded units (and `models` is empty)
        models.clear()
        for role in TRAINED_ROLES:
            path = os.path.join(input_dir, role)
            if networks.use_lora:
                incompatible = set_peft_model_state_dict(
                    networks.bare_unet(role),
                    diffusers_lora_to_peft(family.load_lora_state_dict(path)),
                    adapter_name=networks.adapter(role),
                )
                if getattr(incompatible, "unexpected_keys", None):
                    raise ValueError(f"{path}: unexpected LoRA keys {incompatible.unexpected_keys[:3]}")
            else:
                saved = family.network_class().from_pretrained(path)
                networks.bare_unet(role).load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_state(accelerator: Accelerator, networks: DIStarNetworks, optimisation: dict, folder: str) -> None:
    """``accelerator.load_state(folder)``; under FSDP1 the optimisers' state is created first.

    accelerate loads an FSDP1 optimiser's sharded state into the keys of ``FSDP.optim_state_dict`` of the live
    optimiser, which has none before its first step: the AdamW moments would be silently dropped (measured: a resumed
    run ended 1.4e-3 away from the uninterrupted one). torch's ``get_optimizer_state_dict`` creates them (a zero-lr
    step on zero gradients), as accelerate's FSDP2 path does.
    """
    if engine_name(accelerator.distributed_type, getattr(accelerator.state, "fsdp_plugin", None)) == "fsdp1":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        for role, role_optimisation in optimisation.items():
            get_optimizer_state_dict(networks.prepared[role], role_optimisation.optimizer.optimizer)
    accelerator.load_state(folder)


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
