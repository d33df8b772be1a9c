"""The FLUX.1 family (``families/flux.py``): its pieces (encoding, packing, dynamic σ shift, the guidance-distilled
reference), ``DIStarFluxPipeline`` against diffusers' ``FluxPipeline``, and the trainer (LoRA and full) on the tiny
FLUX: export, reload, exact resume, ``di-star generate``'s loader."""

import json

import numpy as np
import pytest
import test_training_script as trainer_tests
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from test_training_script import LORA, lora_tensors, run, train_args

from diffusers_di_star import DIStarFluxPipeline
from diffusers_di_star.families import FluxFamily, detect_family
from diffusers_di_star.families.flux import pack_latents, unpack_latents
from diffusers_di_star.families.sd3 import shift_sigmas
from diffusers_di_star.losses import cfg_eps
from diffusers_di_star.testing import TINY_PROMPTS, get_tiny_flux_components, save_tiny_flux_pipeline
from diffusers_di_star.training import DIStarConfig, generator_loss

PROMPTS = list(TINY_PROMPTS[:2])
# The trainer tests' fixtures: the example script, a prompt file, one thread and a stub reward for every test.
script, prompt_file, one_thread_and_stub_reward = (
    trainer_tests.script,
    trainer_tests.prompt_file,
    trainer_tests.one_thread_and_stub_reward,
)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "dev")


def _family(components, **kwargs) -> FluxFamily:
    scheduler = components["scheduler"]
    return FluxFamily(
        FluxFamily.schedule_from_scheduler(scheduler),
        [components["tokenizer"], components["tokenizer_2"]],
        [components["text_encoder"], components["text_encoder_2"]],
        scheduler,
        guidance_embeds=components["transformer"].config.guidance_embeds,
        **kwargs,
    )


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"output_type": "np", **kwargs}
    return pipe(PROMPTS, height=64, width=64, generator=generator, **kwargs).images


# ---- the family's pieces ------------------------------------------------------------------------------------------


