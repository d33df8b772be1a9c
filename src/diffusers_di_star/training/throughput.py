"""What the trainer logs about its speed (docs/training.md, "Throughput"): images/s and model FLOPs utilisation.

Model FLOPs are counted as ``benchmarking/flops.py`` counts them: ``FlopCounterMode`` on PyTorch's meta device (no
memory, no weights), here over the trainer's own iteration — K_TA :func:`~.steps.assistant_loss` and one
:func:`~.steps.generator_loss`, each with its backward, on copies of the run's networks — plus the VAE decode and
its backward when a reward is used. Not counted: the reward model itself (PickScore's image tower is 0.33 TFLOP per
image, under 1 % of an SDXL iteration at 1024²), the prompt encoding (0.11 TFLOP) and what gradient checkpointing
recomputes (model FLOPs, not hardware FLOPs); attention counts as its matrix products, forward and backward (PyTorch's
math path, whatever kernel the run uses). MFU = model FLOPs per second / (the GPU's dense bf16/fp16 peak ×
processes): a lower bound, known only for the GPUs of :data:`PEAK_TFLOPS` and a bf16/fp16 run.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..families import Conditioning, ModelFamily
from ..one_step import decode_latents
from .config import DIStarConfig
from .models import DIStarNetworks, setup_networks
from .steps import as_family, assistant_loss, generator_loss

__all__ = ["PEAK_TFLOPS", "FlopCounter", "iteration_flops", "peak_flops"]

#: Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets; matched against
#: ``torch.cuda.get_device_name`` (the longest name contained in it wins).
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "H100": 989.4,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """The GPU's peak FLOP/s for a bf16/fp16 run, or ``None`` (a CPU, an unlisted GPU, or float32 training)."""
    if device.type != "cuda" or mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_TFLOPS if key in name]
    return PEAK_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


def iteration_flops(
    networks: DIStarNetworks,
    config: DIStarConfig,
    cond: Conditioning,
    family: ModelFamily | torch.Tensor,
    vae: torch.nn.Module | None = None,
) -> int:
    """Model FLOPs of one DI* iteration for ONE image, counted on the meta device, for any family.

    ``networks`` gives the layout and the networks' configs, ``cond`` (the ``family``'s conditioning) the shapes (its
    first sample is used, :meth:`~diffusers_di_star.families.base.Conditioning.empty`); ``family`` may be a bare
    ``alphas_cumprod`` (SDXL, ε: :func:`~.steps.as_family`). ``vae`` is needed when ``config.reward_scale > 0``.
    """
    meta = torch.device("meta")
    with meta:
        reference = _empty_copy(networks.reference_unet)
        distinct = networks.generator_unet is not networks.reference_unet
        generator = _empty_copy(networks.generator_unet) if distinct else None
        copies = setup_networks(config, reference, generator)
    one = cond.empty(1, meta)
    family = copy.copy(as_family(family))  # the same family with its schedule on the meta device
    family.schedule = family.schedule.to(meta)
    no_reward = dataclasses.replace(config, reward_scale=0.0)  # the reward model is not counted; its decode is
    with FlopCounter() as assistant_count, sdpa_kernel(SDPBackend.MATH):  # the K_TA assistant updates cost the same
        assistant_loss(copies, no_reward, one, family)[0].backward()
    with FlopCounter() as generator_count, sdpa_kernel(SDPBackend.MATH):
        generator_loss(copies, no_reward, one, [""], family)[0].backward()
        if config.reward_scale > 0:
            with meta:
                decoder = _empty_copy(vae).requires_grad_(False)
            x0 = torch.empty(family.latent_shape(1, config.resolution), device=meta, requires_grad=True)
            decode_latents(decoder, x0).sum().backward()
    return config.assistant_updates_per_step * assistant_count.get_total_flops() + generator_count.get_total_flops()


class FlopCounter(FlopCounterMode):
    """``FlopCounterMode`` counting the total only: its per-module tracker's backward hooks fail inside
    ``torch.autograd.grad`` ("A leaf node was passed to _will_engine_execute_node", torch 2.13), which the score
    term uses for its input gradients."""

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModules()


class _NoModules:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _empty_copy(model: torch.nn.Module) -> torch.nn.Module:
    # A diffusers model of the same config, on the current default device (meta here), float32.
    return type(model).from_config(model.config)
