"""``accelerate launch --num_processes 2`` on CPU (gloo): ranks stay in sync and only rank 0 writes the outputs."""

import os
import subprocess
import sys
import textwrap

import torch

from diffusers_di_star.testing import TINY_PROMPTS

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, os.pardir, "examples", "train_di_star_sdxl.py")

# Runs the example with the stub reward; every rank dumps its generator parameters and notes each export it made.
LAUNCHER = textwrap.dedent(
    """
    import importlib.util, os, sys
    import torch
    from accelerate import PartialState
    sys.path.insert(0, {tests!r})
    from training_helpers import PatternReward
    spec = importlib.util.spec_from_file_location("train_di_star_sdxl", {script!r})
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.load_reward = lambda spec: PatternReward().freeze()
    captured, setup, export = {{}}, script.setup_networks, script.export
    script.setup_networks = lambda *a, **k: captured.setdefault("networks", setup(*a, **k))
    def recording_export(*args, **kwargs):
        open(os.path.join({probe!r}, "export-rank" + str(PartialState().process_index)), "w").close()
        return export(*args, **kwargs)
    script.export = recording_export
    status = script.main(script.parse_args(sys.argv[1:]))
    params = [p.detach().cpu() for p in captured["networks"].trainable_parameters("generator")]
    torch.save(params, os.path.join({probe!r}, "generator-rank" + str(PartialState().process_index) + ".pt"))
    sys.exit(status)
    """
)


def test_two_cpu_processes_stay_in_sync(tiny_sdxl_dir, tmp_path):
    probe, out = tmp_path / "probe", tmp_path / "out"
    probe.mkdir()
    (tmp_path / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=HERE, script=SCRIPT, probe=str(probe)))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(launcher),
        "--pretrained_model_name_or_path", tiny_sdxl_dir, "--train_data_file", str(tmp_path / "prompts.txt"),
        "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "2",
        "--report_to", "none", "--use_lora", "--generator_lora_rank", "4", "--assistant_lora_rank", "4",
        "--learning_rate", "1e-2", "--checkpointing_steps", "1",
    ]  # fmt: skip
    # `--cpu` alone starts ONE process; `--multi_gpu` with ACCELERATE_USE_CPU=1 gives two gloo processes (MULTI_CPU).
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rank0, rank1 = (torch.load(probe / f"generator-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    assert any(p.abs().max() > 0 for p in rank0[1::2]), "the generator did not train"
    assert os.path.exists(probe / "export-rank0") and not os.path.exists(probe / "export-rank1")
    assert sorted(os.listdir(out / "checkpoint-2" / "generator")) == ["pytorch_lora_weights.safetensors"]
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
