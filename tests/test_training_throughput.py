"""The trainer's throughput logs: model FLOPs counted on the meta device, images/s logged every step."""

import functools

import pytest
import torch
from diffusers import AutoencoderKL
from test_training_script import LORA, load_script, run, train_args
from torch.nn.attention import SDPBackend, sdpa_kernel
from training_helpers import PROMPTS, RESOLUTION, PatternReward, tiny_conditioning

from diffusers_di_star.testing import (
    TINY_PROMPTS,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    save_tiny_sd_pipeline,
)
from diffusers_di_star.training import DIStarConfig, assistant_loss, generator_loss, setup_networks
from diffusers_di_star.training.preflight import detect_model_family
from diffusers_di_star.training.throughput import FlopCounter, iteration_flops, peak_flops


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"use_lora": False, "assistant_updates_per_step": 2}, 957_431_808),
        ({"use_lora": True, "generator_lora_rank": 4, "assistant_lora_rank": 4, "cfg_mode": "reward"}, 675_016_704),
    ],
    ids=["full-k2", "lora-cfg-reward"],
)
def test_meta_device_count_equals_a_counted_cpu_iteration(tiny_components, one_thread, overrides, expected):
    """Every matmul and convolution of a real iteration (batch 2, VAE decode for the reward) is in the meta count.

    (Attention through PyTorch's math path, as the meta count: a fused kernel's backward may be counted otherwise.)
    ``expected``: the tiny SDXL's counts when only SDXL was counted, unchanged by the count going through the family.
    """
    config = DIStarConfig(resolution=RESOLUTION, reward_scale=1.0, **overrides)
    networks = setup_networks(config, tiny_components["unet"])
    vae, cond = tiny_components["vae"].requires_grad_(False), tiny_conditioning(tiny_components)
    alphas_cumprod = tiny_components["scheduler"].alphas_cumprod
    with FlopCounter() as counter, sdpa_kernel(SDPBackend.MATH):  # the pattern reward itself has no matmul
        for _ in range(config.assistant_updates_per_step):
            assistant_loss(networks, config, cond, alphas_cumprod)[0].backward()
        generator_loss(networks, config, cond, PROMPTS, alphas_cumprod, vae, PatternReward())[0].backward()
    per_image = iteration_flops(networks, config, cond, alphas_cumprod, vae)
    assert per_image == expected and counter.get_total_flops() == len(PROMPTS) * per_image


@pytest.mark.parametrize(
    "save",
    [save_tiny_sd_pipeline, functools.partial(save_tiny_sd3_pipeline, with_t5=False), save_tiny_flux_pipeline],
    ids=["sd", "sd3", "flux"],
)
def test_every_family_is_counted_with_its_own_conditioning(save, tmp_path, one_thread):
    """MFU for SD1.5, SD3 and FLUX too: the meta count, built from the family's conditioning and schedule, equals a
    counted CPU iteration of the same networks (the family's own ∅, time sampling and network call; FLUX's packing)."""
    folder = save(tmp_path / "model")
    family = detect_model_family(folder).from_pretrained(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False)
    config = DIStarConfig(resolution=RESOLUTION, reward_scale=1.0, use_lora=False)
    networks = setup_networks(config, family.load_network(folder))
    cond = family.encode(PROMPTS, RESOLUTION)
    with FlopCounter() as counter, sdpa_kernel(SDPBackend.MATH):
        assistant_loss(networks, config, cond, family)[0].backward()
        generator_loss(networks, config, cond, PROMPTS, family, vae, PatternReward())[0].backward()
    per_image = iteration_flops(networks, config, cond, family, vae)
    assert per_image > 0 and counter.get_total_flops() == len(PROMPTS) * per_image


def test_no_mfu_without_a_known_gpu():
    assert peak_flops(torch.device("cpu"), "bf16") is None


def test_images_per_second_is_logged_every_step(tiny_sdxl_dir, tmp_path, monkeypatch, one_thread):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    script = load_script()
    monkeypatch.setattr(script, "load_reward", lambda spec: PatternReward().freeze())
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh `accelerate launch`
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kwargs: logged.append((step, values)))
    args = train_args(tiny_sdxl_dir, str(prompts), tmp_path / "out", *LORA, "--max_train_steps", "3")
    assert run(script, *args) == 0
    assert [step for step, _ in logged] == [1, 2, 3]
    assert all(values["images_per_second"] > 0 for _, values in logged)
    assert not any("mfu" in values for _, values in logged)  # a CPU has no known peak
