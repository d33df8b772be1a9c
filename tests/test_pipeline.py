"""DIStarSDXLPipeline on the tiny offline SDXL: equivalence with the diffusers recipe, I/O, errors, loaders."""

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_di_star import DIStarSDXLPipeline, DIStarSDXLPipelineOutput, decode_latents, generate_x0
from diffusers_di_star.pipeline_di_star_sdxl import IGNORED_SDXL_ARGUMENTS

PROMPTS = ["a cat wearing sunglasses", "a fox in a snowy forest"]


def make_pipe(components, **kwargs):
    pipe = DIStarSDXLPipeline(**components, add_watermarker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_matches_diffusers_lcm_recipe(tiny_components):
    """Ours == StableDiffusionXLPipeline + LCMScheduler(timesteps=[399]) + guidance_scale=0, the released recipe."""
    ours = make_pipe(tiny_components)(PROMPTS, num_images_per_prompt=2, generator=gen(), output_type="np").images
    scheduler = LCMScheduler.from_config(tiny_components["scheduler"].config)
    reference = StableDiffusionXLPipeline(**{**tiny_components, "scheduler": scheduler}, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        PROMPTS, num_images_per_prompt=2, num_inference_steps=1, timesteps=[399], guidance_scale=0,
        generator=gen(), output_type="np",
    ).images
    assert ours.shape == (4, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_equals_generate_x0_then_decode(tiny_components):
    pipe = make_pipe(tiny_components)
    images = pipe(PROMPTS, generator=gen(), output_type="pt").images

    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    z = torch.randn((2, 4, 8, 8), generator=gen())
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1)
    with torch.no_grad():
        x0 = generate_x0(pipe.unet, z, prompt_embeds, {"text_embeds": pooled, "time_ids": time_ids},
                         pipe.scheduler.alphas_cumprod, 399)
        expected = (decode_latents(pipe.vae, x0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_fixed_seed_pixel_slice(tiny_components):
    image = make_pipe(tiny_components)("a photo of an astronaut", generator=gen(0), output_type="np").images[0]
    expected = np.array([0.6033, 0.5670, 0.6297, 0.6407, 0.6334, 0.7306, 0.5708, 0.5667, 0.6860])
    np.testing.assert_allclose(image[-3:, -3:, -1].flatten(), expected, atol=1e-3)


def test_seeds_are_reproducible_and_distinct(tiny_components):
    pipe = make_pipe(tiny_components)
    a, b, c = (pipe("a cat", generator=gen(s), output_type="np").images for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_generator_list_gives_per_image_seeds(tiny_components):
    pipe = make_pipe(tiny_components)
    batch = pipe(PROMPTS, generator=[gen(3), gen(4)], output_type="np").images
    single = pipe(PROMPTS[1], generator=gen(4), output_type="np").images
    np.testing.assert_allclose(batch[1], single[0], atol=1e-5)


def test_prompt_embeds_equal_prompt(tiny_components):
    pipe = make_pipe(tiny_components)
    from_text = pipe(PROMPTS, generator=gen(), output_type="np").images
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    from_embeds = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, generator=gen(), output_type="np")
    np.testing.assert_allclose(from_text, from_embeds.images, atol=1e-6)


def test_conditioning_timestep_is_used(tiny_components):
    pipe = make_pipe(tiny_components)
    latents_399 = pipe("a cat", generator=gen(), output_type="latent").images
    latents_250 = pipe("a cat", generator=gen(), output_type="latent", conditioning_timestep=250).images
    assert (latents_399 - latents_250).abs().max() > 1e-3


def test_save_load_round_trip(tiny_components, tmp_path):
    pipe = make_pipe(tiny_components, conditioning_timestep=250)
    expected = pipe(PROMPTS, generator=gen(), output_type="np").images
    pipe.save_pretrained(tmp_path)

    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"
    assert model_index["conditioning_timestep"] == 250
    assert model_index["scheduler"] == ["diffusers", "LCMScheduler"]

    loaded = DIStarSDXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.conditioning_timestep == 250
    np.testing.assert_array_equal(loaded(PROMPTS, generator=gen(), output_type="np").images, expected)

    for plain_cls in (StableDiffusionXLPipeline, DiffusionPipeline):  # plain diffusers loads and reproduces it
        plain = plain_cls.from_pretrained(tmp_path)
        plain.set_progress_bar_config(disable=True)
        assert type(plain) is StableDiffusionXLPipeline
        images = plain(PROMPTS, num_inference_steps=1, timesteps=[250], guidance_scale=0, generator=gen(),
                       output_type="np").images
        assert np.abs(images - expected).max() <= 1e-5


def test_loads_plain_sdxl_folder_with_default_timestep(tiny_sdxl_dir):
    pipe = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert pipe.conditioning_timestep == 399
    assert isinstance(pipe.scheduler, LCMScheduler)  # SDXL base's Euler scheduler, same betas
    torch.testing.assert_close(
        pipe.scheduler.alphas_cumprod,
        StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).scheduler.alphas_cumprod,
    )


def test_unet_override_and_from_pipe(tiny_sdxl_dir, tiny_components):
    other_unet = tiny_components["unet"]
    torch.nn.init.normal_(other_unet.conv_out.weight, std=0.02)
    pipe = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir, unet=other_unet)
    assert pipe.unet is other_unet

    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ours = DIStarSDXLPipeline.from_pipe(plain)
    assert ours.unet is plain.unet and isinstance(ours.scheduler, LCMScheduler)


def test_output_types_and_return_dict(tiny_components):
    pipe = make_pipe(tiny_components)
    out = pipe(PROMPTS, generator=gen())
    assert isinstance(out, DIStarSDXLPipelineOutput)
    assert all(isinstance(im, PIL.Image.Image) and im.size == (64, 64) for im in out.images)
    np_images = pipe(PROMPTS, generator=gen(), output_type="np").images
    assert np_images.shape == (2, 64, 64, 3) and np_images.dtype == np.float32
    pt = pipe(PROMPTS, generator=gen(), output_type="pt").images
    assert pt.shape == (2, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    latents = pipe(PROMPTS, generator=gen(), output_type="latent", height=128, width=96).images
    assert latents.shape == (2, 4, 16, 12)
    as_tuple = pipe(PROMPTS, generator=gen(), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_array_equal(as_tuple[0], np_images)


def test_explicit_latents(tiny_components):
    pipe = make_pipe(tiny_components)
    z = torch.randn((1, 4, 8, 8), generator=gen(7))
    from_latents = pipe("a cat", latents=z, output_type="np").images
    from_generator = pipe("a cat", generator=gen(7), output_type="np").images
    np.testing.assert_array_equal(from_latents, from_generator)


def test_callback_on_step_end(tiny_components):
    pipe = make_pipe(tiny_components)
    calls = []

    def zero_latents(pipeline, step, timestep, kwargs):
        calls.append((step, timestep, sorted(kwargs)))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    images = pipe("a cat", generator=gen(), output_type="pt", callback_on_step_end=zero_latents,
                  callback_on_step_end_tensor_inputs=["latents", "add_time_ids"]).images
    assert calls == [(0, 399, ["add_time_ids", "latents"])]
    with torch.no_grad():
        expected = (decode_latents(pipe.vae, torch.zeros(1, 4, 8, 8)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 60}, "multiples of the VAE factor 8, got 60×64"),
        ({"prompt": []}, "empty list"),
        ({"prompt": None}, "Pass a `prompt`"),
        ({"prompt": 3}, "must be a string or a list of strings"),
        ({"prompt_2": ["a", "b", "c"]}, "`prompt_2` has 3 prompts but `prompt` has 2"),
        ({"prompt_embeds": torch.zeros(2, 77, 96)}, "Pass either `prompt` or `prompt_embeds`"),
        ({"generator": [torch.Generator()] * 3}, "Got 3 generators for 2 images"),
        ({"latents": torch.zeros(2, 4, 16, 16)}, "`latents` must have shape (2, 4, 8, 8)"),
        ({"conditioning_timestep": 1000}, "must be in [0, 1000)"),
        ({"conditioning_timestep": -1}, "must be in [0, 1000)"),
        ({"conditioning_timestep": 399.5}, "must be an integer timestep"),
        ({"num_images_per_prompt": 0}, "positive integer"),
        ({"output_type": "jpeg"}, "`output_type` must be one of"),
        ({"height": 0}, "`height` must be a positive multiple of the VAE factor 8, got 0"),
        ({"width": -64}, "`width` must be a positive multiple of the VAE factor 8, got -64"),
        ({"height": 64.0}, "`height` must be an integer number of pixels, got the float 64.0"),
        ({"height": 65536, "width": 65536}, "65536×65536 = 4,294,967,296 pixels is above the limit of 16,777,216"),
        ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "must be a subset of"),
    ],
)
def test_check_inputs_errors(tiny_components, kwargs, message):
    pipe = make_pipe(tiny_components)
    call = {"prompt": PROMPTS, **kwargs}
    with pytest.raises(ValueError) as err:
        pipe(**call)
    assert message in str(err.value)


