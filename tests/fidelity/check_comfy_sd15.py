"""Our SD1.5 / SD2.x single files and SD kohya LoRA through ComfyUI's own loaders (the comfyui 0.0.1 wheel, June
2024): comfy.sd.load_checkpoint_guess_config (model detection, UNet, CLIP and VAE loading) and
comfy.sd.load_lora_for_models (comfy.lora's key mapping and weight patching), against Diffusers on the same weights.

ComfyUI detects SD1.5 / SD2.x from the UNet's model_channels (320) and context_dim (768 / 1024) and builds the
full-size CLIP-L / OpenCLIP-H and VAE, so the models here are reduced SD1.5 / SD2.x UNets (two levels, one layer per
block, SD's widths and heads) with full-size text encoders and VAE, all random weights plus noise on every tensor
(so that no norm keeps its default). fp32 (text encoders too: ComfyUI's --fp32-text-enc), CPU.
"""

import logging
import sys
import types

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_di_star.configs import load_sdxl_config
from diffusers_di_star.export import export_comfyui_checkpoint, export_kohya_lora
from diffusers_di_star.export.original_keys import V_PRED_KEY

# Shims for the 2024 wheel on this venv (after Diffusers, which probes for torchvision): transformers 5 dropped
# SpecialTokensMixin (imported, unused by what runs here); torchvision is imported by the Stable Cascade coder only.
sys.modules["transformers"].SpecialTokensMixin = type("SpecialTokensMixin", (), {})  # (re-registered on import)
for name in ("torchvision", "torchvision.models", "torchvision.transforms"):
    sys.modules[name] = types.ModuleType(name)

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

comfy.model_management.cpu_state = comfy.model_management.CPUState.CPU  # what ComfyUI's --cpu sets
comfy.model_management.args.fp32_text_enc = True  # --fp32-text-enc: ComfyUI keeps text encoders in fp16 by default

torch.set_grad_enabled(False)
OUT = sys.argv[1] if len(sys.argv) > 1 else "."
VERSIONS = {
    "sd1": dict(
        unet={"cross_attention_dim": 768, "attention_head_dim": 8},
        text={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
    ),
    "sd2": dict(
        unet={"cross_attention_dim": 1024, "attention_head_dim": (5, 10), "use_linear_projection": True},
        text={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
    ),
}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def noisy(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval()


def components(version):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640),
        layers_per_block=1,
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **VERSIONS[version]["unet"],
    )
    vae = AutoencoderKL(**{k: v for k, v in load_sdxl_config("vae").items() if not k.startswith("_")})
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **VERSIONS[version]["text"]))
    return {"unet": noisy(unet, 1), "vae": noisy(vae, 2), "text_encoder": noisy(text, 3)}


def unet_inputs(context_dim):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, context_dim, generator=g)
    return x, torch.tensor([399.0, 399.0]), context


def max_diff(a, b):
    return (a - b).abs().max().item()


def check(version, prediction_type):
    ours = components(version)
    path = export_comfyui_checkpoint(
        ours, f"{OUT}/{version}.safetensors", "fp32", prediction_type=prediction_type, overwrite=True
    )
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
    logging.getLogger().removeHandler(warnings)
    base = model.model
    print(f"== {version} ({prediction_type}; v_pred marker in file: {V_PRED_KEY in load_file(path)})")
    print("ComfyUI model detection:", type(base.model_config).__name__, base.model_type.name)
    print("ComfyUI load warnings:", [m[:160] for m in warnings.messages] or "none")

    x, t, context = unet_inputs(ours["unet"].config.cross_attention_dim)
    expected = ours["unet"](x, t, encoder_hidden_states=context).sample
    print(
        "UNet  max |comfy - diffusers| =",
        max_diff(base.diffusion_model(x, t, context=context), expected),
        " |out| max",
        expected.abs().max().item(),
    )

    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(1))
    comfy_text = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)(ids.tolist())[0]
    expected_text = ours["text_encoder"](ids).last_hidden_state
    print(
        f"CLIP  max |comfy {clip.cond_stage_model.clip} - diffusers| =",
        max_diff(comfy_text, expected_text),
        " |out| max",
        expected_text.abs().max().item(),
    )

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected_image = (ours["vae"].decode(z).sample / 2 + 0.5).clamp(0, 1).movedim(1, -1)
    print("VAE   max |comfy decode - diffusers| =", max_diff(vae.decode(z), expected_image))
    return ours, model, (x, t, context), path


def check_lora(ours, model, inputs, version):
    unet = ours["unet"]
    config = LoraConfig(
        r=4,
        lora_alpha=16.0,
        init_lora_weights=False,
        rank_pattern={"ff.net.2": 2},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"],
    )
    unet.add_adapter(config)
    for p in unet.parameters():  # the LoRA B starts at zero under PEFT's default; make every module count
        if p.requires_grad:
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    lora_dir = f"{OUT}/{version}_lora"
    StableDiffusionPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict()
    )
    base_dir = f"{OUT}/{version}_base"  # the architecture, as a Diffusers folder's unet/config.json
    UNet2DConditionModel.from_config(unet.config).save_config(f"{base_dir}/unet")
    kohya_path = f"{OUT}/{version}_kohya.safetensors"
    export_kohya_lora(lora_dir, kohya_path, "fp32", base_model=base_dir, overwrite=True)
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(kohya_path), 1.0, 0.0)
    patched.patch_model()
    logging.getLogger().removeHandler(warnings)
    x, t, context = inputs
    expected = unet(x, t, encoder_hidden_states=context).sample
    unet.disable_adapters()
    plain = unet(x, t, encoder_hidden_states=context).sample
    n = sum(k.endswith(".alpha") for k in load_file(kohya_path))
    print(
        f"kohya LoRA ({n} modules, alpha 16, rank 4/2) through comfy.lora, warnings ('lora key not loaded', "
        "'NOT LOADED'):",
        warnings.messages or "none",
    )
    print(
        "UNet+LoRA max |comfy - diffusers/PEFT| =",
        max_diff(patched.model.diffusion_model(x, t, context=context), expected),
        " (the LoRA moves the output by",
        max_diff(expected, plain),
        ")",
    )


if __name__ == "__main__":
    ours, model, inputs, _ = check("sd1", "epsilon")
    check_lora(ours, model, inputs, "sd1")
    del ours, model
    check("sd2", "v_prediction")
