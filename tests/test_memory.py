"""The training-memory estimator (`di-star bench memory`, benchmarking/memory.py): exact counting on hand-made cases,
and its agreement with a real CPU run at a small size, the tolerance docs/benchmarks.md states (CPU_AGREEMENT)."""

import dataclasses

import pytest
import torch

from diffusers_di_star.benchmarking import SIZES, BenchSettings
from diffusers_di_star.benchmarking import memory as memory_module
from diffusers_di_star.benchmarking.memory import (
    ALL_GATHER,
    CPU_AGREEMENT,
    PARTS,
    LiveMemory,
    MemoryEstimate,
    MemorySetting,
    _AdamW8bitStates,
    estimate_iteration_memory,
    measure_cpu_peak,
    static_training_memory,
)
from diffusers_di_star.benchmarking.runner import _quiet
from diffusers_di_star.cli import main

KIB = 1024


def _tiny_size():
    """The reduced SDXL with two UNet levels, one block per level and one-layer text encoders: few ops with every kind
    of module the full size has (the estimate's time grows with the number of ops, not with tensor sizes)."""
    overrides = {name: dict(values) for name, values in SIZES["reduced"].overrides.items()}
    overrides["unet"] |= {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [1, 2],
        "transformer_layers_per_block": [1, 1],
        "layers_per_block": 1,
    }
    overrides["vae"] |= {"layers_per_block": 1}
    for name in ("text_encoder", "text_encoder_2"):
        overrides[name] |= {"num_hidden_layers": 1}
    return dataclasses.replace(SIZES["reduced"], name="tiny", overrides=overrides)