def test_encoding_and_the_pipeline_equal_diffusers_flux(one_thread):
    components = get_tiny_flux_components()
    cond = _family(components).encode(PROMPTS, 64)
    diffusers_pipe = FluxPipeline(**components)
    with torch.no_grad():
        embeds, pooled, _ = diffusers_pipe.encode_prompt(PROMPTS, None)
        empty, empty_pooled, _ = diffusers_pipe.encode_prompt(["", ""], None)
    for actual, wanted in zip(
        (
            cond.prompt_embeds,
            cond.pooled_prompt_embeds,
            cond.negative_prompt_embeds,
            cond.negative_pooled_prompt_embeds,
        ),
        (embeds, pooled, empty, empty_pooled),
        strict=True,
    ):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=5e-5)  # one batched T5 call vs diffusers' two
    assert cond.prompt_embeds.shape == (2, 512, 32) and cond.guidance.tolist() == [3.5, 3.5]

    # σ* = 1: diffusers' single Euler step from σ = 1 to 0 is x0 = z − v, whatever the dynamic shift; g = 3.5 stored.
    one_step = _images(DIStarFluxPipeline(**components))
    wanted = _images(diffusers_pipe, num_inference_steps=1, guidance_scale=3.5)
    print("FLUX one step at σ* = 1, max |ours − diffusers|:", np.abs(one_step - wanted).max())
    np.testing.assert_allclose(one_step, wanted, rtol=0, atol=1e-6)
    # g is an input of the generator: another g gives another image, equal to diffusers' at that g.
    other_g = _images(DIStarFluxPipeline(**components, guidance=7.0))
    np.testing.assert_allclose(other_g, _images(diffusers_pipe, num_inference_steps=1, guidance_scale=7.0), atol=1e-6)
    assert np.abs(other_g - one_step).max() > 1e-3
    # σ* = 0.75: diffusers with sigmas=[0.75] on an unshifted scheduler (its dynamic shift would move 0.75).
    diffusers_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        components["scheduler"].config, use_dynamic_shifting=False, shift=1.0
    )
    ours = _images(DIStarFluxPipeline(**components), conditioning_timestep=0.75)
    np.testing.assert_allclose(ours, _images(diffusers_pipe, sigmas=[0.75], guidance_scale=3.5), atol=1e-6)
    assert np.abs(ours - one_step).max() > 1e-3
    pipe, seen = DIStarFluxPipeline(**components), {}

    def halve_x0(pipe, step, sigma, tensors):
        seen.update(step=step, sigma=sigma, names=sorted(tensors))
        return {"latents": tensors["latents"] / 2}

    latents = _images(pipe, output_type="latent")
    halved = _images(pipe, output_type="latent", callback_on_step_end=halve_x0)
    torch.testing.assert_close(halved, latents / 2, rtol=0, atol=0)
    assert seen == {"step": 0, "sigma": 1.0, "names": ["latents"]} and latents.shape == (2, 16, 8, 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(PROMPTS, height=72, width=64)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(2, 16, 8, 8\)"):  # unpacked, not (2, 16, 64)
        pipe(PROMPTS, height=64, width=64, latents=torch.zeros(2, 16, 64))
    with pytest.raises(ValueError, match="guidance"):
        DIStarFluxPipeline(**components, guidance=-1.0)


def test_packing_shift_and_the_guidance_distilled_reference():
    components = get_tiny_flux_components()
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert packed.shape == (2, 4 * 3, 64) and torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(packed[0, 1], latents[0, :, 0:2, 2:4].reshape(-1))  # token 1 = the patch at row 0, column 1

    # π: SD3's shifted uniform with shift exp(μ), μ as FluxPipeline computes it for (resolution/16)² tokens.
    family = _family(components)
    for resolution, tokens in ((256, 256), (1024, 4096)):  # μ = base_shift at 256 tokens, max_shift at 4096
        assert family.sigma_shift(resolution) == pytest.approx(np.exp(0.5 if tokens == 256 else 1.15), rel=1e-12)
    config = DIStarConfig(min_timestep=20, max_timestep=980, resolution=1024)
    sigmas = family.sample_timesteps(20_000, config, torch.Generator().manual_seed(0))
    # P(σ ≤ shift(u)) = (u − 0.02) / 0.96: half the mass below σ(u = 0.5).
    median = shift_sigmas(torch.tensor(0.5), np.exp(1.15)).item()
    assert abs((sigmas <= median).float().mean().item() - 0.5) < 0.015
    assert family.prediction_type == "flow" and family.latent_shape(2, 64) == (2, 16, 8, 8)

    # The CFG-enhanced reference of a guidance-distilled transformer is ONE call with g = γ ...
    transformer, cond = components["transformer"], family.encode(PROMPTS, 64)
    x_t, t = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        guided = family.guided_eps(transformer, x_t, t, cond, 5.0)
        torch.testing.assert_close(guided, family.eps(transformer, x_t, t, cond.with_guidance(5.0)), rtol=0, atol=0)
        assert (guided - family.eps(transformer, x_t, t, cond)).abs().max() > 1e-4  # g = 5 differs from g = 3.5
        # ... and SD3's two branches for a transformer without the guidance embedding (FLUX.1-schnell's layout).
        schnell = get_tiny_flux_components(guidance_embeds=False)["transformer"]
        family.guidance_embeds = False
        both = family.eps(schnell, torch.cat([x_t, x_t]), t.repeat(2), cond.unconditional().cat(cond)).chunk(2)
        torch.testing.assert_close(family.guided_eps(schnell, x_t, t, cond, 5.0), cfg_eps(*both, 5.0), rtol=0, atol=0)


# ---- the trainer on the tiny FLUX ---------------------------------------------------------------------------------


def test_lora_run_resumes_exactly_and_loads_in_both_pipelines(script, tiny_flux, prompt_file, tmp_path, monkeypatch):
    model, common = tiny_flux, [*LORA, "--guidance_scale", "3.5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(script, *train_args(model, prompt_file, straight, *common)) == 0
    assert run(script, *train_args(model, prompt_file, resumed, *common, "--max_train_steps", "1")) == 0
    calls = []
    monkeypatch.setattr(script, "generator_loss", lambda *a, **k: calls.append(1) or generator_loss(*a, **k))
    resume = ["--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]
    assert run(script, *train_args(model, prompt_file, resumed, *common, *resume)) == 0
    assert len(calls) == 1  # only step 2 ran: step 1 came from the checkpoint
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert expected.keys() == actual.keys() and all(k.startswith("transformer.") for k in expected)
    assert any("single_transformer_blocks" in k for k in expected) and any("ff_context" in k for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)

    ours = DIStarFluxPipeline.from_pretrained(model)
    before = _images(ours, output_type="latent")
    ours.load_lora_weights(straight)
    plain = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    plain.load_lora_weights(straight)
    assert (_images(ours, output_type="latent") - before).abs().max() > 5e-4  # the LoRA changed the generator
    np.testing.assert_allclose(_images(ours), _images(plain, num_inference_steps=1, guidance_scale=3.5), atol=1e-5)


def test_full_run_writes_a_flux_pipeline_that_generate_loads_and_resumes_exactly(
    script, tiny_flux, prompt_file, tmp_path
):
    from diffusers_di_star.runtime import load_pipeline

    out, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = [
        "--cfg_mode",
        "reward",
        "--divergence",
        "kl",
        "--precompute_prompt_embeddings",
        "--mixed_precision",
        "bf16",
    ]
    assert run(script, *train_args(tiny_flux, prompt_file, out, *extra)) == 0
    # Stopped after step 1 and resumed: the same transformer as the straight two steps, bit for bit.
    assert run(script, *train_args(tiny_flux, prompt_file, resumed, *extra, "--max_train_steps", "1")) == 0
    resume = ["--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]
    assert run(script, *train_args(tiny_flux, prompt_file, resumed, *extra, *resume)) == 0
    expected = DIStarFluxPipeline.from_pretrained(out).transformer.state_dict()
    actual = DIStarFluxPipeline.from_pretrained(resumed).transformer.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0)

    card = (out / "README.md").read_text()
    assert "`FluxPipeline` with `num_inference_steps=1` and `guidance_scale=3.5`" in card
    assert "- flux" in card and "LCMScheduler" not in card
    index = json.loads((out / "model_index.json").read_text())
    assert (
        index["_class_name"] == "FluxPipeline" and index["conditioning_timestep"] == 1.0 and index["guidance"] == 3.5
    )
    assert detect_family(str(out)) is FluxFamily
    pipe = load_pipeline(str(out))  # what `di-star generate` and `di-star eval` load
    assert type(pipe) is DIStarFluxPipeline
    ours = _images(pipe)
    assert np.abs(ours - _images(DIStarFluxPipeline.from_pretrained(tiny_flux))).max() > 1e-3
    plain = FluxPipeline.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(ours, _images(plain, num_inference_steps=1, guidance_scale=3.5), atol=1e-5)


def test_eval_samples_a_multi_step_flux_baseline_as_diffusers_does(tiny_flux):
    from diffusers_di_star.evaluation.runner import ModelSpec, load_model

    pipe = load_model(ModelSpec(tiny_flux, steps=2, guidance_scale=3.5), device="cpu")  # `di-star eval --steps 2`
    assert type(pipe) is FluxPipeline and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    plain = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    call = {"num_inference_steps": 2, "guidance_scale": 3.5}
    np.testing.assert_allclose(_images(pipe, **call), _images(plain, **call), rtol=0, atol=0)


def test_a_resolution_that_does_not_pack_is_one_line(script, tiny_flux, prompt_file, tmp_path, capsys):
    assert script.cli(train_args(tiny_flux, prompt_file, tmp_path, "--resolution", "72")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train_di_star_sdxl.py: error: --resolution 72: the flux family needs a multiple of 16")
    assert error.endswith("e.g. 64.")
