"""EMA and LoRA under FSDP2 on 2 CPU processes (gloo), against the same runs under DDP.

FSDP2 keeps the generator's EMA as shards beside the parameters' (``training/ema.py``) and LoRA on separate units
(the generator's adapter on its own copy of the base; the assistant's adapter and the reference on another): the
EMA and the LoRA weights equal DDP's (three-in-one LoRA) up to float32 reduction order, a resumed run equals the
uninterrupted one exactly, and FSDP1 refuses both in one line. On whole tensors (DDP, one GPU) the EMA is diffusers'
``EMAModel``.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_training_distributed import FULL, LORA, launch, unet_weights

from diffusers_di_star.training.ema import ShardedEMA
from diffusers_di_star.training.engine import check_engine

STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "1"]
# AdamW's ε = 1e-4 as in FULL: with the usual 1e-8 an element whose gradient is near 0 moves by ±lr on a float32
# reduction-order difference.
LORA_EMA = [*LORA, "--use_ema", "--adam_epsilon", "1e-4", "--seed", "3", *STEPS]
FULL_EMA = [*FULL, "--use_ema", "--checkpointing_steps", "1"]
#: FSDP2 vs DDP: float32 noise, amplified in the generator's LoRA (its gradient is a difference of two networks' input
#: gradients) to at most 7.2e-6 measured, i.e. < 0.1 % of one step at lr 1e-2; the assistant's agree to 1.3e-7.
CLOSE = {"rtol": 0, "atol": 2e-5}
#: EMAModel's decay at optimisation step k is min((1 + (k-1)) / (10 + (k-1)), --ema_decay), 0 at the first step.
DECAY_AT_STEP_2 = 2 / 11


@pytest.fixture(scope="module")
def runs(tiny_sdxl_dir, tmp_path_factory):
    """DDP: LoRA + EMA. FSDP2: the same, LoRA + EMA resumed from its checkpoint-1, and full finetuning + EMA."""
    ddp, fsdp = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("fsdp")
    launch(
        ddp,
        tiny_sdxl_dir,
        [{"name": "lora", "args": [*LORA_EMA, "--output_dir", str(ddp / "lora")]}],
    )
    fsdp_probe = launch(
        fsdp,
        tiny_sdxl_dir,
        [
            {"name": "lora", "args": [*LORA_EMA, "--output_dir", str(fsdp / "lora")]},
            {"name": "resumed", "args": [*LORA_EMA, "--output_dir", str(fsdp / "resumed"),
                                         "--resume_from_checkpoint", str(fsdp / "lora" / "checkpoint-1")]},
            {"name": "full", "args": [*FULL_EMA, "--output_dir", str(fsdp / "full")]},
        ],
        fsdp=True,
    )  # fmt: skip
    return SimpleNamespace(ddp=ddp, fsdp=fsdp, probe=fsdp_probe)


def ema_tensors(checkpoint):
    with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        return [f.get_tensor(f"shadow_params.{i}") for i in range(len(list(f.keys())))], state


def lora_weights(folder):
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def assert_all_close(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tolerance)


@pytest.mark.parametrize("name", ["lora", "full"])
def test_fsdp2_ema_is_sharded_and_exports_the_average(runs, name):
    layouts = [json.loads((runs.probe / name / f"layout-rank{r}.json").read_text())["end"] for r in (0, 1)]
    assert all(layout["dtensors"] == layout["params"] for layout in layouts), "FSDP2 did not shard every parameter"
    assert max(layout["local"] for layout in layouts) < 0.6 * layouts[0]["global"], "one rank holds too much"
    shadow, state = ema_tensors(runs.fsdp / name / "checkpoint-2")
    assert state["optimization_step"] == 2 and len(shadow) > 0

    # The EMA is an average, not a copy: after 2 steps ē = d θ₁ + (1 − d) θ₂, θ_k as saved in checkpoint-k; the
    # export (each rank's EMA shards copied into its parameter shards, then gathered) is ē.
    weights = lora_weights if name == "lora" else unet_weights
    theta1, theta2 = (weights(runs.fsdp / name / f"checkpoint-{k}" / "generator") for k in (1, 2))
    average = {k: DECAY_AT_STEP_2 * theta1[k] + (1 - DECAY_AT_STEP_2) * theta2[k] for k in theta2}
    assert max((theta2[k] - average[k]).abs().max() for k in theta2) > 1e-5, "the generator did not move"
    assert_all_close(weights(runs.fsdp / name / ("." if name == "lora" else "unet")), average, rtol=1e-5, atol=1e-7)


def test_fsdp2_ema_equals_ddp_ema(runs):
    (fsdp, fsdp_state), (ddp, ddp_state) = (
        ema_tensors(root / "lora" / "checkpoint-2") for root in (runs.fsdp, runs.ddp)
    )
    assert fsdp_state == ddp_state
    assert len(fsdp) == len(ddp)
    for actual, expected in zip(fsdp, ddp, strict=True):
        torch.testing.assert_close(actual, expected, **CLOSE)
    assert_all_close(lora_weights(runs.fsdp / "lora"), lora_weights(runs.ddp / "lora"), **CLOSE)


def test_fsdp2_lora_equals_ddp_three_in_one_lora(runs):
    for role in ("generator", "assistant"):
        for step in (1, 2):
            folder = f"checkpoint-{step}/{role}"
            assert_all_close(
                lora_weights(runs.fsdp / "lora" / folder), lora_weights(runs.ddp / "lora" / folder), **CLOSE
            )
    assert os.path.exists(runs.probe / "lora" / "export-rank0") and not os.path.exists(
        runs.probe / "lora" / "export-rank1"
    )


def test_fsdp2_lora_and_ema_resume_exactly(runs):
    uninterrupted, resumed = runs.fsdp / "lora", runs.fsdp / "resumed"
    for folder in (".", "checkpoint-2/generator", "checkpoint-2/assistant"):
        assert_all_close(lora_weights(resumed / folder), lora_weights(uninterrupted / folder), rtol=0, atol=0)
    (actual, actual_state), (expected, expected_state) = (
        ema_tensors(r / "checkpoint-2") for r in (resumed, uninterrupted)
    )
    assert actual_state == expected_state
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def test_fsdp1_refuses_lora_and_ema_in_one_line():
    fsdp1 = SimpleNamespace(fsdp_version=1, use_orig_params=True)
    for flags, flag in (
        ({"use_lora": True, "use_ema": False}, "--use_lora"),
        ({"use_lora": False, "use_ema": True}, "--use_ema"),
    ):
        with pytest.raises(ValueError, match=rf"^{flag} is not supported under FSDP1 .*fsdp_version: 2") as error:
            check_engine(DistributedType.FSDP, fsdp_plugin=fsdp1, **flags)
        assert "\n" not in str(error.value)
    fsdp2 = SimpleNamespace(fsdp_version=2, use_orig_params=True)
    assert check_engine(DistributedType.FSDP, use_lora=True, use_ema=True, fsdp_plugin=fsdp2) is True


def test_sharded_ema_on_whole_tensors_is_diffusers_ema():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5), requires_grad=False)]
    ema, reference = ShardedEMA(params, decay=0.9), EMAModel(params, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.step()
        reference.step(params)
    for actual, expected in zip(ema.shadow_params, reference.shadow_params, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.shadow_params[0], params[0]) and torch.equal(ema.shadow_params[1], params[1])
    assert ema.state_dict(keep=False) is None
    restored = ShardedEMA(params, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.ema.optimization_step == 3 and restored.ema.decay == 0.9
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow_params, ema.shadow_params, strict=True))
    restored.copy_to()
    assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow_params, strict=True))
