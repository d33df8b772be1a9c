"""The trainer (``examples/train_di_star_sdxl.py``) on every family but SDXL-ε (``test_training_script.py`` has that):
tiny SD1.5 (ε), SD2.x-v and SDXL-v, LoRA and full; exports, reloads in the family's pipeline, resumes exactly."""

import numpy as np
import pytest
import test_training_script as trainer_tests
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from test_training_script import LORA, lora_tensors, run, train_args

from diffusers_di_star import DIStarSDPipeline, DIStarSDXLPipeline
from diffusers_di_star.testing import TINY_PROMPTS, save_tiny_sd_pipeline, save_tiny_sdxl_pipeline

# The trainer tests' fixtures: the example script, a prompt file, one thread and a stub reward for every test.
script, prompt_file, one_thread_and_stub_reward = (
    trainer_tests.script,
    trainer_tests.prompt_file,
    trainer_tests.one_thread_and_stub_reward,
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    return {
        "sd": save_tiny_sd_pipeline(folder / "sd"),
        "sd-v": save_tiny_sd_pipeline(folder / "sd-v", prediction_type="v_prediction"),
        "sdxl-v": save_tiny_sdxl_pipeline(folder / "sdxl-v", prediction_type="v_prediction"),
    }


def images(pipe_class, model, lora_dir=None):
    """One-step images of ours, or of diffusers' own pipeline with LCMScheduler(timesteps=[399]), guidance 0."""
    pipe = pipe_class.from_pretrained(model)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    call = {}
    if pipe_class in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        call = {"timesteps": [399], "guidance_scale": 0.0}
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(list(TINY_PROMPTS[:2]), height=64, width=64, generator=generator, output_type="np", **call).images


def test_sd_lora_run_reloads_and_resumes_exactly(script, tiny_models, prompt_file, tmp_path):
    model, common = tiny_models["sd"], [*LORA, "--assistant_updates_per_step", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(script, *train_args(model, prompt_file, straight, *common, "--max_train_steps", "3")) == 0
    assert run(script, *train_args(model, prompt_file, resumed, *common, "--checkpointing_steps", "1")) == 0
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    assert run(script, *train_args(model, prompt_file, resumed, *common, *resume)) == 0
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert expected.keys() == actual.keys() and all(k.startswith("unet.") for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)

    card = (straight / "README.md").read_text()  # the card names the SD pipelines and licence, not SDXL's
    assert "DIStarSDPipeline" in card and "`StableDiffusionPipeline`" in card and "SDXL" not in card
    assert "- stable-diffusion\n" in card and "license: other" in card
    ours, plain = images(DIStarSDPipeline, model, straight), images(StableDiffusionPipeline, model, straight)
    assert np.abs(ours - images(DIStarSDPipeline, model)).max() > 1e-3  # the LoRA changed the generator
    np.testing.assert_allclose(ours, plain, atol=1e-4)


def test_sd_v_full_run_writes_a_v_prediction_pipeline(script, tiny_models, prompt_file, tmp_path):
    model = tiny_models["sd-v"]
    extra = ["--learning_rate", "1e-3", "--validation_prompts", "a cat", "--pretrained_generator", model]
    assert run(script, *train_args(model, prompt_file, tmp_path, *extra)) == 0
    assert (tmp_path / "images" / "000.png").is_file()
    pipe = DIStarSDPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.conditioning_timestep == 399
    ours = images(DIStarSDPipeline, str(tmp_path))
    assert np.abs(ours - images(DIStarSDPipeline, model)).max() > 1e-3
    np.testing.assert_allclose(ours, images(StableDiffusionPipeline, str(tmp_path)), atol=1e-4)


def test_sdxl_v_lora_run_loads_in_both_pipelines(script, tiny_models, prompt_file, tmp_path):
    model = tiny_models["sdxl-v"]
    assert run(script, *train_args(model, prompt_file, tmp_path, *LORA, "--cfg_mode", "reward")) == 0
    ours = images(DIStarSDXLPipeline, model, tmp_path)
    assert np.abs(ours - images(DIStarSDXLPipeline, model)).max() > 1e-3
    np.testing.assert_allclose(ours, images(StableDiffusionXLPipeline, model, tmp_path), atol=1e-4)
