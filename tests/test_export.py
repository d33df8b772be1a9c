"""Export and import: single-file SDXL and SD1.x/2.x checkpoints, kohya LoRA, legacy generator checkpoints,
``di-star export``.

Diffusers' own readers (``from_single_file``, ``convert_ldm_*``, ``load_lora_weights``) are the independent checks:
the installed Diffusers only converts original -> Diffusers, so our writer and its reader cannot share a mistake.
Full-size SDXL, SD1.5 and SD2.1 are checked on the meta device (no weights in memory); values on the tiny models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from training_helpers import save_trainer_lora

from diffusers_di_star.cli import _EXPORT_FORMATS, main
from diffusers_di_star.configs import SDXL_BASE_CONFIG_DIR, load_sdxl_config
from diffusers_di_star.export import (
    FORMATS,
    ExportError,
    checkpoint_kind,
    checkpoint_state_dict,
    components_from_checkpoint,
    export_comfyui_checkpoint,
    export_comfyui_lora,
    export_comfyui_unet,
    export_diffusers,
    export_kohya_lora,
    export_model,
    load_generator_unet,
    load_pipeline_components,
    load_state_dict_file,
    peft_lora_to_kohya,
    unet_from_original,
    unet_to_original,
)
from diffusers_di_star.export import files as export_files
from diffusers_di_star.export.loading import build_empty_component
from diffusers_di_star.export.original_keys import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    SD1_CLIP_PREFIX,
    SD2_CLIP_PREFIX,
    UNET_PREFIX,
    V_PRED_KEY,
    VAE_PREFIX,
    clip_g_from_original,
    clip_l_from_original,
    vae_from_original,
)
from diffusers_di_star.testing import (
    TEXT_HIDDEN_SIZES,
    get_tiny_sd_components,
    get_tiny_unet,
    save_tiny_sd_pipeline,
)
from diffusers_di_star.weights import DTYPES, CheckpointError

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# Published sd_xl_base_1.0.safetensors: 2,515 tensors; a sample of its names with their shapes.
PUBLISHED_SDXL_TENSORS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.logit_scale": (),
}


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, dtype: torch.dtype | None = None):
    expected, actual = expected.state_dict(), actual.state_dict()
    assert set(expected) == set(actual)
    for key, value in expected.items():
        value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        assert torch.equal(value, actual[key]), key


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tiny_sdxl_dir) -> dict:
    return load_pipeline_components(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_sdxl_dir, tmp_path_factory) -> str:
    return export_comfyui_checkpoint(tiny_sdxl_dir, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", dtype="fp32")


@pytest.fixture(scope="module")
def meta_sdxl() -> dict:
    """Full-size SDXL base components from the bundled configs, parameters on the meta device."""
    return {name: build_empty_component(name) for name in SDXL_COMPONENTS}


@pytest.fixture(scope="module")
def meta_checkpoint(meta_sdxl) -> dict[str, torch.Tensor]:
    return checkpoint_state_dict(meta_sdxl)


# ------------------------------------------------------------------------------------------- full-size layout
def test_full_size_single_file_has_the_published_sdxl_layout(meta_checkpoint):
    counts = {p: sum(k.startswith(p) for k in meta_checkpoint) for p in (UNET_PREFIX, VAE_PREFIX)}
    counts |= {p: sum(k.startswith(p) for k in meta_checkpoint) for p in (CLIP_L_PREFIX, CLIP_G_PREFIX)}
    assert counts == {UNET_PREFIX: 1680, VAE_PREFIX: 248, CLIP_L_PREFIX: 197, CLIP_G_PREFIX: 390}
    assert len(meta_checkpoint) == 2515
    unet_params = sum(v.numel() for k, v in meta_checkpoint.items() if k.startswith(UNET_PREFIX))
    assert unet_params == 2_567_463_684
    assert {k: tuple(meta_checkpoint[k].shape) for k in PUBLISHED_SDXL_TENSORS} == PUBLISHED_SDXL_TENSORS
    assert single_file_utils.infer_diffusers_model_type(meta_checkpoint) == "xl_base"


def test_full_size_unet_maps_to_diffusers_converter_tensor_for_tensor(meta_sdxl):
    unet = meta_sdxl["unet"]
    expected = unet.state_dict()
    assert len(expected) == 1680 and sum(v.numel() for v in expected.values()) == 2_567_463_684
    checkpoint = unet_to_original(expected, unet.config)
    theirs = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    ours = unet_from_original(checkpoint, unet.config)
    for converted in (theirs, ours):  # pure renames: the very same tensor objects come back, under the same names
        assert converted.keys() == expected.keys()
        assert all(converted[k] is expected[k] for k in expected)


def test_full_size_vae_and_text_encoders_match_diffusers_converters(meta_sdxl, meta_checkpoint):
    vae, text_encoder, text_encoder_2 = (meta_sdxl[n] for n in ("vae", "text_encoder", "text_encoder_2"))
    shapes = {k: v.shape for k, v in vae.state_dict().items()}
    for converted in (
        single_file_utils.convert_ldm_vae_checkpoint(meta_checkpoint, dict(vae.config)),
        vae_from_original(meta_checkpoint, vae.config),
    ):
        assert {k: v.shape for k, v in converted.items()} == shapes
    clip_l = {
        k.removeprefix("text_model."): v
        for k, v in single_file_utils.convert_ldm_clip_checkpoint(meta_checkpoint).items()
    }
    clip_l.pop("embeddings.position_ids")
    assert {k: v.shape for k, v in clip_l.items()} == {k: v.shape for k, v in text_encoder.state_dict().items()}
    assert clip_l.keys() == clip_l_from_original(meta_checkpoint).keys()
    clip_g = single_file_utils.convert_open_clip_checkpoint(text_encoder_2, meta_checkpoint, prefix=CLIP_G_PREFIX)
    assert {k: v.shape for k, v in clip_g.items()} == {k: v.shape for k, v in text_encoder_2.state_dict().items()}
    text_model, projection = clip_g_from_original(meta_checkpoint)
    ours = {f"text_model.{k}": v.shape for k, v in text_model.items()} | {"text_projection.weight": projection.shape}
    assert ours == {k: v.shape for k, v in clip_g.items()}


def test_bundled_configs_build_the_published_architectures():
    unet = UNet2DConditionModel.load_config(SDXL_BASE_CONFIG_DIR, subfolder="unet")
    assert unet == load_sdxl_config("unet") and unet["cross_attention_dim"] == 2048
    assert load_sdxl_config("text_encoder_2")["projection_dim"] == 1280
    with pytest.raises(ValueError, match="unknown SDXL component 'tokenizer'"):
        load_sdxl_config("tokenizer")


# ------------------------------------------------------------------------------------------ tiny model values
def test_tiny_checkpoint_loads_identically_with_diffusers_from_single_file(tiny_sdxl_dir, tiny, tiny_checkpoint):
    pipe = StableDiffusionXLPipeline.from_single_file(tiny_checkpoint, config=tiny_sdxl_dir, local_files_only=True)
    for name in SDXL_COMPONENTS:
        assert_same_weights(tiny[name], getattr(pipe, name))
    metadata = export_files.read_metadata(tiny_checkpoint)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.resolution"] == "64x64" and metadata["di_star.conditioning_timestep"] == "399"


def test_tiny_checkpoint_converts_back_to_a_diffusers_pipeline(tiny_sdxl_dir, tiny, tiny_checkpoint, tmp_path):
    components = components_from_checkpoint(load_state_dict_file(tiny_checkpoint), base_model=tiny_sdxl_dir)
    export_diffusers(tiny_checkpoint, tmp_path / "pipe", base_model=tiny_sdxl_dir)
    out = export_diffusers(tiny_checkpoint, tmp_path / "pipe", base_model=tiny_sdxl_dir, overwrite=True)  # folder swap
    assert os.listdir(tmp_path) == ["pipe"]
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    for name in SDXL_COMPONENTS:
        assert_same_weights(tiny[name], components[name])
        assert_same_weights(tiny[name], getattr(pipe, name))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_checkpoint_casts_only_floating_weights(tiny_sdxl_dir, tiny, dtype, tmp_path):
    path = export_comfyui_checkpoint(tiny, tmp_path / "tiny.safetensors", dtype=dtype)
    torch_dtype = DTYPES[dtype]
    checkpoint = load_file(path)
    assert checkpoint[f"{CLIP_L_PREFIX}text_model.embeddings.position_ids"].dtype == torch.int64
    assert {v.dtype for k, v in checkpoint.items() if not k.endswith("position_ids")} == {torch_dtype}
    components = components_from_checkpoint(checkpoint, base_model=tiny_sdxl_dir)
    assert_same_weights(tiny["unet"], components["unet"], torch_dtype)


def comfyui_old_unet_loader_accepts(sd):
    """ComfyUI's ``load_unet_state_dict`` as in the comfyui 0.0.1 wheel (June 2024, the ``models/unet`` era): sgm
    keys when ``input_blocks.0.0.weight`` is a key, else Diffusers keys (``model_config_from_diffusers_unet`` needs
    ``conv_in.weight``); anything else is "ERROR: Could not detect model type"."""
    return "input_blocks.0.0.weight" in sd or "conv_in.weight" in sd


def comfyui_new_unet_keys(sd):
    """The prefix handling of the newer ``load_diffusion_model_state_dict`` (``unet_prefix_from_state_dict``: the
    most common of ``model.diffusion_model.`` / ``model.model.`` if it starts over 5 keys, else ``model.``; then
    ``state_dict_prefix_replace(..., filter_keys=True)``, kept only if it leaves any key)."""
    counts = {c: sum(k.startswith(c) for k in sd) for c in ("model.diffusion_model.", "model.model.")}
    prefix = max(counts, key=counts.get) if max(counts.values()) > 5 else "model."
    stripped = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return stripped or sd


def test_unet_only_default_layout_loads_in_old_and_new_comfyui(tiny_sdxl_dir, tiny, tmp_path):
    """Our layout against the two loaders' key rules as read in their source; NOT a run of a ComfyUI loader (the
    wheel in tests/fidelity/ is not installed with the test dependencies), so docs/export.md marks it not verified."""
    path = export_comfyui_unet(tiny_sdxl_dir, tmp_path / "unet.safetensors", dtype="fp32")
    sd = load_file(path)
    assert "input_blocks.0.0.weight" in sd and not any(k.startswith(UNET_PREFIX) for k in sd)
    assert comfyui_old_unet_loader_accepts(sd) and comfyui_new_unet_keys(sd).keys() == sd.keys()
    original = unet_to_original(tiny["unet"].state_dict(), tiny["unet"].config)
    assert sd.keys() == {k.removeprefix(UNET_PREFIX) for k in original}
    assert checkpoint_kind(sd) == "unet-original"
    assert_same_weights(tiny["unet"], load_generator_unet(path, base_model=tiny_sdxl_dir))


def test_unet_only_single_file_layout_loads_with_from_single_file(tiny_sdxl_dir, tiny, tmp_path):
    path = export_comfyui_unet(tiny_sdxl_dir, tmp_path / "unet.safetensors", dtype="fp32", unet_keys="single-file")
    sd = load_file(path)
    assert all(k.startswith(UNET_PREFIX) for k in sd)
    assert not comfyui_old_unet_loader_accepts(sd)  # why it is not the default
    assert comfyui_new_unet_keys(sd).keys() == {k.removeprefix(UNET_PREFIX) for k in sd}
    theirs = UNet2DConditionModel.from_single_file(path, config=tiny_sdxl_dir, subfolder="unet", local_files_only=True)
    assert_same_weights(tiny["unet"], theirs)
    assert_same_weights(tiny["unet"], load_generator_unet(path, base_model=tiny_sdxl_dir))
    with pytest.raises(ExportError, match=r"unknown UNet key layout 'ldm' \(--unet-keys\): use 'comfyui'"):
        export_comfyui_unet("does/not/matter", tmp_path / "x.safetensors", unet_keys="ldm")


def test_cli_unet_keys_flag(tiny_sdxl_dir, tmp_path, capsys):
    run = ["export", "--model", tiny_sdxl_dir, "--dtype", "fp32", "--format"]
    out = tmp_path / "unet.safetensors"
    assert main([*run, "comfyui-unet", "--unet-keys", "single-file", "--out", str(out)]) == 0
    assert all(k.startswith(UNET_PREFIX) for k in load_file(out))
    assert main([*run, "comfyui-checkpoint", "--unet-keys", "comfyui", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "--unet-keys does not apply to --format comfyui-checkpoint" in capsys.readouterr().err


def test_load_generator_unet_reads_legacy_layouts(tiny_sdxl_dir, tiny, tmp_path):
    unet = tiny["unet"]
    torch.save(unet.state_dict(), tmp_path / "dmd2_unet.bin")  # DMD2's pickled state dict
    assert_same_weights(unet, load_generator_unet(str(tmp_path / "dmd2_unet.bin"), base_model=tiny_sdxl_dir))
    unet.save_pretrained(tmp_path / "repo" / "unet", variant="fp16")  # XDG-XHS/*/unet: only an fp16 variant
    fp16_file = tmp_path / "repo" / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    assert_same_weights(unet, load_generator_unet(str(fp16_file)))  # config.json beside the file
    assert_same_weights(unet, load_generator_unet(str(tmp_path / "repo"), subfolder="unet"))
    assert_same_weights(unet, load_generator_unet(tiny_sdxl_dir))  # a pipeline folder
    half = load_generator_unet(str(tmp_path / "dmd2_unet.bin"), base_model=tiny_sdxl_dir, torch_dtype=torch.float16)
    assert half.dtype == torch.float16


def test_full_size_dmd2_bin_loads_with_the_bundled_sdxl_config(meta_sdxl, tmp_path):
    # A DMD2-style pickled state dict of the full SDXL UNet, saved from meta tensors (keys and shapes, no weights):
    # with no config beside it, the bundled SDXL base config gives the architecture, offline.
    torch.save(meta_sdxl["unet"].state_dict(), tmp_path / "dmd2_sdxl_1step_unet.bin")
    unet = load_generator_unet(str(tmp_path / "dmd2_sdxl_1step_unet.bin"))
    assert len(unet.state_dict()) == 1680 and sum(p.numel() for p in unet.parameters()) == 2_567_463_684


_unpickled_code_ran = False


def _mark_code_ran():
    global _unpickled_code_ran
    _unpickled_code_ran = True


class _CodeCarryingPickle:
    def __reduce__(self):
        return _mark_code_ran, ()


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil_unet.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "payload": _CodeCarryingPickle()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*not a plain state dict"):
        load_generator_unet(str(path))
    assert not _unpickled_code_ran


def test_models_of_other_layouts_are_refused(tmp_path):
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    index = {"_class_name": "SomePipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (text_only / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match=r"not an SDXL or SD1.x/2.x pipeline.*has no \['vae', 'text_encoder'\]"):
        export_comfyui_checkpoint(str(text_only), tmp_path / "out.safetensors")
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
    (sd3 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="is a StableDiffusion3Pipeline folder without a UNet: only SDXL and SD1.x"):
        export_comfyui_unet(str(sd3), tmp_path / "out.safetensors")
    class_conditioned = UNet2DConditionModel(  # a timestep class embedding: neither SDXL's nor SD1.x/2.x's layout
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        sample_size=8,
        class_embed_type="timestep",
    )
    class_conditioned.save_pretrained(tmp_path / "class_unet")
    with pytest.raises(ExportError, match="not an SDXL or SD1.x/2.x UNet: class_embed_type='timestep'"):
        export_comfyui_unet(str(tmp_path / "class_unet"), tmp_path / "out.safetensors")
    assert not os.path.exists(tmp_path / "out.safetensors")


# ------------------------------------------------------------------------------------------ file safety
def test_existing_output_is_kept_unless_overwrite(tiny, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_comfyui_unet(tiny["unet"], out)
    assert out.read_bytes() == b"keep me"
    export_comfyui_unet(tiny["unet"], out, overwrite=True)
    assert checkpoint_kind(load_file(out)) == "unet-original"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # not the private mode of the temporary file


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tiny, tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_files, "save_file", disk_full)
    out = tmp_path / "unet.safetensors"
    with pytest.raises(ExportError, match=r"^disk full at .*: nothing was written \(.* was not created\)"):
        export_comfyui_unet(tiny["unet"], out)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError):
        export_comfyui_unet(tiny["unet"], out, overwrite=True)
    assert os.listdir(tmp_path) == ["unet.safetensors"] and out.read_bytes() == b"previous export"


# ------------------------------------------------------------------------------------------------- LoRA
RANK, LORA_ALPHA = 4, 16.0  # lora_alpha != rank on purpose: the PEFT scale is 4, not 1


def _save_tiny_lora(folder, **patterns) -> dict:
    """A tiny UNet with a LoRA on attention, resnet convs, time-embedding projections and feed-forward layers, saved
    as Diffusers does (adapter config in the metadata), plus fixed inputs and the adapted UNet's output."""
    unet = get_tiny_unet()
    config = LoraConfig(
        r=RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj"],
        init_lora_weights=False,  # random A and B, so every module changes the output
        **patterns,
    )
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([399, 399]),
        "encoder_hidden_states": torch.randn(2, 7, sum(TEXT_HIDDEN_SIZES), generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, TEXT_HIDDEN_SIZES[1], generator=generator),
            "time_ids": torch.randn(2, 6, generator=generator),
        },
    }
    with torch.no_grad():
        expected = unet(**inputs).sample
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict()
    )
    return {"folder": str(folder), "inputs": inputs, "expected": expected}


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> dict:
    """lora_alpha != r, plus a per-module rank and a per-module alpha."""
    patterns = {"rank_pattern": {"ff.net.2": 2}, "alpha_pattern": {"attn2.to_k": 3.0}}
    return _save_tiny_lora(tmp_path_factory.mktemp("lora"), **patterns)


