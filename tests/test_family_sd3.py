"""The SD3 / SD3.5 family (``families/sd3.py``): its pieces, Theorem 3.1 for a flow model, ``DIStarSD3Pipeline``
against diffusers' own, and the trainer (LoRA and full) on the tiny SD3: export, reload, exact resume."""

import json

import numpy as np
import pytest
import test_training_script as trainer_tests
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file
from test_losses import (
    EYE,
    M_REF,
    MU,
    N_SAMPLES,
    Z_TOL,
    A,
    _generate,
    _generator_cov,
    _grads,
    _mc_z_scores,
    _per_sample_params,
)
from test_training_script import LORA, lora_tensors, run, train_args

from diffusers_di_star import DIStarSD3Pipeline
from diffusers_di_star.cli import main as cli_main
from diffusers_di_star.families import FluxFamily, SD3Family, detect_family
from diffusers_di_star.families.sd3 import check_sigma_star, shift_sigmas
from diffusers_di_star.losses import score_distance, score_divergence_loss, time_weighting
from diffusers_di_star.one_step import FlowSchedule, diffuse, output_to_eps
from diffusers_di_star.testing import (
    TINY_PROMPTS,
    get_flux_scheduler,
    get_tiny_sd3_components,
    save_tiny_sd3_pipeline,
)
from diffusers_di_star.training import DIStarConfig, generator_loss

PROMPTS = list(TINY_PROMPTS[:2])
# The trainer tests' fixtures: the example script, a prompt file, one thread and a stub reward for every test.
script, prompt_file, one_thread_and_stub_reward = (
    trainer_tests.script,
    trainer_tests.prompt_file,
    trainer_tests.one_thread_and_stub_reward,
)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    return {
        "t5": save_tiny_sd3_pipeline(folder / "t5"),
        "no-t5": save_tiny_sd3_pipeline(folder / "no-t5", with_t5=False),
    }


def _family(components) -> SD3Family:
    names = [name for name in ("", "_2", "_3") if components[f"text_encoder{name}"] is not None]
    scheduler = components["scheduler"]
    return SD3Family(
        SD3Family.schedule_from_scheduler(scheduler),
        [components[f"tokenizer{name}"] for name in names],
        [components[f"text_encoder{name}"] for name in names],
        scheduler,
        joint_attention_dim=components["transformer"].config.joint_attention_dim,
    )


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"output_type": "np", **kwargs}
    return pipe(PROMPTS, height=64, width=64, generator=generator, **kwargs).images


# ---- the family's pieces ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_t5", [True, False])
def test_encoding_equals_the_sd3_pipeline_and_the_pipeline_equals_diffusers_one_step(with_t5, one_thread):
    components = get_tiny_sd3_components(with_t5=with_t5)
    cond = _family(components).encode(PROMPTS, 64)
    diffusers_pipe = StableDiffusion3Pipeline(**components)
    expected = diffusers_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    ours = (cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds)
    for actual, wanted in zip((*ours, cond.negative_pooled_prompt_embeds), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=5e-5)  # one batched call vs diffusers' two
    assert cond.prompt_embeds.shape == (2, 77 + 256, 96)
    if not with_t5:  # no T5: its 256 tokens are zeros, as diffusers does
        assert cond.prompt_embeds[:, 77:].abs().max() == 0

    # σ* = 1: diffusers' single Euler step from σ = 1 to 0 is x0 = z − v, whatever the scheduler's shift.
    one_step = _images(DIStarSD3Pipeline(**components))
    np.testing.assert_allclose(one_step, _images(diffusers_pipe, num_inference_steps=1, guidance_scale=0), atol=1e-6)
    # σ* = 0.75: diffusers with sigmas=[0.75] on an unshifted scheduler (its shift would move 0.75 elsewhere).
    diffusers_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config, shift=1.0)
    ours = _images(DIStarSD3Pipeline(**components), conditioning_timestep=0.75)
    np.testing.assert_allclose(ours, _images(diffusers_pipe, sigmas=[0.75], guidance_scale=0), atol=1e-6)
    assert np.abs(ours - one_step).max() > 1e-3


