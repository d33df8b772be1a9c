"""Model families (``families/``): exact parameterisations, Theorem 3.1 for v-prediction, the SD1.5/2.x and SDXL-v
pipelines against diffusers' own, family detection and its one-line error, v-prediction in exported single files, and
every family's saved LoRA loading in full in diffusers' own pipeline."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import get_peft_model_state_dict
from test_losses import (
    N_SAMPLES,
    Z_TOL,
    _draw,
    _exact_networks,
    _generate,
    _grads,
    _mc_z_scores,
    _per_sample_params,
    _true_divergence_grads,
)
from training_helpers import save_trainer_lora

from diffusers_di_star import DIStarSDPipeline, DIStarSDXLPipeline
from diffusers_di_star.errors import ModelLoadError
from diffusers_di_star.families import FAMILIES, SDFamily, SDXLFamily, detect_family, family_for
from diffusers_di_star.losses import score_divergence_loss, time_weighting
from diffusers_di_star.one_step import (
    PREDICTION_TYPES,
    FlowSchedule,
    VPSchedule,
    diffuse,
    eps_to_x0,
    output_to_eps,
    output_to_x0,
    prediction_target,
)
from diffusers_di_star.testing import (
    get_sd_scheduler,
    get_sdxl_scheduler,
    get_tiny_flux_components,
    get_tiny_sd3_components,
    get_tiny_sd_components,
    get_tiny_sdxl_components,
    save_tiny_sd_pipeline,
)

PROMPTS = ["a cat wearing sunglasses", "a fox in a snowy forest"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _coefficients(prediction_type, like):
    if prediction_type == "flow":
        return FlowSchedule().coefficients(torch.tensor([0.02, 0.5, 1.0]), like)
    return VPSchedule(get_sdxl_scheduler().alphas_cumprod.double()).coefficients(torch.tensor([0, 399, 999]), like)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_are_exact(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps, output = torch.randn(3, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    alpha_t, sigma_t = _coefficients(prediction_type, x0)
    x_t = diffuse(x0, eps, alpha_t, sigma_t)
    target = prediction_target(x0, eps, alpha_t, sigma_t, prediction_type)
    # A perfect network's output converts back to the ε and x0 that made x_t ...
    torch.testing.assert_close(output_to_eps(target, x_t, alpha_t, sigma_t, prediction_type), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(output_to_x0(target, x_t, alpha_t, sigma_t, prediction_type), x0, rtol=0, atol=1e-12)
    # ... and any output gives a consistent pair: x_t = α_t·x̂0 + σ_t·ε̂.
    eps_hat = output_to_eps(output, x_t, alpha_t, sigma_t, prediction_type)
    x0_hat = output_to_x0(output, x_t, alpha_t, sigma_t, prediction_type)
    torch.testing.assert_close(diffuse(x0_hat, eps_hat, alpha_t, sigma_t), x_t, rtol=0, atol=1e-12)
    if prediction_type != "epsilon":  # the types really differ: reading the output as ε would be wrong
        assert (eps_hat - output).abs().max() > 0.1


def test_schedules_read_the_scheduler_config():
    assert VPSchedule.from_scheduler(get_sd_scheduler("v_prediction")).prediction_type == "v_prediction"
    assert VPSchedule.from_scheduler(get_sdxl_scheduler()).prediction_type == "epsilon"
    scheduler = get_sd_scheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type='flow'.*scheduler_config.json"):
        VPSchedule.from_scheduler(scheduler)
    with pytest.raises(ValueError, match="'velocity' is not one of"):
        output_to_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "velocity")
    alpha, sigma = FlowSchedule().coefficients(0.25, torch.zeros(2, 4, 8, 8))
    assert alpha.shape == (1, 1, 1, 1) and alpha.item() == 0.75 and sigma.item() == 0.25
    assert FlowSchedule().network_timestep(torch.tensor([0.25])).item() == 250.0


def _v_network(eps_fn, alpha_t, sigma_t):
    """The exact v-prediction network with the same score as ``eps_fn``: v = α_t·ε̂ − σ_t·x̂0."""
    return lambda x: alpha_t * eps_fn(x) - sigma_t * eps_to_x0(x, eps_fn(x), alpha_t, sigma_t)


def test_theorem_3_1_for_a_v_prediction_model():
    """∇_θ D == ∇_θ L_DI* when the assistant and the reference are v-prediction networks read through ε̂ = α·v + σ·x_t
    (the conversion's x_t term carries part of the input gradient; reading v as ε fails by far)."""
    distance, huber_c, weighting = "pseudo_huber", 0.5, "sigma"
    true_grads = _true_divergence_grads(distance, huber_c, weighting, seed=0)
    z, eps, alpha_t, sigma_t, _ = _draw(N_SAMPLES, 0)
    weight = time_weighting(weighting, alpha_t, sigma_t)
    v_nets = [_v_network(net, alpha_t, sigma_t) for net in _exact_networks(alpha_t, sigma_t)]

    def grads(read_as):
        mu_b, a_b = _per_sample_params(N_SAMPLES)
        x_t = diffuse(_generate(mu_b, a_b, z), eps, alpha_t, sigma_t)
        assistant, reference = (
            (lambda x, net=net: output_to_eps(net(x), x, alpha_t, sigma_t, read_as)) for net in v_nets
        )
        loss = score_divergence_loss(x_t, eps, sigma_t, assistant, reference, weight, distance, huber_c)
        loss.sum().backward()
        return _grads(mu_b, a_b)

    z_scores, se, mean_grad = _mc_z_scores(true_grads, grads("v_prediction"))
    assert z_scores.abs().max() < Z_TOL, (z_scores, mean_grad)
    assert (se < 0.03 * mean_grad.norm()).all() and mean_grad.norm() > 0.1
    wrong_z, _, _ = _mc_z_scores(true_grads, grads("epsilon"))
    assert wrong_z.abs().max() > 4 * Z_TOL


def _lcm_reference(pipeline_class, components, **kwargs):
    pipe = pipeline_class(
        **{**components, "scheduler": LCMScheduler.from_config(components["scheduler"].config)}, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=1,
        timesteps=[399],
        guidance_scale=0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_pipeline_matches_diffusers_lcm_recipe(prediction_type):
    components = get_tiny_sd_components(prediction_type=prediction_type)
    pipe = DIStarSDPipeline(**components)
    ours = pipe(PROMPTS, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    theirs = _lcm_reference(StableDiffusionPipeline, components, requires_safety_checker=False)
    assert ours.shape == (4, 64, 64, 3) and pipe.scheduler.config.prediction_type == prediction_type
    assert np.abs(ours - theirs).max() <= 1e-5


def test_sdxl_v_prediction_pipeline_matches_diffusers_lcm_recipe():
    components = get_tiny_sdxl_components(prediction_type="v_prediction")
    pipe = DIStarSDXLPipeline(**components, add_watermarker=False)
    ours = pipe(PROMPTS, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    theirs = _lcm_reference(StableDiffusionXLPipeline, components, add_watermarker=False)
    epsilon = DIStarSDXLPipeline(**get_tiny_sdxl_components(), add_watermarker=False)
    as_eps = epsilon(PROMPTS, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(ours - as_eps.images).max() > 1e-2  # same UNet, read as v: a different image


def test_sd_pipeline_saves_a_plain_sd_folder(tmp_path):
    DIStarSDPipeline(
        **get_tiny_sd_components(prediction_type="v_prediction"), conditioning_timestep=500
    ).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["conditioning_timestep"] == 500
    pipe = DIStarSDPipeline.from_pretrained(tmp_path)
    assert pipe.conditioning_timestep == 500 and pipe.scheduler.config.prediction_type == "v_prediction"
    assert detect_family(str(tmp_path)) is SDFamily


def test_family_detection_and_the_unknown_layout_error(tiny_sdxl_dir, tmp_path):
    assert detect_family(tiny_sdxl_dir) is SDXLFamily
    assert detect_family(save_tiny_sd_pipeline(tmp_path / "sd")) is SDFamily
    index = {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["x", "y"]}
    with pytest.raises(ModelLoadError) as error:
        family_for(index, "Efficient-Large-Model/Sana_1600M_1024px_diffusers")
    message = str(error.value)
    assert "\n" not in message and "SanaPipeline" in message and "transformer, vae" in message
    assert all(f"{name} (" in message for name in FAMILIES)


def test_generate_names_an_unknown_layout_in_one_line(tmp_path, capsys):
    from diffusers_di_star.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "model"),
                "--prompt",
                "a cat",
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KandinskyPipeline" in err and "Families: sdxl" in err


def test_generate_and_eval_load_an_sd_folder_as_sd(tmp_path, capsys):
    from diffusers_di_star.cli import main
    from diffusers_di_star.evaluation.runner import ModelSpec, load_model

    model = save_tiny_sd_pipeline(tmp_path / "sd", prediction_type="v_prediction")
    assert (
        main(["generate", "--model", model, "--prompt", "a cat", "--out", str(tmp_path / "out"), "--device", "cpu"])
        == 0
    )
    (path,) = capsys.readouterr().out.split()
    expected = DIStarSDPipeline.from_pretrained(model)("a cat", generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), np.asarray(expected))
    assert type(load_model(ModelSpec(model), device="cpu")) is DIStarSDPipeline
    assert type(load_model(ModelSpec(model, steps=2), device="cpu")) is StableDiffusionPipeline


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_single_file_export_marks_v_prediction_as_comfyui_reads_it(tmp_path, prediction_type):
    from safetensors import safe_open

    from diffusers_di_star.export import export_comfyui_checkpoint, export_diffusers
    from diffusers_di_star.testing import save_tiny_sdxl_pipeline

    model = save_tiny_sdxl_pipeline(tmp_path / "model", prediction_type=prediction_type)
    path = export_comfyui_checkpoint(model, tmp_path / "model.safetensors", dtype="fp32")
    with safe_open(path, framework="pt") as f:
        is_v = "v_pred" in f.keys()  # ComfyUI: supported_models.SDXL.model_type
        assert f.metadata()["modelspec.prediction_type"] == ("v" if prediction_type == "v_prediction" else "epsilon")
    assert is_v == (prediction_type == "v_prediction")
    back = export_diffusers(path, tmp_path / "back", base_model=model)
    assert DIStarSDXLPipeline.from_pretrained(back).scheduler.config.prediction_type == prediction_type


TINY_COMPONENTS = {
    "sdxl": get_tiny_sdxl_components,
    "sd": get_tiny_sd_components,
    "sd3": lambda: get_tiny_sd3_components(with_t5=False),
    "flux": get_tiny_flux_components,
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_saved_lora_loads_in_full_in_diffusers_own_pipeline(name, tmp_path):
    """The trainer's LoRA path (``lora_state_dict``, the family's ``save_lora_weights``) read back by diffusers'
    pipeline: every module with its exact weights. UNet-style ``to_q.lora.down`` keys mixed with PEFT's ``lora_A``
    keys (what SD3 and FLUX files had) lose SD3's attention LoRA in ``load_lora_weights``, with only a warning."""
    family = FAMILIES[name]
    network = TINY_COMPONENTS[name]()[family.network_subfolder]
    saved = save_trainer_lora(family, network, tmp_path)

    pipe = family.pipeline_class()(**TINY_COMPONENTS[name]())
    pipe.load_lora_weights(str(tmp_path), adapter_name="trained")
    loaded = get_peft_model_state_dict(getattr(pipe, family.network_subfolder), adapter_name="trained")
    assert sorted(loaded) == sorted(saved) and any(".to_q." in key for key in loaded)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