@pytest.fixture(scope="module")
def uniform_lora(tmp_path_factory) -> dict:
    """lora_alpha != r, the same for every module (Diffusers' kohya reader drops per-module alphas)."""
    return _save_tiny_lora(tmp_path_factory.mktemp("uniform_lora"))


def _apply_kohya_with_the_kohya_formula(kohya: dict[str, torch.Tensor], base_unet) -> UNet2DConditionModel:
    """Independent kohya application (as ComfyUI/A1111 do it): W += alpha / rank · up·down on the original-layout
    weights found by name, then Diffusers' own converter brings the weights back to a Diffusers UNet."""
    original = {k: v.clone() for k, v in unet_to_original(base_unet.state_dict(), base_unet.config).items()}
    by_kohya_name = {k[len(UNET_PREFIX) : -len(".weight")].replace(".", "_"): k for k in original}
    for key, down in kohya.items():
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            up, alpha, rank = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"].item(), down.shape[0]
            weight = original[by_kohya_name[name.removeprefix("lora_unet_")]]
            weight += alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    unet = get_tiny_unet()
    unet.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(original, dict(unet.config)))
    return unet


def _output(unet, lora) -> torch.Tensor:
    with torch.no_grad():
        return unet(**lora["inputs"]).sample


def test_kohya_lora_with_true_alpha_reproduces_the_diffusers_output(tiny_sdxl_dir, tiny_lora, tmp_path):
    path = export_kohya_lora(
        tiny_lora["folder"], tmp_path / "kohya.safetensors", dtype="fp32", base_model=tiny_sdxl_dir
    )
    kohya = load_file(path)
    assert checkpoint_kind(kohya) == "kohya-lora"
    assert kohya["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha"].item() == LORA_ALPHA
    assert kohya["lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.alpha"].item() == 3.0
    assert kohya["lora_unet_input_blocks_3_1_transformer_blocks_0_ff_net_2.lora_down.weight"].shape[0] == 2
    unet = _apply_kohya_with_the_kohya_formula(kohya, get_tiny_unet())
    torch.testing.assert_close(_output(unet, tiny_lora), tiny_lora["expected"], rtol=1e-5, atol=1e-5)