def test_time_sampler_one_step_time_and_detection(tiny_sd3, tmp_path):
    family = _family(get_tiny_sd3_components(with_t5=False))
    config = DIStarConfig(min_timestep=20, max_timestep=980)
    sigmas = family.sample_timesteps(20_000, config, torch.Generator().manual_seed(0))
    low, high = shift_sigmas(torch.tensor([0.02, 0.98]), 3.0).tolist()
    assert sigmas.dtype == torch.float32 and low <= sigmas.min() and sigmas.max() <= high
    # π is shifted uniform: P(σ ≤ shift(u)) = (u − 0.02) / 0.96; at u = 0.5, σ = 0.75 and half the mass is below.
    assert abs((sigmas <= 0.75).float().mean().item() - 0.5) < 0.015
    assert family.shift == 3.0 and family.prediction_type == "flow"
    assert family.network_class().__name__ == "SD3Transformer2DModel" and family.latent_channels == 16

    assert check_sigma_star(1) == 1.0
    for bad in (399, 0.0, -0.5, True, "1"):
        with pytest.raises(ValueError, match=r"σ\* in \(0, 1\]"):
            check_sigma_star(bad)
    with pytest.raises(ValueError, match="σ"):
        DIStarSD3Pipeline.from_pretrained(tiny_sd3["no-t5"], conditioning_timestep=399)

    assert detect_family(tiny_sd3["t5"]) is SD3Family and detect_family(tiny_sd3["no-t5"]) is SD3Family
    pipe = DIStarSD3Pipeline.from_pretrained(tiny_sd3["no-t5"], conditioning_timestep=0.5)
    assert pipe.text_encoder_3 is None and pipe.conditioning_timestep == 0.5
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["conditioning_timestep"] == 0.5
    assert DIStarSD3Pipeline.from_pretrained(tmp_path).conditioning_timestep == 0.5
    plain = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)  # as documented
    assert plain.text_encoder_3 is None


# ---- Theorem 3.1 for a flow model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family",
    [
        SD3Family(FlowSchedule(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)),
        FluxFamily(FlowSchedule(), scheduler=get_flux_scheduler()),  # π with the dynamic shift at 1024²
    ],
    ids=["sd3", "flux"],
)
def test_theorem_3_1_for_a_flow_model(family):
    """∇_θ D == ∇_θ L_DI* on the rectified-flow kernel x_t = (1 − σ)·x0 + σ·ε, σ ~ the family's π, with the
    assistant and the reference as exact velocity networks read through ε̂ = x_t + (1 − σ)·v (the conversion's x_t
    term carries part of the input gradient; reading v as ε fails by far).

    Toy as ``tests/test_losses.py``: g_θ(z) = μ + A·z, reference N(m, I), so p_θ,σ = N((1 − σ)μ, (1 − σ)²AAᵀ + σ²I)
    and p_ref,σ = N((1 − σ)m, ((1 − σ)² + σ²)I)."""
    distance, huber_c, weighting = "pseudo_huber", 0.5, "sigma"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64)
    sigma = family.sample_timesteps(N_SAMPLES, DIStarConfig(), g).double()
    alpha_t, sigma_t = family.coefficients(sigma, z)
    weight = time_weighting(weighting, alpha_t, sigma_t)
    ref_cov = (alpha_t**2 + sigma_t**2).unsqueeze(-1) * EYE

    def score(mean, cov):
        return lambda x: -torch.linalg.solve(cov, x - mean)

    def velocity(score_fn):  # the exact flow network: v = ε̂ − x̂0 with ε̂ = −σ·s, x̂0 = (x − σ·ε̂)/(1 − σ)
        def v(x):
            eps_hat = -sigma_t * score_fn(x)
            return eps_hat - (x - sigma_t * eps_hat) / alpha_t

        return v

    assistant_score = score(alpha_t * MU, _generator_cov(A, alpha_t, sigma_t))
    reference_score = score(alpha_t * M_REF, ref_cov)
    nets = [velocity(assistant_score), velocity(reference_score)]

    # Theorem 3.1's left side: ∇_θ of w·d(s_θ − s_ref) at x_t drawn from the frozen p_sg[θ],σ.
    x_t = diffuse(MU + z @ A.T, eps, alpha_t, sigma_t)
    mu_b, a_b = _per_sample_params(N_SAMPLES)
    score_theta = score(alpha_t * mu_b, _generator_cov(a_b, alpha_t, sigma_t))(x_t)
    loss = weight.squeeze(-1) * score_distance(score_theta - reference_score(x_t), distance, huber_c)
    loss.sum().backward()
    true_grads = _grads(mu_b, a_b)

    def grads(read_as):
        mu_b, a_b = _per_sample_params(N_SAMPLES)
        x_t = diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t)
        assistant, reference = (
            (lambda x, net=net: output_to_eps(net(x), x, alpha_t, sigma_t, read_as)) for net in nets
        )
        score_divergence_loss(x_t, eps, sigma_t, assistant, reference, weight, distance, huber_c).sum().backward()
        return _grads(mu_b, a_b)

    z_scores, se, mean_grad = _mc_z_scores(true_grads, grads("flow"))
    assert z_scores.abs().max() < Z_TOL, (z_scores, mean_grad)
    assert (se < 0.03 * mean_grad.norm()).all() and mean_grad.norm() > 0.1
    wrong_z, _, _ = _mc_z_scores(true_grads, grads("epsilon"))
    assert wrong_z.abs().max() > 4 * Z_TOL


