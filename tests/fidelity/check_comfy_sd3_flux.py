"""Our SD3 / FLUX.1 transformer files and LoRA files through ComfyUI's own loaders (ComfyUI's source at a 2025
commit, see README.md): comfy.sd.load_diffusion_model_state_dict (what *Load Diffusion Model* calls: model
detection and the Diffusers MMDiT / FLUX key conversion) and comfy.sd.load_lora_for_models (comfy.lora's key mapping
and weight patching), against Diffusers on the same weights (docs/export.md, "SD3, SD3.5 and FLUX.1").

ComfyUI detects the model from key names and shapes. SD3's MMDiT: width 64·depth, depth heads of 64 and depth joint
blocks, all read from x_embedder's width; so the SD3 here has our tiny SD3's layout (SD3.5-Medium: a dual-attention
first block, RMS q/k norm, the tiny text widths) with heads of 64 and 2 heads for its 2 blocks (width 128). FLUX:
width 3072, 24 heads, T5 width 4096 and RoPE axes (16, 56, 56) are fixed in ComfyUI's detection; so the FLUX here
has FLUX.1-dev's widths with one double and one single block (CLIP-L's pooled 768). Random weights plus noise on every
tensor (so that no norm keeps its default), fp32, CPU.

The LoRA is written by the trainer's own path: ``setup_networks`` (the generator's PEFT adapter with the family's
target modules), ``DIStarNetworks.lora_state_dict`` and the family's ``save_lora_weights``; the generator's LoRA B
(zero at init) gets noise so that every module moves the output. Each LoRA also goes through ``di-star export
--format comfyui-lora`` (its alphas as ``<module>.alpha`` tensors) and ComfyUI at strength 1.0.

Run: PYTHONPATH=<ComfyUI source>:<its deps>:src python tests/fidelity/check_comfy_sd3_flux.py <out dir>
"""

import logging
import os
import sys
import types
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from diffusers_di_star.export import export_comfyui_lora
from diffusers_di_star.families.flux import DEFAULT_FLUX_GUIDANCE, FluxConditioning, FluxFamily
from diffusers_di_star.families.sd3 import DEFAULT_SIGMA_STAR, SD3Conditioning, SD3Family
from diffusers_di_star.one_step import FlowSchedule, one_step_x0
from diffusers_di_star.testing import (
    SD3_CLIP_HIDDEN_SIZES,
    SD3_JOINT_ATTENTION_DIM,
    get_tiny_flux_components,
    get_tiny_flux_transformer,
    get_tiny_sd3_components,
    get_tiny_sd3_transformer,
)
from diffusers_di_star.training.config import DIStarConfig
from diffusers_di_star.training.models import setup_networks

# Shim (after Diffusers and transformers, which probe for torchvision): torchvision is imported by the Stable Cascade
# coder only. ComfyUI's --cpu is read when comfy.model_management is imported.
for name in ("torchvision", "torchvision.models", "torchvision.transforms"):
    sys.modules[name] = types.ModuleType(name)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.latent_formats  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

torch.set_grad_enabled(False)
OUT = sys.argv[1] if len(sys.argv) > 1 else "."
RANK = 4


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.levelname}: {record.getMessage()[:300]}")


@contextmanager
def captured():
    """ComfyUI's log records (INFO and above) while loading."""
    root, handler = logging.getLogger(), Messages()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def noisy(module, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


def sd3_case(sd35: bool):
    """Our tiny SD3 with 2 heads of 64 (width 128 for ComfyUI's 64·depth, depth = 2 blocks): SD3.5-Medium's layout
    (the tiny SD3's: a dual-attention first block, RMS q/k norm), or SD3-Medium's (neither)."""
    sd3_medium = {} if sd35 else {"dual_attention_layers": (), "qk_norm": None}
    transformer = get_tiny_sd3_transformer(
        attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128, **sd3_medium
    )
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 12, SD3_JOINT_ATTENTION_DIM, generator=g)
    pooled = torch.randn(2, sum(SD3_CLIP_HIDDEN_SIZES), generator=g)
    family = SD3Family(FlowSchedule(), joint_attention_dim=SD3_JOINT_ATTENTION_DIM)
    cond = SD3Conditioning(context, pooled, context, pooled)
    return transformer, family, cond, {"context": context, "y": pooled}, get_tiny_sd3_components()["vae"]