TINY = _tiny_size()
#: The recipe (three-in-one LoRA, PickScore through the VAE decode, checkpointing, bf16 frozen weights), and full
#: finetuning at the other end (float32, no checkpointing, no reward: gradients and AdamW states dominate).
SETTINGS = {
    "lora": MemorySetting("three-in-one", batch_size=2, resolution=64, size=TINY),
    "full": MemorySetting(
        "full", batch_size=2, resolution=64, frozen_dtype="fp32", gradient_checkpointing=False, reward=False, size=TINY
    ),
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def estimated_and_measured(request):
    setting = SETTINGS[request.param]
    with _quiet():
        return setting, estimate_iteration_memory(setting, gpus=(1, 2)), measure_cpu_peak(setting)


def test_the_estimate_agrees_with_a_real_cpu_run(estimated_and_measured):
    """The fake-tensor estimate against torch's CPU allocator's peak during the same iteration, really run."""
    setting, estimate, measured = estimated_and_measured
    assert measured > 10 * 2**20  # a real run: weights alone are tens of MiB
    assert abs(estimate.peak() / measured - 1) <= CPU_AGREEMENT, (estimate.peak(), measured)


def test_the_estimate_counts_weights_and_both_roles_optimizer_states(estimated_and_measured):
    setting, estimate, _ = estimated_and_measured
    bench = BenchSettings.resolve(device="cpu", size="reduced", resolution=64, reward=setting.reward)
    static = static_training_memory(setting.layout, dataclasses.replace(bench, size=TINY))
    parts = estimate.per_gpu[1]
    assert set(parts) == set(PARTS)
    # AdamW: two float32 moments of BOTH roles (plus a 4-byte step counter per tensor), from the second iteration on
    assert static["adam_states"] <= parts["optimizer states"] <= 1.01 * static["adam_states"]
    if setting.frozen_dtype == "bf16" and setting.reward:  # the static count's dtypes (bf16, with the reward)
        assert static["weights"] <= parts["weights"] <= 1.01 * static["weights"]  # + buffers (position ids)
    if setting.layout == "full":  # no checkpointing: the generator's float32 gradients are all live at its step
        assert parts["gradients"] == static["gradients"]


def test_fsdp2_divides_sharded_parts_not_activations(estimated_and_measured):
    setting, estimate, _ = estimated_and_measured
    one, two = estimate.per_gpu[1], estimate.per_gpu[2]
    assert abs(two["optimizer states"] - one["optimizer states"] / 2) <= 1  # constant over the iteration
    assert estimate.peak(2) < estimate.peak(1)
    if setting.layout == "three-in-one":  # the peak stays in the generator's loss: the same activations, whole
        assert two["activations"] == one["activations"] and one["gradients"] == two["gradients"] == 0
    else:  # one GPU peaks in the generator's step (gradients live); halving them there moves the peak elsewhere
        assert one["gradients"] > 0
    assert 0 < two[ALL_GATHER] < one["weights"] / 2
    assert one["weights"] / 2 < two["weights"] < one["weights"]  # UNets halved, text encoders/VAE/reward whole


def test_live_memory_counts_a_storage_once_until_it_is_freed():
    tracker = LiveMemory(gpus=(1, 4))
    weight = torch.zeros(256)  # 1 KiB of float32
    tracker.add(weight, "weights", sharded=True)
    tracker.add(weight[:10], "weights", sharded=True)  # a view: the same storage
    with tracker:
        a = torch.ones(512)  # 2 KiB
        b = a * 2  # 2 KiB more: the peak
        grad = b[:256].clone()  # 1 KiB, an op's output ...
        del a, b
        tracker.relabel(grad, "gradients", sharded=True)  # ... that lands in .grad
        c = torch.ones(128)  # after the peak
    assert tracker.peaks[1] == {"weights": KIB, "gradients": 0, "optimizer states": 0, "activations": 5 * KIB}
    assert tracker.peaks[4] == {"weights": KIB // 4, "gradients": 0, "optimizer states": 0, "activations": 5 * KIB}
    del grad, c
    tracker.add(torch.ones(2048), "activations")  # 8 KiB: a new peak once the others are gone
    assert tracker.peaks[1]["activations"] == 8 * KIB


def test_adamw8bit_states_are_bitsandbytes_blockwise_layout():
    large, small = torch.nn.Parameter(torch.zeros(10_000)), torch.nn.Parameter(torch.zeros(100))
    optimizer = _AdamW8bitStates([large, small], lr=1e-5)
    large.grad, small.grad = torch.zeros_like(large), torch.zeros_like(small)
    optimizer.step()
    sizes = {name: [t.nbytes for t in optimizer.state[p].values()] for name, p in (("large", large), ("small", small))}
    assert sizes == {"large": [10_000, 10_000, 40 * 4, 40 * 4], "small": [400, 400]}  # ⌈10000/256⌉ = 40 blocks


def test_bench_memory_tabulates_the_grid_of_settings(monkeypatch, capsys, tmp_path):
    seen = []

    def stub(setting, gpus=(1,)):
        seen.append((setting, gpus))
        parts = {"weights": 10 * 2**30, "gradients": 0, "optimizer states": 2**30, "activations": 2**29}
        return MemoryEstimate(setting, {n: parts | {"weights": 10 * 2**30 // n} for n in gpus})

    monkeypatch.setattr(memory_module, "estimate_iteration_memory", stub)
    argv = ["bench", "memory", "--optimizer", "adamw,adamw8bit", "--gradient-checkpointing", "on,off"]
    assert main([*argv, "--gpus", "1,4", "--no-reward", "--out", str(tmp_path)]) == 0
    assert [(s.optimizer, s.gradient_checkpointing, s.reward, s.resolution, s.size.name) for s, _ in seen] == [
        ("adamw", True, False, 1024, "full"),
        ("adamw", False, False, 1024, "full"),
        ("adamw8bit", True, False, 1024, "full"),
        ("adamw8bit", False, False, 1024, "full"),
    ]
    assert {gpus for _, gpus in seen} == {(1, 4)}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| three-in-one")]
    assert len(lines) == 4
    cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert cells[1:] == ["10.00", "0.00", "1.00", "0.50", "11.50", "4.00"]  # parts at 1 GPU, peak at 1 and 4
    assert (tmp_path / "memory.json").exists() and (tmp_path / "report.md").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gradient-checkpointing", "maybe"], "--gradient-checkpointing takes on,off"),
        (["--precision", "fp8"], "frozen_dtype must be bf16 or fp32"),
        (["--optimizer", "sgd"], "optimizer must be one of"),
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--layouts", "shared"], "layout must be one of"),
    ],
)
def test_bench_memory_bad_options_are_one_clear_line(argv, message, capsys):
    assert main(["bench", "memory", *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("di-star bench: error: ") and message in line