def test_embeds_batch_mismatch(tiny_components):
    pipe = make_pipe(tiny_components)
    with pytest.raises(ValueError, match="batch size 2 but `pooled_prompt_embeds` has 1"):
        pipe(prompt_embeds=torch.zeros(2, 77, 96), pooled_prompt_embeds=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="needs `pooled_prompt_embeds`"):
        pipe(prompt_embeds=torch.zeros(2, 77, 96))


def test_invalid_conditioning_timestep_at_construction(tiny_components):
    with pytest.raises(ValueError, match=r"must be in \[0, 1000\) .*got 1500"):
        make_pipe(tiny_components, conditioning_timestep=1500)


def test_guidance_and_negative_prompt_are_ignored_with_a_warning(tiny_components):
    pipe = make_pipe(tiny_components)
    expected = pipe("a cat", generator=gen(), output_type="np").images
    with pytest.warns(UserWarning, match="do not use classifier-free guidance") as record:
        images = pipe("a cat", guidance_scale=7.5, negative_prompt="blurry", generator=gen(), output_type="np").images
    assert len(record) == 2
    np.testing.assert_array_equal(images, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the LCM-recipe arguments are accepted silently
        pipe("a cat", guidance_scale=0.0, num_inference_steps=1, output_type="latent")


def test_sdxl_arguments_one_step_makes_meaningless_warn_once_each(tiny_components):
    """SDXL code runs unchanged: every multi-step / CFG argument is ignored with exactly one warning naming it."""
    pipe = make_pipe(tiny_components)
    expected = pipe("a cat", generator=gen(), output_type="np").images
    embeds = torch.zeros(1, 77, 96)
    sdxl_call = {
        "num_inference_steps": 50, "timesteps": np.array([999, 499]), "sigmas": [14.6, 1.0], "denoising_end": 0.8,
        "eta": 0.5,
        "guidance_scale": 5.0, "guidance_rescale": 0.7, "negative_prompt": "blurry", "negative_prompt_2": "dark",
        "negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": torch.zeros(1, 64),
        "negative_original_size": (512, 512), "negative_crops_coords_top_left": (8, 8),
        "negative_target_size": (512, 512),
    }  # fmt: skip
    assert set(sdxl_call) == set(IGNORED_SDXL_ARGUMENTS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        images = pipe("a cat", generator=gen(), output_type="np", **sdxl_call).images
    np.testing.assert_array_equal(images, expected)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    for name in sdxl_call:
        assert sum(m.startswith(f"`{name}=") for m in messages) == 1, (name, messages)
    assert len(messages) == len(sdxl_call)
    assert "`num_inference_steps=50` is ignored: DIStarSDXLPipeline generates in exactly one step" in messages[0]
    assert any(m.startswith("`negative_prompt_embeds=an array` is ignored") for m in messages)
    assert any(m.startswith("`timesteps=an array` is ignored") for m in messages)  # NumPy arrays too
    # SDXL's own defaults and the one-step recipe's values say "not used": no warning.
    recipe = {"num_inference_steps": 1, "guidance_scale": 0.0, "eta": 0.0, "guidance_rescale": 0.0,
              "negative_crops_coords_top_left": [0, 0]}  # fmt: skip  (a list, as SDXL code often passes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a cat", output_type="latent", **recipe)


def test_lora_load_changes_output_and_unload_restores(tiny_components, tmp_path):
    pipe = make_pipe(tiny_components)
    base = pipe(PROMPTS, generator=gen(), output_type="np").images

    unet = tiny_components["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))

    pipe.load_lora_weights(tmp_path, adapter_name="di_star")
    with_lora = pipe(PROMPTS, generator=gen(), output_type="np").images
    assert np.abs(with_lora - base).max() > 1e-3
    # same as the peft-adapted UNet the LoRA came from
    reference = make_pipe({**tiny_components, "unet": unet})(PROMPTS, generator=gen(), output_type="np").images
    np.testing.assert_allclose(with_lora, reference, atol=1e-5)

    pipe.fuse_lora()
    np.testing.assert_allclose(pipe(PROMPTS, generator=gen(), output_type="np").images, with_lora, atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()  # unfuse subtracts what fuse added: equal up to float rounding (1.04e-6 seen)
    np.testing.assert_allclose(pipe(PROMPTS, generator=gen(), output_type="np").images, base, atol=1e-5)


def test_fp16_vae_is_upcast_and_restored(tiny_components):
    pipe = make_pipe(tiny_components)
    latents = torch.randn(1, 4, 8, 8, generator=gen())
    expected = pipe.decode_latents(latents)
    pipe.vae.to(torch.float16)
    image = pipe.decode_latents(latents)
    assert image.dtype == torch.float32 and pipe.vae.dtype == torch.float16
    torch.testing.assert_close(image, expected, atol=2e-3, rtol=0)


def test_bf16_pipeline_decodes_without_upcast(tiny_components):
    pipe = make_pipe(tiny_components).to(torch.bfloat16)
    seen = []  # the dtype of every weight and input the VAE decoder runs with (an upcast would show float32)
    record = lambda module, args: seen.append((module.conv_in.weight.dtype, args[0].dtype))  # noqa: E731
    hook = pipe.vae.decoder.register_forward_pre_hook(record)
    try:
        image = pipe("a cat", generator=gen(), output_type="pt").images
    finally:
        hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert torch.isfinite(image).all() and pipe.vae.dtype == torch.bfloat16


def test_vae_slicing_gives_the_same_images(tiny_components):
    pipe = make_pipe(tiny_components)
    expected = pipe(PROMPTS, generator=gen(), output_type="np").images
    pipe.vae.enable_slicing()
    np.testing.assert_allclose(pipe(PROMPTS, generator=gen(), output_type="np").images, expected, atol=1e-5)


def test_vae_tiling_is_unused_up_to_the_tile_size_and_changes_larger_images(tiny_components):
    """docs/pipeline.md: tiles are the VAE's sample_size (1024² for SDXL), used once a side exceeds it; then each tile
    is decoded with its own group-norm statistics and attention, so images differ by far more than rounding."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from diffusers_di_star.configs import load_sdxl_config

    with init_empty_weights():
        sdxl_vae = AutoencoderKL.from_config(load_sdxl_config("vae"))
    assert (sdxl_vae.tile_sample_min_size, sdxl_vae.tile_latent_min_size, sdxl_vae.tile_overlap_factor) == (
        1024, 128, 0.25)  # fmt: skip
    pipe = make_pipe(tiny_components)
    assert pipe.vae.tile_sample_min_size == 64  # the tiny VAE's tile: 64² images (8×8 latents)
    untiled = {size: pipe(PROMPTS, height=size, width=size, generator=gen(), output_type="np").images
               for size in (64, 128)}  # fmt: skip
    pipe.vae.enable_tiling()
    tiles = []
    pipe.vae.decoder.register_forward_hook(lambda module, args, output: tiles.append(tuple(args[0].shape[-2:])))
    np.testing.assert_array_equal(pipe(PROMPTS, generator=gen(), output_type="np").images, untiled[64])
    assert tiles == [(8, 8)]  # one call: at the tile size tiling never runs
    tiles.clear()
    tiled = pipe(PROMPTS, height=128, width=128, generator=gen(), output_type="np").images
    assert len(tiles) == 9  # 16×16 latents: 3×3 tiles of 8×8 latents every 6, blended over 16 pixels
    difference = np.abs(tiled - untiled[128])
    # Measured on this tiny random-weight VAE (diffusers 0.42.1): max 0.339, mean 0.031 (pixels in [0, 1]).
    assert 0.25 < difference.max() < 0.45 and difference.mean() < 0.05


def test_xformers_errors_are_clear(tiny_components, monkeypatch):
    import importlib.util

    pipe = make_pipe(tiny_components)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"diffusers-di-star\[xformers\]"):
        pipe.enable_xformers_memory_efficient_attention()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    with pytest.raises(RuntimeError, match="runs on CUDA only, but this pipeline is on 'cpu'"):
        pipe.enable_xformers_memory_efficient_attention()


def test_one_step_map_has_no_graph_breaks(tiny_components):
    """torch.compile-friendly: dynamo captures the whole UNet call and the x0 map as one graph."""
    unet = tiny_components["unet"]
    added = {"text_embeds": torch.randn(2, 64), "time_ids": torch.randn(2, 6)}
    alphas_cumprod = LCMScheduler.from_config(tiny_components["scheduler"].config).alphas_cumprod
    explanation = torch._dynamo.explain(generate_x0)(
        unet, torch.randn(2, 4, 8, 8), torch.randn(2, 77, 96), added, alphas_cumprod, 399
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_from_single_file_loads_our_comfyui_checkpoint(tiny_sdxl_dir, tmp_path):
    from diffusers_di_star.export import export_comfyui_checkpoint

    path = export_comfyui_checkpoint(tiny_sdxl_dir, tmp_path / "tiny.safetensors", "fp32")
    pipe = DIStarSDXLPipeline.from_single_file(path, config=str(tiny_sdxl_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.conditioning_timestep == 399
    expected = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)(PROMPTS, generator=gen(), output_type="np").images
    np.testing.assert_array_equal(pipe(PROMPTS, generator=gen(), output_type="np").images, expected)


def test_scheduler_conversion_keeps_lcm_defaults(tiny_components):
    """A DDPM scheduler defaults to clip_sample=True; the converted LCM must not inherit that default."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(tiny_components["scheduler"].config)
    assert ddpm.config.clip_sample
    pipe = make_pipe({**tiny_components, "scheduler": ddpm})
    assert isinstance(pipe.scheduler, LCMScheduler) and not pipe.scheduler.config.clip_sample
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, ddpm.alphas_cumprod)