def flux_case(guidance_embeds: bool):
    """Our tiny FLUX at the widths ComfyUI's detection fixes (FLUX.1's), one double and one single block as before:
    FLUX.1-dev's layout (the guidance embedding), or FLUX.1-schnell's."""
    transformer = get_tiny_flux_transformer(
        guidance_embeds=guidance_embeds,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
    )
    g = torch.Generator().manual_seed(0)
    context, pooled = torch.randn(2, 12, 4096, generator=g), torch.randn(2, 768, generator=g)
    guidance = torch.full((2,), DEFAULT_FLUX_GUIDANCE)
    family = FluxFamily(FlowSchedule(), guidance_embeds=guidance_embeds)
    cond = FluxConditioning(context, pooled, context, pooled, guidance)
    comfy_kwargs = {"context": context, "y": pooled} | ({"guidance": guidance} if guidance_embeds else {})
    return transformer, family, cond, comfy_kwargs, get_tiny_flux_components()["vae"]


def check_transformer(name, case):
    """Save the transformer as a full run does, load it as *Load Diffusion Model* does, compare the forwards."""
    transformer, family, cond, comfy_kwargs, vae = case()
    transformer = noisy(transformer, 1)
    folder = f"{OUT}/{name}_transformer"
    transformer.save_pretrained(folder)  # the trainer's full run: generator/ (and the final transformer/) folder
    path = f"{folder}/diffusion_pytorch_model.safetensors"
    with captured() as messages:
        model = comfy.sd.load_diffusion_model(path)  # UNETLoader's call, weight_dtype "default"
    base = model.model
    print(f"== {name}: {path.removeprefix(OUT + '/')} ({sum(p.numel() for p in transformer.parameters()):,} params)")
    detected = type(base.model_config).__name__
    print("ComfyUI model detection:", detected, base.model_type.name, base.model_config.unet_config)
    problems = [m for m in messages if not m.startswith("INFO") or "left over keys" in m]
    print(
        "ComfyUI load: 'unet missing' / 'unet unexpected' warnings, 'left over keys' (Diffusers keys not converted):",
        problems or "none",
    )
    latent = type(base.latent_format)()
    print(
        f"ComfyUI latent format {type(latent).__name__}: scale {latent.scale_factor}, shift {latent.shift_factor}; "
        f"our tiny {family.display_name} VAE config: scale {vae.config.scaling_factor}, "
        f"shift {vae.config.shift_factor}"
    )

    g = torch.Generator().manual_seed(2)
    x, sigmas = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([1.0, 0.6])
    expected = family.denoise(transformer, x, sigmas, cond)
    comfy_t = base.model_sampling.timestep(sigmas)  # what ComfyUI's apply_model gives its network for σ
    actual = base.diffusion_model(x, comfy_t, **comfy_kwargs)
    print(
        f"network (σ = {sigmas.tolist()}, ComfyUI timestep {comfy_t.tolist()}) max |comfy - ours| =",
        max_diff(actual, expected),
        " |out| max",
        expected.abs().max().item(),
    )
    ours_x0 = one_step_x0(lambda z, t: family.denoise(transformer, z, t, cond), x, DEFAULT_SIGMA_STAR, FlowSchedule())
    sigma_star = torch.full((2,), DEFAULT_SIGMA_STAR)
    comfy_x0 = base.apply_model(x, sigma_star, c_crossattn=comfy_kwargs["context"], **_extra(comfy_kwargs))
    print(
        f"one-step x0 at σ* = {DEFAULT_SIGMA_STAR} max |comfy apply_model (denoised) - ours one_step_x0| =",
        max_diff(comfy_x0, ours_x0),
        " |x0| max",
        ours_x0.abs().max().item(),
    )
    return transformer, family, cond, comfy_kwargs, model, (x, sigmas)