# ---- the trainer on the tiny SD3 ----------------------------------------------------------------------------------


def test_lora_run_resumes_exactly_with_precomputed_prompts_and_loads_in_both_pipelines(
    script, tiny_sd3, prompt_file, tmp_path, monkeypatch
):
    model, common = tiny_sd3["t5"], [*LORA, "--generator_lora_target_modules", "attn.to_q,attn.add_q_proj"]
    common += ["--assistant_lora_target_modules", "to_q,to_k,to_v,to_out.0", "--precompute_prompt_embeddings"]
    common += ["--generator_lora_alpha", "8"]  # scale 2: the ComfyUI export below must carry it
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(script, *train_args(model, prompt_file, straight, *common, "--max_train_steps", "3")) == 0
    # Both runs precompute their prompt embeddings; the resumed one reads the interrupted one's back (file untouched).
    assert run(script, *train_args(model, prompt_file, resumed, *common, "--checkpointing_steps", "1")) == 0
    mtime = (resumed / "prompt_embeddings.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(script, "generator_loss", lambda *a, **k: calls.append(1) or generator_loss(*a, **k))
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    assert run(script, *train_args(model, prompt_file, resumed, *common, *resume)) == 0
    assert (resumed / "prompt_embeddings.safetensors").stat().st_mtime_ns == mtime
    assert len(calls) == 1  # only step 3 ran: steps 1 and 2 came from the checkpoint
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert expected.keys() == actual.keys() and all(k.startswith("transformer.") for k in expected)
    assert any("add_q_proj" in k for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)

    ours = DIStarSD3Pipeline.from_pretrained(model)
    before = _images(ours, output_type="latent")
    ours.load_lora_weights(straight)
    plain = StableDiffusion3Pipeline.from_pretrained(model)
    plain.load_lora_weights(straight)
    assert (_images(ours, output_type="latent") - before).abs().max() > 5e-4  # the LoRA changed the generator
    after = _images(ours)
    np.testing.assert_allclose(after, _images(plain, num_inference_steps=1, guidance_scale=0), atol=1e-5)

    # The run folder for ComfyUI's Load LoRA (`di-star export --format comfyui-lora`): the same weights, and each
    # module's true alpha, which ComfyUI reads (it applies the run's own file at scale 1).
    comfy = tmp_path / "comfy.safetensors"
    assert cli_main(["export", "--model", str(straight), "--format", "comfyui-lora", "--dtype", "fp32",
                     "--out", str(comfy)]) == 0  # fmt: skip
    exported = load_file(comfy)
    alphas = {k: v.item() for k, v in exported.items() if k.endswith(".alpha")}
    assert sorted(set(exported) - set(alphas)) == sorted(expected)
    assert alphas == {k.replace(".lora_A.weight", ".alpha"): 8.0 for k in expected if k.endswith(".lora_A.weight")}
    for key in expected:
        torch.testing.assert_close(exported[key], expected[key], rtol=0, atol=0)


def test_full_bf16_run_without_t5_writes_an_sd3_pipeline_and_resumes_exactly(
    script, tiny_sd3, prompt_file, tmp_path, monkeypatch
):
    model, straight, resumed = tiny_sd3["no-t5"], tmp_path / "straight", tmp_path / "resumed"
    extra = ["--cfg_mode", "reward", "--divergence", "kl", "--mixed_precision", "bf16"]
    assert run(script, *train_args(model, prompt_file, straight, *extra, "--validation_prompts", "a cat")) == 0
    assert (straight / "images" / "000.png").is_file()
    card = (straight / "README.md").read_text()
    assert "`StableDiffusion3Pipeline` with `num_inference_steps=1` and `guidance_scale=0`" in card
    assert "LCMScheduler" not in card and "- sd3" in card
    pipe = DIStarSD3Pipeline.from_pretrained(straight)
    assert pipe.conditioning_timestep == 1.0 and pipe.text_encoder_3 is None
    ours = _images(pipe)
    assert np.abs(ours - _images(DIStarSD3Pipeline.from_pretrained(model))).max() > 1e-3
    # (the bf16 run saved its frozen text encoders in bf16: load every component in float32, as ours does)
    plain = StableDiffusion3Pipeline.from_pretrained(
        straight, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    np.testing.assert_allclose(ours, _images(plain, num_inference_steps=1, guidance_scale=0), atol=1e-5)

    # Stopped after step 1 and resumed: the same transformer as the straight two steps, bit for bit.
    assert run(script, *train_args(model, prompt_file, resumed, *extra, "--max_train_steps", "1")) == 0
    calls = []
    monkeypatch.setattr(script, "generator_loss", lambda *a, **k: calls.append(1) or generator_loss(*a, **k))
    resume = ["--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]
    assert run(script, *train_args(model, prompt_file, resumed, *extra, *resume)) == 0
    assert len(calls) == 1  # only step 2 ran: the weights of step 1 came from the checkpoint
    expected = DIStarSD3Pipeline.from_pretrained(straight).transformer.state_dict()
    actual = DIStarSD3Pipeline.from_pretrained(resumed).transformer.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0)


def test_an_sdxl_timestep_on_a_flow_model_is_one_line(script, tiny_sd3, prompt_file, tmp_path, capsys):
    argv = train_args(tiny_sd3["no-t5"], prompt_file, tmp_path, "--conditioning_timestep", "399")
    assert script.cli(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the prompt file's progress bar)
    assert error.startswith("train_di_star_sdxl.py: error:") and "σ* in (0, 1]" in error and "399" in error


def test_lora_targets_default_to_the_familys(script, tiny_sd3, tiny_sdxl_dir, prompt_file, tmp_path):
    """SD3 adapts both streams by default (diffusers' SD3 LoRA set), SDXL its attention; a given list wins."""
    from diffusers_di_star.families.sd3 import SD3_LORA_TARGET_MODULES
    from diffusers_di_star.training import DEFAULT_LORA_TARGET_MODULES

    for model, expected in ((tiny_sd3["t5"], SD3_LORA_TARGET_MODULES), (tiny_sdxl_dir, DEFAULT_LORA_TARGET_MODULES)):
        args = script.parse_args(train_args(model, prompt_file, tmp_path, *LORA))
        script.check_args(args)
        script.resolve_family_defaults(args)
        assert args.generator_lora_target_modules == args.assistant_lora_target_modules == ",".join(expected)
    args = script.parse_args(
        train_args(tiny_sd3["t5"], prompt_file, tmp_path, *LORA, "--generator_lora_target_modules", "to_q")
    )
    script.check_args(args)
    script.resolve_family_defaults(args)
    assert args.generator_lora_target_modules == "to_q"
