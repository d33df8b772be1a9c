"""The demo app's logic (``diffusers_di_star.demo_app``) without a browser, on the tiny model."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_di_star import DIStarFluxPipeline, DIStarSD3Pipeline, DIStarSDPipeline, DIStarSDXLPipeline
from diffusers_di_star.demo_app import (
    DemoError,
    ModelCache,
    Settings,
    compare,
    generate,
    read_png_settings,
)
from diffusers_di_star.testing import save_tiny_flux_pipeline, save_tiny_sd3_pipeline, save_tiny_sd_pipeline


def _expected(model, prompt, seed, width=64, height=64):
    pipe = DIStarSDXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return np.asarray(pipe(prompt, width=width, height=height, generator=generator).images[0])


def test_batch_images_equal_the_pipeline_per_seed_and_carry_their_settings(tiny_sdxl_dir, tmp_path, one_thread):
    settings = Settings("a red chair", str(tiny_sdxl_dir), seed=2**32 - 1, width=64, height=48, num_images=2)
    images = generate(ModelCache(device="cpu"), settings)
    assert [image.seed for image in images] == [2**32 - 1, 0]  # seed + i, modulo 2**32
    for image in images:
        np.testing.assert_array_equal(
            np.asarray(image.image), _expected(tiny_sdxl_dir, "a red chair", image.seed, 64, 48)
        )
        assert image.seconds > 0
    path = images[1].save(str(tmp_path / "image.png"))
    assert os.listdir(tmp_path) == ["image.png"]  # written through a temporary name, none left behind
    assert read_png_settings(path) == {
        "prompt": "a red chair", "model": str(tiny_sdxl_dir), "seed": 0, "width": 64, "height": 48,
        "num_images": 1, "lora": None, "lora_scale": 1.0, "steps": 1,
    }
    assert "Seed: 0, Size: 64x48" in PIL.Image.open(path).info["parameters"]


def test_lora_and_its_scale_match_the_pipeline_with_the_lora(tiny_components, tiny_sdxl_dir, tmp_path, one_thread):
    unet = tiny_components["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    cache = ModelCache(device="cpu")
    base = Settings("a cat", str(tiny_sdxl_dir), seed=3, width=64, height=64)
    plain = generate(cache, base)[0].image
    half = generate(cache, Settings(**{**base.__dict__, "lora": str(tmp_path), "lora_scale": 0.5}))[0].image
    pipe = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(tmp_path, adapter_name="lora")
    expected = pipe("a cat", width=64, height=64, generator=torch.Generator().manual_seed(3),
                    cross_attention_kwargs={"scale": 0.5}).images[0]
    np.testing.assert_array_equal(np.asarray(half), np.asarray(expected))
    assert np.abs(np.asarray(half, float) - np.asarray(plain, float)).max() > 0


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_every_familys_model_and_its_lora_scale_match_its_pipeline(family, tmp_path, one_thread):
    """The page runs any family's folder (SDXL: the tests above); SD3 and FLUX pipelines take the LoRA scale as
    ``joint_attention_kwargs``, UNet ones as ``cross_attention_kwargs``."""
    save, pipeline_class, network, scale_argument = {
        "sd": (save_tiny_sd_pipeline, DIStarSDPipeline, "unet", "cross_attention_kwargs"),
        "sd3": (save_tiny_sd3_pipeline, DIStarSD3Pipeline, "transformer", "joint_attention_kwargs"),
        "flux": (save_tiny_flux_pipeline, DIStarFluxPipeline, "transformer", "joint_attention_kwargs"),
    }[family]
    model = save(tmp_path / "model")
    pipe = pipeline_class.from_pretrained(model)
    getattr(pipe, network).add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    layers = {f"{network}_lora_layers": get_peft_model_state_dict(getattr(pipe, network))}
    pipe.save_lora_weights(tmp_path / "lora", **layers)
    cache = ModelCache(device="cpu")
    base = Settings("a cat", model, seed=3, width=64, height=64)
    plain = generate(cache, base)[0].image
    half = generate(cache, Settings(**{**base.__dict__, "lora": str(tmp_path / "lora"), "lora_scale": 0.5}))[0].image

    pipe = pipeline_class.from_pretrained(model)
    call = {"width": 64, "height": 64}
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(pipe("a cat", **call, generator=_seed(3)).images[0]))
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="lora")
    expected = pipe("a cat", **call, generator=_seed(3), **{scale_argument: {"scale": 0.5}}).images[0]
    np.testing.assert_array_equal(np.asarray(half), np.asarray(expected))
    assert np.abs(np.asarray(half, float) - np.asarray(plain, float)).max() > 0


def _seed(seed):
    return torch.Generator().manual_seed(seed)


def test_before_after_uses_the_same_seed_on_both_models(tiny_sdxl_dir, tmp_path, one_thread):
    from diffusers_di_star.testing import save_tiny_sdxl_pipeline

    other = save_tiny_sdxl_pipeline(tmp_path / "other", seed=1)
    before, after = compare(ModelCache(device="cpu"), Settings("a fox", str(tiny_sdxl_dir), seed=5, width=64,
                                                               height=64), other)
    np.testing.assert_array_equal(np.asarray(before[0].image), _expected(tiny_sdxl_dir, "a fox", 5))
    np.testing.assert_array_equal(np.asarray(after[0].image), _expected(other, "a fox", 5))
    assert after[0].settings.model == other and after[0].seed == before[0].seed == 5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "  "}, "Type a prompt"),
        ({"width": 60}, "width must be a positive multiple of 8, got 60"),
        ({"width": 4096, "height": 4096}, "above this app's limit of 4,194,304 pixels"),
        ({"num_images": 9}, "Images per request must be in [1, 8], got 9"),
        ({"seed": -1}, "The seed must be in [0, 4294967295]"),
        ({"model": "./no/such/folder"}, "a model './no/such/folder': no such file or folder"),
    ],
)
def test_bad_requests_are_one_message_before_any_model_loads(change, message):
    def loader(*args, **kwargs):
        if change.get("model"):
            from diffusers_di_star.runtime import load_pipeline

            return load_pipeline(*args, **kwargs)
        raise AssertionError("a model was loaded for a request that cannot run")

    settings = Settings(**{"prompt": "a cat", "model": "folder", "width": 64, "height": 64, **change})
    with pytest.raises(DemoError) as error:
        generate(ModelCache(device="cpu", loader=loader), settings)
    assert message in str(error.value)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="checks the offline message: set HF_HUB_OFFLINE=1")
def test_offline_hub_id_is_a_message_that_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DemoError, match="not in the local Hugging Face cache and the Hub is unreachable"):
        ModelCache(device="cpu").get("nobody/no-such-model")


def test_serve_checks_its_port_before_starting(capsys):
    from diffusers_di_star.cli import main

    assert main(["serve", "--tiny", "--port", "70000"]) == 2
    assert "di-star serve: error: --port must be in [0, 65535], got 70000." in capsys.readouterr().err


def test_a_variant_is_used_where_a_model_has_it(tiny_sdxl_dir, tmp_path):
    cache = ModelCache(device="cpu", variant="fp16")
    assert cache.get(str(tiny_sdxl_dir)).unet.dtype == torch.float32  # no fp16 files: its own weights
    DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))  # only fp16 files
    assert cache.get(str(tmp_path / "fp16")).unet.dtype == torch.float32  # loaded from them, in the cache's dtype