def _extra(comfy_kwargs):
    return {k: v for k, v in comfy_kwargs.items() if k != "context"}


def check_lora(name, transformer, family, cond, comfy_kwargs, model, inputs, lora_alpha):
    """A LoRA saved by the trainer's path, through ComfyUI's Load LoRA code, against PEFT on our transformer."""
    config = DIStarConfig(
        resolution=64,
        generator_lora_rank=RANK,
        generator_lora_alpha=lora_alpha,
        assistant_lora_rank=RANK,
        generator_lora_target_modules=family.lora_target_modules,
        assistant_lora_target_modules=family.lora_target_modules,
    )
    networks = setup_networks(config, transformer)
    g = torch.Generator().manual_seed(3)
    for p in networks.trainable_parameters("generator"):
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = f"{OUT}/{name}_lora_alpha{lora_alpha:g}"
    family.save_lora_weights(folder, *networks.lora_state_dict("generator"))
    path = f"{folder}/pytorch_lora_weights.safetensors"
    in_file = load_file(path)
    formats = Counter(k.rsplit(".", 2)[-2] for k in in_file)

    x, sigmas = inputs
    expected = family.denoise(networks.activate("generator"), x, sigmas, cond)
    plain = family.denoise(networks.activate("reference"), x, sigmas, cond)
    scale = lora_alpha / RANK
    print(
        f"-- LoRA r {RANK}, lora_alpha {lora_alpha:g} (PEFT scale {scale:g}): {len(in_file)} tensors, "
        f"{formats['lora_A'] + formats['down']} modules, key suffixes {dict(formats)} "
        f"(e.g. {min(in_file)}); "
        f".alpha tensors: {sum(k.endswith('.alpha') for k in in_file)}"
    )
    exported = export_comfyui_lora(path, f"{folder}/comfyui_lora.safetensors", dtype="fp32")
    runs = [(path, strength) for strength in sorted({1.0, scale})] + [(exported, 1.0)]
    for file, strength in runs:
        with captured() as messages:
            patched, _ = comfy.sd.load_lora_for_models(
                model, None, comfy.utils.load_torch_file(file, safe_load=True), strength, 0.0
            )  # LoraLoader's calls
        applied = sum(len(p) for p in patched.patches.values())
        patched.patch_model()
        actual = patched.model.diffusion_model(x, model.model.model_sampling.timestep(sigmas), **comfy_kwargs)
        patched.unpatch_model()
        problems = [m for m in messages if m.startswith(("WARNING", "ERROR"))]
        print(
            f"{'di-star export --format comfyui-lora, ' if file == exported else ''}"
            f"ComfyUI strength {strength:g}: {applied} LoRA patches on {len(patched.patches)} weights, "
            f"warnings ('lora key not loaded', 'NOT LOADED'): {problems or 'none'}; "
            f"max |comfy - PEFT| = {max_diff(actual, expected):.3g} (the LoRA moves the output by "
            f"{max_diff(expected, plain):.3g})"
        )
    unpatched = model.model.diffusion_model(x, model.model.model_sampling.timestep(sigmas), **comfy_kwargs)
    print("ComfyUI unpatched again: max |comfy - ours without LoRA| =", max_diff(unpatched, plain))
    with warnings.catch_warnings():  # peft: "Adapter generator was active which is now deleted"
        warnings.simplefilter("ignore", UserWarning)
        transformer.delete_adapters(["generator", "assistant"])


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    cases = {
        "sd3.5-medium": lambda: sd3_case(sd35=True),
        "sd3-medium": lambda: sd3_case(sd35=False),
        "flux.1-dev": lambda: flux_case(guidance_embeds=True),
        "flux.1-schnell": lambda: flux_case(guidance_embeds=False),
    }
    for name, case in cases.items():
        transformer, family, cond, comfy_kwargs, model, inputs = check_transformer(name, case)
        for lora_alpha in (float(RANK), 4.0 * RANK):
            check_lora(name, transformer, family, cond, comfy_kwargs, model, inputs, lora_alpha)
        del transformer, model
