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

from .components import build_pickscore_reward, build_text_encoders, build_vae
from .settings import BenchSettings

__all__ = ["ADAM_STATES", "static_training_memory"]

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