def test_diffusers_convert_state_dict_to_kohya_writes_alpha_equal_to_rank(tiny_sdxl_dir, uniform_lora, tmp_path):
    # Why we do not use it: it writes alpha = rank, so kohya readers apply scale 1 instead of lora_alpha / r = 4;
    # even Diffusers' own kohya reader then gets a different UNet.
    peft = load_file(os.path.join(uniform_lora["folder"], "pytorch_lora_weights.safetensors"))
    theirs = convert_state_dict_to_kohya(peft)
    assert {v.item() for k, v in theirs.items() if k.endswith(".alpha")} == {RANK}  # not the trained 16
    save_file(theirs, tmp_path / "theirs.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="theirs.safetensors")
    assert (_output(pipe.unet, uniform_lora) - uniform_lora["expected"]).abs().max() > 0.1


def test_diffusers_loads_our_kohya_file(tiny_sdxl_dir, uniform_lora, tmp_path):
    run = ["export", "--model", uniform_lora["folder"], "--format", "kohya-lora", "--base-model", tiny_sdxl_dir]
    assert main([*run, "--dtype", "fp32", "--out", str(tmp_path / "kohya.safetensors")]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    torch.testing.assert_close(_output(pipe.unet, uniform_lora), uniform_lora["expected"], rtol=1e-5, atol=1e-5)


def test_kohya_round_trip_back_to_peft_keeps_per_module_rank_and_alpha(tiny_sdxl_dir, tiny_lora, tmp_path):
    kohya = export_kohya_lora(
        tiny_lora["folder"], tmp_path / "kohya.safetensors", dtype="fp32", base_model=tiny_sdxl_dir
    )
    back = export_diffusers(kohya, tmp_path / "peft", base_model=tiny_sdxl_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(back)
    torch.testing.assert_close(_output(pipe.unet, tiny_lora), tiny_lora["expected"], rtol=1e-5, atol=1e-5)


def test_lora_without_alpha_metadata_needs_lora_alpha(tiny_sdxl_dir, tiny_lora, tmp_path):
    bare = tmp_path / "bare.safetensors"  # what older trainers write: weights only, no adapter config
    save_file(load_file(os.path.join(tiny_lora["folder"], "pytorch_lora_weights.safetensors")), bare)
    with pytest.raises(ExportError, match="no lora_alpha in its metadata.*--lora-alpha"):
        export_kohya_lora(bare, tmp_path / "kohya.safetensors", base_model=tiny_sdxl_dir)
    path = export_kohya_lora(bare, tmp_path / "kohya.safetensors", base_model=tiny_sdxl_dir, lora_alpha=LORA_ALPHA)
    assert load_file(path)["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha"].item() == LORA_ALPHA
    with pytest.raises(ExportError, match="says lora_alpha=16.0, but lora_alpha=8.0 was passed"):
        export_kohya_lora(
            tiny_lora["folder"], tmp_path / "other.safetensors", base_model=tiny_sdxl_dir, lora_alpha=8.0
        )


def test_rslora_scale_becomes_the_kohya_alpha():
    lora = {
        "unet.conv_in.lora_A.weight": torch.ones(4, 4, 3, 3),
        "unet.conv_in.lora_B.weight": torch.ones(32, 4, 1, 1),
    }
    kohya = peft_lora_to_kohya(lora, get_tiny_unet().config, {"lora_alpha": 8, "use_rslora": True})
    assert kohya["lora_unet_input_blocks_0_0.alpha"].item() == pytest.approx(8 / 2 * 4)  # scale alpha/sqrt(r), x r


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_export_end_to_end(tiny_sdxl_dir, tiny, tmp_path, capsys):
    checkpoint, unet, back = tmp_path / "tiny.safetensors", tmp_path / "unet.safetensors", tmp_path / "back"
    run = ["export", "--model", tiny_sdxl_dir, "--dtype", "fp32"]
    assert main([*run, "--format", "comfyui-checkpoint", "--out", str(checkpoint)]) == 0
    assert main([*run, "--format", "comfyui-unet", "--out", str(unet), "--conditioning-timestep", "500"]) == 0
    assert (
        main(
            [
                "export",
                "--model",
                str(unet),
                "--format",
                "diffusers",
                "--base-model",
                tiny_sdxl_dir,
                "--out",
                str(back),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == [str(checkpoint), str(unet), str(back)]
    assert export_files.read_metadata(unet)["di_star.conditioning_timestep"] == "500"
    assert_same_weights(tiny["unet"], UNet2DConditionModel.from_pretrained(back))
    assert main([*run, "--format", "comfyui-checkpoint", "--out", str(checkpoint)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*run, "--format", "comfyui-checkpoint", "--out", str(checkpoint), "--overwrite"]) == 0


def test_cli_offers_exactly_the_export_formats():
    assert _EXPORT_FORMATS == tuple(FORMATS)  # the CLI lists them without importing torch for --help


def test_cli_rejects_options_the_format_does_not_use(tiny_sdxl_dir, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert (
        main(["export", "--model", tiny_sdxl_dir, "--format", "comfyui-checkpoint", "--lora-alpha", "8", "--out", out])
        == 2
    )
    assert "--lora-alpha does not apply to --format comfyui-checkpoint" in capsys.readouterr().err


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    command = [sys.executable, "-m", "diffusers_di_star.cli", "export", "--model", str(tmp_path / "nothing.bin")]
    command += ["--format", "comfyui-unet", "--out", str(tmp_path / "taken.safetensors")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("di-star export: error: ")]
    assert "already exists" in line


# ------------------------------------------------------------------------------- train -> export -> load back
TRAINER = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_di_star_sdxl.py")


def _train_lora(model: str, folder) -> str:
    """A real trainer run: one LoRA step on ``model``, saved as the trainer saves it (``lora.down`` keys)."""
    import importlib.util

    from accelerate.state import AcceleratorState

    from diffusers_di_star.testing import TINY_PROMPTS

    (folder / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    spec = importlib.util.spec_from_file_location("train_di_star_sdxl", TRAINER)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    AcceleratorState._reset_state(reset_partial_state=True)
    args = ["--pretrained_model_name_or_path", str(model), "--train_data_file", str(folder / "prompts.txt"),
            "--output_dir", str(folder / "run"), "--resolution", "64", "--train_batch_size", "1",
            "--max_train_steps", "1", "--learning_rate", "1e-2", "--reward_scale", "0", "--report_to", "none",
            "--checkpointing_steps", "1000", "--use_lora", "--generator_lora_rank", "4",
            "--generator_lora_alpha", "8", "--assistant_lora_rank", "4", "--assistant_lora_alpha", "4"]  # fmt: skip
    try:
        assert script.main(script.parse_args(args)) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return str(folder / "run")


@pytest.fixture(scope="module")
def trained_lora(tiny_sdxl_dir, tmp_path_factory) -> str:
    """Issue 11, case 6: the trainer's SDXL LoRA run folder."""
    return _train_lora(tiny_sdxl_dir, tmp_path_factory.mktemp("trained"))


def test_trainer_lora_exports_to_kohya_and_loads_back_equal(tiny_sdxl_dir, trained_lora, tmp_path, capsys):
    """train LoRA -> `di-star export --format kohya-lora` -> kohya_lora_to_peft and load_lora_weights == trained."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from diffusers_di_star import DIStarSDXLPipeline
    from diffusers_di_star.export import kohya_lora_to_peft

    trained = load_file(os.path.join(trained_lora, "pytorch_lora_weights.safetensors"))
    assert checkpoint_kind(trained) == "diffusers-lora"  # `unet.<module>.lora.down.weight`, as the issue found it
    kohya_path = str(tmp_path / "kohya.safetensors")
    run = ["export", "--model", trained_lora, "--format", "kohya-lora", "--base-model", tiny_sdxl_dir]
    assert main([*run, "--dtype", "fp32", "--out", kohya_path]) == 0
    assert capsys.readouterr().out.split() == [kohya_path]
    kohya = load_file(kohya_path)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # the trained lora_alpha
    peft, config = kohya_lora_to_peft(kohya, UNet2DConditionModel.load_config(tiny_sdxl_dir, subfolder="unet"))
    expected = convert_unet_state_dict_to_peft(trained)
    assert set(peft) == set(expected) and all(torch.equal(peft[k], expected[k]) for k in expected)
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (4, 8.0, {}, {})

    def images(lora_dir=None, weight_name=None):
        pipe = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
        if lora_dir is not None:
            pipe.load_lora_weights(lora_dir, weight_name=weight_name)
        return pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), output_type="np").images

    with_trained = images(trained_lora)
    assert abs(with_trained - images()).max() > 1e-4  # the adapter is not a no-op, so the equality below means it
    torch.testing.assert_close(images(str(tmp_path), "kohya.safetensors"), with_trained, rtol=0, atol=1e-6)


def test_comfyui_checkpoint_back_to_diffusers_runs_in_the_pipeline(tiny_sdxl_dir, tmp_path):
    """Issue 11, case 7: fp16 ComfyUI checkpoint -> diffusers folder -> DIStarSDXLPipeline.from_pretrained(out)."""
    from diffusers_di_star import DIStarSDXLPipeline

    checkpoint = export_comfyui_checkpoint(tiny_sdxl_dir, tmp_path / "tiny.safetensors")  # fp16, the default
    folder = export_diffusers(checkpoint, tmp_path / "back", base_model=tiny_sdxl_dir)
    pipe = DIStarSDXLPipeline.from_pretrained(folder)  # no dtype: every component float32
    assert {getattr(pipe, name).dtype for name in SDXL_COMPONENTS} == {torch.float32}
    prompts, seed = ["a cat", "a dog"], torch.Generator().manual_seed(0)
    images = pipe(prompts, generator=seed, output_type="np").images
    original = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
    for name in SDXL_COMPONENTS:  # the same weights rounded through fp16, as the checkpoint stores them
        getattr(original, name).to(torch.float16).to(torch.float32)
    expected = original(prompts, generator=torch.Generator().manual_seed(0), output_type="np").images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    half = DIStarSDXLPipeline.from_pretrained(folder, dtype=torch.float16)
    assert {getattr(half, name).dtype for name in SDXL_COMPONENTS} == {torch.float16}


@pytest.mark.parametrize("timestep", [5000, 1000, -1])
def test_conditioning_timestep_is_checked_before_loading(timestep, tmp_path, capsys):
    """Issue 11, case 8: t* must be in [0, 1000) for SDXL; the Python API and the CLI refuse it before any loading."""
    missing = str(tmp_path / "not-loaded")  # never read: the check comes first
    for export in (export_comfyui_checkpoint, export_comfyui_unet, export_kohya_lora):
        with pytest.raises(ExportError, match=rf"must be in \[0, 1000\) .*got {timestep}\."):
            export(missing, tmp_path / "x.safetensors", conditioning_timestep=timestep)
    out = str(tmp_path / "x.safetensors")
    code = main(["export", "--model", missing, "--format", "comfyui-unet", "--out", out,
                 "--conditioning-timestep", str(timestep)])  # fmt: skip
    assert code == 2 and f"got {timestep}" in capsys.readouterr().err and not os.path.exists(out)


# ------------------------------------------------------------------------------------------------ SD1.x / SD2.x
SD_COMPONENTS = ("unet", "vae", "text_encoder")
# Full-size SD1.5 and SD2.1 UNets and text encoders (their Hub configs, the fields that shape the weights).
SD_UNET_CONFIGS = {
    "sd1": {"attention_head_dim": 8, "cross_attention_dim": 768},
    "sd2": {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True},
}
SD_TEXT_CONFIGS = {
    "sd1": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "hidden_act": "quick_gelu", "projection_dim": 768},
    "sd2": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
            "hidden_act": "gelu", "projection_dim": 512},
}  # fmt: skip


def _meta_sd(version: str) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **SD_UNET_CONFIGS[version],
    }
    vae = {k: v for k, v in load_sdxl_config("vae").items() if not k.startswith("_")}  # SD's VAE architecture
    with init_empty_weights():
        return {
            "unet": UNet2DConditionModel(**unet_config),
            "vae": AutoencoderKL(**vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD_TEXT_CONFIGS[version])),
        }


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_sd_single_file_matches_diffusers_converters(version):
    components = _meta_sd(version)
    checkpoint = checkpoint_state_dict(components)
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == {"sd1": "v1", "sd2": "v2"}[version]
    unet = components["unet"]
    theirs = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    text_encoder = components["text_encoder"]
    if version == "sd1":
        assert checkpoint[f"{SD1_CLIP_PREFIX}text_model.embeddings.position_ids"].dtype == torch.int64
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
        text.pop("text_model.embeddings.position_ids")
    else:  # open_clip's fused attention, 23 of ViT-H's 24 layers, no projection (SD2.x's Diffusers encoder)
        assert checkpoint[f"{SD2_CLIP_PREFIX}transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
        assert not any(k.startswith(f"{SD2_CLIP_PREFIX}transformer.resblocks.23.") for k in checkpoint)
        text = single_file_utils.convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=SD2_CLIP_PREFIX)
    text = {k.removeprefix("text_model."): v.shape for k, v in text.items()}
    assert text == {k: v.shape for k, v in text_encoder.state_dict().items()}
    prefixes = (UNET_PREFIX, VAE_PREFIX, {"sd1": SD1_CLIP_PREFIX, "sd2": SD2_CLIP_PREFIX}[version])
    counts = [sum(k.startswith(p) for k in checkpoint) for p in prefixes]
    assert counts == {"sd1": [686, 248, 197], "sd2": [686, 248, 280]}[version] and sum(counts) == len(checkpoint)


def _save_tiny_sd1(path) -> str:
    """The tiny SD with SD1.x's layout: convolution proj_in/proj_out and a quick-GELU (OpenAI CLIP-L) encoder."""
    from transformers import CLIPTextModel

    components = get_tiny_sd_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel.from_config(
        {**components["unet"].config, "use_linear_projection": False}
    )
    encoder = components["text_encoder"]
    encoder.config.hidden_act = "quick_gelu"
    components["text_encoder"] = CLIPTextModel(encoder.config)
    components["text_encoder"].load_state_dict(encoder.state_dict())
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_sd_dirs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tiny-sd")
    return {"sd1": _save_tiny_sd1(folder / "sd1"), "sd2-v": save_tiny_sd_pipeline(folder / "sd2-v", 0, "v_prediction")}


def _one_step_images(model: str, lora_dir=None, weight_name=None):
    from diffusers_di_star import DIStarSDPipeline

    pipe = DIStarSDPipeline.from_pretrained(model)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    return pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("model", ["sd1", "sd2-v"])
def test_sd_single_file_round_trips_exactly_through_diffusers_and_ours(tiny_sd_dirs, model, tmp_path):
    folder, v = tiny_sd_dirs[model], model.endswith("-v")
    path = export_comfyui_checkpoint(folder, tmp_path / "sd.safetensors", dtype="fp32")
    checkpoint = load_file(path)
    assert checkpoint_kind(checkpoint) == "sd-checkpoint" and (V_PRED_KEY in checkpoint) == v
    clip_prefix = SD2_CLIP_PREFIX if v else SD1_CLIP_PREFIX  # the tiny SD2 is OpenCLIP's layout, the SD1 CLIP-L's
    assert f"{clip_prefix}{'token_embedding.weight' if v else 'text_model.final_layer_norm.weight'}" in checkpoint
    metadata = export_files.read_metadata(path)
    assert metadata["modelspec.architecture"] == ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v1")
    assert metadata["modelspec.prediction_type"] == ("v" if v else "epsilon")
    original = StableDiffusionPipeline.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)
    for name in SD_COMPONENTS:
        assert_same_weights(getattr(original, name), getattr(theirs, name))
    with pytest.raises(ExportError, match="is an SD1.x/2.x single file: pass --base-model"):
        export_diffusers(path, tmp_path / "nope")
    back = export_diffusers(path, tmp_path / "back", base_model=folder)
    scheduler = json.loads(open(os.path.join(back, "scheduler", "scheduler_config.json")).read())
    assert scheduler["prediction_type"] == ("v_prediction" if v else "epsilon")
    np.testing.assert_array_equal(_one_step_images(back), _one_step_images(folder))  # the same pixels, bit for bit

    unet_path = export_comfyui_unet(folder, tmp_path / "unet.safetensors", dtype="fp32")
    unet_file = load_file(unet_path)
    assert "input_blocks.0.0.weight" in unet_file and (V_PRED_KEY in unet_file) == v
    assert_same_weights(original.unet, load_generator_unet(unet_path, base_model=folder))


def test_sd_layout_and_text_encoder_activation_must_agree(tmp_path):
    components = get_tiny_sd_components()  # SD2.x's layout (linear projections) with an OpenCLIP-style GELU encoder
    components["text_encoder"].config.hidden_act = "quick_gelu"
    with pytest.raises(ExportError, match=r"SD2.x \(OpenCLIP\) layout, but the text encoder uses hidden_act="):
        export_comfyui_checkpoint(components, tmp_path / "x.safetensors")
    assert not os.path.exists(tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def tiny_sd_lora(tmp_path_factory) -> dict:
    """A LoRA on the tiny SD2.x-layout UNet: lora_alpha != r for every module, one module with another rank."""
    unet = get_tiny_sd_components()["unet"]
    config = LoraConfig(
        r=RANK, lora_alpha=LORA_ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2",
        "conv1", "time_emb_proj"], init_lora_weights=False, rank_pattern={"ff.net.2": 2},
    )  # fmt: skip
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([399, 399]),
        "encoder_hidden_states": torch.randn(2, 7, TEXT_HIDDEN_SIZES[0], generator=generator),
    }
    with torch.no_grad():
        expected = unet(**inputs).sample
    folder = tmp_path_factory.mktemp("sd_lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict()
    )
    return {"folder": str(folder), "inputs": inputs, "expected": expected}


def test_sd_kohya_lora_has_kohya_names_true_alpha_and_loads_in_diffusers(tiny_sd_dirs, tiny_sd_lora, tmp_path):
    base = tiny_sd_dirs["sd2-v"]
    path = export_kohya_lora(tiny_sd_lora["folder"], tmp_path / "kohya.safetensors", dtype="fp32", base_model=base)
    kohya = load_file(path)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # sd-scripts' SD1/2 naming
    assert kohya[f"{name}.alpha"].item() == LORA_ALPHA
    assert kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight"].shape[0] == 2
    metadata = export_files.read_metadata(path)
    assert metadata["ss_base_model_version"] == "sd_v2"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    # kohya's formula on the Diffusers weights the names point at: W + alpha / rank · up·down
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    weights, modules = unet.state_dict(), _modules_by_kohya_name(unet)
    for key, down in kohya.items():
        if key.endswith(".lora_down.weight"):
            module = key.split(".")[0]
            up, alpha = kohya[f"{module}.lora_up.weight"], kohya[f"{module}.alpha"].item()
            weight = weights[modules[module] + ".weight"]
            weight += alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    unet.load_state_dict(weights)
    torch.testing.assert_close(_output(unet, tiny_sd_lora), tiny_sd_lora["expected"], rtol=1e-5, atol=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    torch.testing.assert_close(_output(pipe.unet, tiny_sd_lora), tiny_sd_lora["expected"], rtol=1e-5, atol=1e-5)
    back = export_diffusers(path, tmp_path / "peft", base_model=base)  # kohya -> PEFT, exactly the saved tensors
    peft = load_file(os.path.join(back, "pytorch_lora_weights.safetensors"))
    saved = load_file(os.path.join(tiny_sd_lora["folder"], "pytorch_lora_weights.safetensors"))
    assert peft.keys() == saved.keys() and all(torch.equal(peft[k], saved[k]) for k in saved)


def test_sd_v_lora_run_folder_exports_with_its_base_model_and_prediction_type(tiny_sd_dirs, tiny_sd_lora, tmp_path):
    """A LoRA run folder names its base model (training_args.json): its architecture and v-prediction are used."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_args.json").write_text(
        json.dumps({"use_lora": True, "pretrained_model_name_or_path": tiny_sd_dirs["sd2-v"]})
    )
    shutil.copy(os.path.join(tiny_sd_lora["folder"], "pytorch_lora_weights.safetensors"), run)
    unet_file = load_file(export_model(str(run), "comfyui-unet", tmp_path / "unet.safetensors", dtype="fp32"))
    assert V_PRED_KEY in unet_file and "input_blocks.0.0.weight" in unet_file
    lora = export_model(str(run), "kohya-lora", tmp_path / "kohya.safetensors")
    assert export_files.read_metadata(lora)["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def _modules_by_kohya_name(unet) -> dict[str, str]:
    """sd-scripts' SD1.x/2.x names: ``lora_unet_`` + the Diffusers module path with dots replaced by underscores."""
    return {"lora_unet_" + k.rsplit(".", 1)[0].replace(".", "_"): k.rsplit(".", 1)[0] for k in unet.state_dict()}


def test_trainer_sd_lora_run_exports_to_kohya_and_loads_back_equal(tiny_sd_dirs, tmp_path_factory, tmp_path):
    run = _train_lora(tiny_sd_dirs["sd1"], tmp_path_factory.mktemp("trained_sd"))
    path = export_model(run, "kohya-lora", tmp_path / "kohya.safetensors", dtype="fp32")  # base model: the run's
    assert export_files.read_metadata(path)["ss_base_model_version"] == "sd_v1"
    assert {v.item() for k, v in load_file(path).items() if k.endswith(".alpha")} == {8.0}  # the trained alpha
    with_run = _one_step_images(tiny_sd_dirs["sd1"], run)
    assert np.abs(with_run - _one_step_images(tiny_sd_dirs["sd1"])).max() > 1e-4  # the LoRA is not a no-op
    np.testing.assert_allclose(_one_step_images(tiny_sd_dirs["sd1"], str(tmp_path), "kohya.safetensors"), with_run,
                               rtol=0, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_comfyui_lora_carries_each_modules_true_alpha(name, tmp_path):
    """ComfyUI scales a Diffusers-keyed SD3/FLUX LoRA by ``<module>.alpha`` / rank (1 without it, whatever the
    metadata says: tests/fidelity/check_comfy_sd3_flux.py), so the export writes alpha = lora_alpha for each module."""
    from diffusers_di_star.families import FAMILIES
    from diffusers_di_star.testing import get_tiny_flux_transformer, get_tiny_sd3_transformer

    family = FAMILIES[name]
    network = {"sd3": get_tiny_sd3_transformer, "flux": get_tiny_flux_transformer}[name]()
    saved = save_trainer_lora(family, network, tmp_path / "run", lora_alpha=8.0)
    out = export_model(str(tmp_path / "run"), "comfyui-lora", tmp_path / "comfy.safetensors", dtype="fp32")
    exported = load_file(out)
    alphas = {k: v for k, v in exported.items() if k.endswith(".alpha")}
    assert sorted(set(exported) - set(alphas)) == sorted(f"transformer.{k}" for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(exported[f"transformer.{key}"], value, rtol=0, atol=0)
    modules = {k.rsplit(".lora_", 1)[0] for k in saved}
    assert sorted(alphas) == sorted(f"transformer.{m}.alpha" for m in modules)
    assert all(v.dtype == torch.float32 and v.item() == 8.0 for v in alphas.values())

    # An earlier SD3/FLUX file (lora.down keys for the attention projections) exports the same.
    earlier = {f"transformer.{k}": v for k, v in convert_state_dict_to_diffusers(saved).items()}
    save_file(earlier, tmp_path / "earlier.safetensors", metadata=export_files.read_metadata(
        tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    again = export_comfyui_lora(tmp_path / "earlier.safetensors", tmp_path / "again.safetensors", dtype="fp32")
    assert load_file(again).keys() == exported.keys()


def test_comfyui_lora_refuses_a_unet_lora_and_names_kohya_lora(tiny_lora, tmp_path):
    with pytest.raises(ExportError, match="is a UNet LoRA; --format kohya-lora writes it with its alphas"):
        export_comfyui_lora(tiny_lora["folder"], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
