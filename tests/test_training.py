"""DI* training core (``diffusers_di_star.training``): gradient routing, shared-UNet gradient, learning signal."""

import copy

import pytest
import torch
from training_helpers import PROMPTS, RESOLUTION, PatternReward, tiny_conditioning

from diffusers_di_star.training import (
    DIStarConfig,
    DIStarNetworks,
    assistant_loss,
    generator_loss,
    load_prompts,
    setup_networks,
)

LORA = {"generator_lora_rank": 4, "generator_lora_alpha": 8, "assistant_lora_rank": 4, "assistant_lora_alpha": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(**kwargs):
    return DIStarConfig(**{"resolution": RESOLUTION, **LORA, **kwargs})


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def randomise_lora(networks):
    # LoRA B starts at zero; make both adapters non-trivial so g_θ, s_ψ and s_ref all differ.
    torch.manual_seed(1)
    with torch.no_grad():
        for role in ("generator", "assistant"):
            for p in networks.trainable_parameters(role):
                p.normal_(std=0.05)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_gradient_routing(tiny_components, use_lora):
    config = make_config(use_lora=use_lora, reward_scale=1.0)
    networks = setup_networks(config, tiny_components["unet"])
    randomise_lora(networks) if use_lora else None
    cond, acp = tiny_conditioning(tiny_components), tiny_components["scheduler"].alphas_cumprod
    optimizers = {
        role: torch.optim.SGD(networks.trainable_parameters(role), lr=0.1) for role in ("generator", "assistant")
    }
    modules = {role: networks.bare_unet(role) for role in ("generator", "assistant", "reference")}
    names = {
        role: {n for n, p in modules[role].named_parameters() if any(p is q for q in params)}
        for role, params in ((r, networks.trainable_parameters(r)) for r in ("generator", "assistant"))
    }
    frozen_reference = (
        {n for n, _ in modules["reference"].named_parameters()} - names["generator"] - names["assistant"]
    )

    for role in ("generator", "assistant"):
        before = {r: snapshot(m) for r, m in modules.items()}
        if role == "generator":
            loss, _ = generator_loss(networks, config, cond, PROMPTS, acp, tiny_components["vae"], PatternReward())
        else:
            loss, _ = assistant_loss(networks, config, cond, acp)
        loss.backward()
        optimizers[role].step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        updated = {r: changed(before[r], m) for r, m in modules.items()}
        trained = updated["generator"] if role == "generator" else updated["assistant"]
        assert trained == names[role], f"the {role} step must update exactly the {role}'s parameters"
        other = "assistant" if role == "generator" else "generator"
        assert not (updated[other] & names[other]), f"the {role} step changed the {other}"
        assert not (updated["reference"] & frozen_reference), "the reference changed"
        if not use_lora:
            assert not updated["reference"] and not updated[other]


def separate_copies(shared: DIStarNetworks) -> DIStarNetworks:
    """Three UNets, one role each, with the same weights as the shared three-in-one UNet."""
    generator, assistant, reference = (copy.deepcopy(shared.generator_unet) for _ in range(3))
    generator.delete_adapters("assistant")
    assistant.delete_adapters("generator")
    reference.delete_adapters(["generator", "assistant"])
    for unet in (generator, assistant):
        unet.disable_gradient_checkpointing()
    return DIStarNetworks(
        generator, assistant, reference, generator_adapter="generator", assistant_adapter="assistant"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"divergence": "pseudo_huber", "cfg_mode": "inner"},
        {"divergence": "l2", "cfg_mode": "reward", "cfg_reward_scale": 0.5, "weighting": "sigma_squared"},
        {"divergence": "kl", "cfg_mode": "inner", "guidance_scale": 2.0},
    ],
    ids=["pseudo_huber-inner", "l2-reward", "kl"],
)
def test_shared_unet_gradient_equals_separate_copies(tiny_components, overrides):
    config = make_config(reward_scale=1.0, huber_c=0.1, **overrides)
    shared = setup_networks(config, tiny_components["unet"], gradient_checkpointing=True)
    randomise_lora(shared)
    separate = separate_copies(shared)
    cond, acp, vae = (
        tiny_conditioning(tiny_components),
        tiny_components["scheduler"].alphas_cumprod,
        tiny_components["vae"],
    )

    gradients, values = [], []
    for networks in (shared, separate):
        loss, logs = generator_loss(networks, config, cond, PROMPTS, acp, vae, PatternReward(), seeded())
        loss.backward()
        params = networks.trainable_parameters("generator")
        assert all(p.grad is not None for p in params)
        gradients.append(torch.cat([p.grad.flatten() for p in params]))
        values.append(logs)
    for name in values[0]:
        torch.testing.assert_close(values[0][name], values[1][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-7)
    assert gradients[0].abs().max() > 0


def test_score_term_gradient_reaches_generator_through_network_inputs(tiny_components):
    # Without a reward the generator is trained by the divergence alone; its gradient comes only through the inputs
    # of the frozen assistant and reference UNets (Theorem 3.1), and differs from the one that detaches them.
    config = make_config(reward_scale=0.0, cfg_mode="reward", cfg_reward_scale=0.0, divergence="l2")
    networks = setup_networks(config, tiny_components["unet"])
    randomise_lora(networks)
    cond, acp = tiny_conditioning(tiny_components), tiny_components["scheduler"].alphas_cumprod
    loss, logs = generator_loss(networks, config, cond, PROMPTS, acp, generator=seeded())
    loss.backward()
    assert set(logs) == {"divergence_loss", "generator_loss"}
    grads = [p.grad for p in networks.trainable_parameters("generator")]
    assert all(g is not None for g in grads) and max(g.abs().max() for g in grads) > 0
    assert all(p.grad is None for p in networks.trainable_parameters("assistant"))


def test_reward_rises_with_the_regulariser_on(tiny_components):
    # conv_out in the generator's LoRA: attention-only LoRA barely moves this tiny UNet's output.
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv_out")
    config = make_config(reward_scale=100.0, guidance_scale=2.0, generator_lora_target_modules=targets)
    networks = setup_networks(config, tiny_components["unet"])
    cond, acp, vae = (
        tiny_conditioning(tiny_components),
        tiny_components["scheduler"].alphas_cumprod,
        tiny_components["vae"],
    )
    reward = PatternReward()
    generator_opt = torch.optim.Adam(networks.trainable_parameters("generator"), lr=1e-2)
    assistant_opt = torch.optim.Adam(networks.trainable_parameters("assistant"), lr=1e-2)
    rng = seeded(0)

    def evaluate():
        config_eval = make_config(reward_scale=1.0, divergence="kl")
        with torch.no_grad():
            return generator_loss(networks, config_eval, cond, PROMPTS, acp, vae, reward, seeded(123))[1]["reward"]

    start = evaluate()
    for _ in range(20):
        loss, logs = assistant_loss(networks, config, cond, acp, rng)
        loss.backward()
        assistant_opt.step()
        assistant_opt.zero_grad()
        loss, logs = generator_loss(networks, config, cond, PROMPTS, acp, vae, reward, rng)
        assert torch.isfinite(loss) and logs["divergence_loss"] != 0
        loss.backward()
        generator_opt.step()
        generator_opt.zero_grad()
    assert evaluate() > start + 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"divergence": "js"}, "divergence"),
        ({"cfg_mode": "outer"}, "cfg_mode"),
        ({"weighting": "snr"}, "weighting"),
        ({"min_timestep": 500, "max_timestep": 100}, "min_timestep"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"resolution": 60}, "resolution"),
        ({"assistant_updates_per_step": 0}, "assistant_updates_per_step"),
        ({"generator_lora_rank": 0}, "generator_lora_rank"),
        ({"assistant_lora_target_modules": ()}, "assistant_lora_target_modules"),
        ({"reward_scale": -1.0}, "reward_scale"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DIStarConfig(**kwargs)


@pytest.mark.parametrize(
    "name, content, column, message",
    [
        ("p.txt", "", None, "is empty"),
        ("p.csv", "caption\na cat\n", None, "no column 'prompt'"),
        ("p.json", '[{"prompt": "a cat"}, {"prompt": 3}]', None, "row 1"),
        ("p.csv", 'prompt\na cat\n""\n', None, "row 1"),
        ("p.xlsx", "x", None, "unknown type"),
    ],
)
def test_bad_prompt_data_fails_clearly(tmp_path, name, content, column, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(train_data_file=path, prompt_column=column)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert load_prompts(train_data_file=tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("caption,score\na cat,6.5\n")
    assert load_prompts(train_data_file=tmp_path / "p.csv", prompt_column="caption") == ["a cat"]
    with pytest.raises(ValueError, match="exactly one"):
        load_prompts()
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(train_data_file=tmp_path / "missing.txt")


def test_encode_prompts_equals_the_pipeline_conditioning(tiny_components):
    """The trainer conditions the generator exactly as DIStarSDXLPipeline does at inference."""
    from diffusers_di_star import DIStarSDXLPipeline
    from diffusers_di_star.training import encode_prompts

    pipe = DIStarSDXLPipeline(**tiny_components, add_watermarker=False)
    prompts = ["a cat wearing sunglasses", "a fox in a snowy forest"]
    cond = encode_prompts(
        prompts, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), resolution=64
    )
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), prompt_embeds.dtype, 64)
    torch.testing.assert_close(cond.prompt_embeds, prompt_embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, atol=0, rtol=0)
    torch.testing.assert_close(cond.time_ids, time_ids.repeat(2, 1), atol=0, rtol=0)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_reaches_the_frozen_reference(tiny_components, use_lora):
    # The score term backpropagates through the reference's input, so it must checkpoint like the trained networks.
    config = make_config(use_lora=use_lora)
    unet = copy.deepcopy(tiny_components["unet"])
    networks = setup_networks(config, unet, gradient_checkpointing=True)
    assert all(networks.bare_unet(role).is_gradient_checkpointing for role in ("generator", "assistant", "reference"))
    plain = setup_networks(config, copy.deepcopy(tiny_components["unet"]))
    assert not any(plain.bare_unet(role).is_gradient_checkpointing for role in ("generator", "assistant", "reference"))
