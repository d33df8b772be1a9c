"""Expected static training memory, computed on the meta device: what a training layout keeps resident before any
activation is stored.

The networks are built exactly as the training benchmark builds them (:func:`~.training.build_networks`, the text
encoders, the VAE and the PickScore reward), but on the meta device, so the full size takes seconds on a CPU and no
memory. Counted, in the dtypes the modules really have: every weight (frozen bf16 ones once, even when one UNet plays
several roles), AdamW's two float32 moments for every trainable parameter of both roles, and the float32 gradients of
the role with the most trainable parameters (each role's gradients are freed after its optimiser step, so only one
role's exist at a time). Activations, the CUDA workspace and the allocator's fragmentation are not counted: a measured
peak minus this figure is what they cost.
"""

from __future__ import annotations

import dataclasses

import torch

from .components import SIZES, build_pickscore_reward, build_text_encoders, build_unet, build_vae
from .settings import BenchSettings

__all__ = ["ADAM_STATES", "fsdp_full_finetuning_memory_gb", "sdxl_parameter_counts", "static_training_memory"]

#: AdamW keeps two float32 moments (exp_avg, exp_avg_sq) per trainable parameter.
ADAM_STATES = 2
_META = torch.device("meta")


def _bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def static_training_memory(layout: str, settings: BenchSettings) -> dict[str, int]:
    """Bytes per part for ``layout`` at ``settings.size``: ``weights``, ``adam_states``, ``gradients``, ``total``,
    plus ``trainable_parameters`` (both roles, a count, not bytes)."""
    from .training import _config, build_networks  # training imports this module's users; keep the cycle lazy

    meta = dataclasses.replace(settings, device=_META)
    networks = build_networks(layout, _config(meta), meta)
    trainable = {role: list(networks.trainable_parameters(role)) for role in ("generator", "assistant")}
    modules = [networks.generator_unet, networks.assistant_unet, networks.reference_unet]
    modules += list(build_text_encoders(meta.size, _META, torch.bfloat16)[1])
    modules.append(build_vae(meta.size, _META, torch.bfloat16))
    if settings.reward:
        modules.append(build_pickscore_reward(meta.size, _META).clip)
    unique = {id(p): p for module in modules for p in module.parameters()}  # one UNet may play several roles
    weights = _bytes(unique.values())
    adam = ADAM_STATES * sum(_bytes(params) for params in trainable.values())
    gradients = max(_bytes(params) for params in trainable.values())
    return {
        "weights": weights,
        "adam_states": adam,
        "gradients": gradients,
        "total": weights + adam + gradients,
        "trainable_parameters": sum(p.numel() for params in trainable.values() for p in params),
    }


def sdxl_parameter_counts() -> dict[str, int]:
    """Parameter counts of full-size SDXL base's UNet, both text encoders and VAE, built on the meta device."""
    full = SIZES["full"]
    modules = {
        "unet": [build_unet(full, _META, torch.float32)],
        "text_encoders": build_text_encoders(full, _META, torch.float32)[1],
        "vae": [build_vae(full, _META, torch.float32)],
    }
    return {name: sum(p.numel() for m in group for p in m.parameters()) for name, group in modules.items()}


def fsdp_full_finetuning_memory_gb(num_gpus: int, counts: dict[str, int] | None = None) -> dict[str, float]:
    """Computed (not measured) GB per GPU of DI* full finetuning under FSDP full sharding over ``num_gpus``.

    Generator and assistant: float32 weights and AdamW's two float32 moments, sharded; float32 gradients of ONE of
    them (each network's are freed after its optimiser step, as in :func:`static_training_memory`), sharded; the
    frozen reference in float32, sharded (the trainer keeps FSDP's units float32); text encoders and VAE in bf16,
    replicated. Excludes activations, FSDP's all-gather buffers, the reward model and allocator overhead.
    """
    counts = counts or sdxl_parameter_counts()
    unet, gb = counts["unet"], 1e9
    rows = {
        "generator + assistant weights": 2 * 4 * unet / num_gpus / gb,
        "one network's gradients": 4 * unet / num_gpus / gb,
        "their AdamW states": 2 * ADAM_STATES * 4 * unet / num_gpus / gb,
        "frozen reference": 4 * unet / num_gpus / gb,
        "text encoders + VAE (bf16, replicated)": 2 * (counts["text_encoders"] + counts["vae"]) / gb,
    }
    rows["total"] = sum(rows.values())
    return rows
