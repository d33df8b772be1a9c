"""The trainer on 2 CPU processes (gloo) under DDP and under FSDP2 sharding, through ``accelerate launch``.

DDP: ranks stay in sync, LoRA starts identical on every rank, only rank 0 writes. FSDP (the shipped
``examples/accelerate_configs/fsdp_8gpu.yaml`` with 2 processes and no mixed precision): parameters really are
sharded, the result equals DDP's, a resumed run equals the uninterrupted one and the export is a normal Diffusers
folder (LoRA and EMA under FSDP2: tests/test_training_fsdp_ema_lora.py).
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from diffusers_di_star import DIStarSDXLPipeline
from diffusers_di_star.testing import TINY_PROMPTS
from diffusers_di_star.training.engine import check_engine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, os.pardir)
SCRIPT = os.path.join(ROOT, "examples", "train_di_star_sdxl.py")
FSDP_CONFIG = os.path.join(ROOT, "examples", "accelerate_configs", "fsdp_8gpu.yaml")
FSDP1_CONFIG = os.path.join(ROOT, "examples", "accelerate_configs", "fsdp1_8gpu.yaml")

# Runs the example (stub reward) once per entry of the JSON list in DI_STAR_TEST_RUNS, in one process group:
# {"name", "args", "refused", "stopped", "status", "sigterm", "nan", "enospc"}. A run with "refused" must fail with a
# ValueError, whose message is recorded; one with "stopped" runs the script's command line (`cli`), whose exit status,
# printed error and the --output_dir listing are recorded; the others must return "status" (default 0). "sigterm":
# [rank, n] sends SIGTERM to that rank at its n-th generator-loss call; "nan": [rank, n] makes that call's loss NaN on
# that rank only; "enospc": [rank, n] makes that rank's n-th checkpoint save fail writing its own file (disk full). For
# each other run every rank records, under <probe>/<name>/, its generator's initial trainable parameters, how its
# prepared units' parameters are laid out (after `prepare` and at the end), its final generator parameters
# (unsharded engines) and each export it made.
LAUNCHER = textwrap.dedent(
    """
    import contextlib, errno, glob, importlib.util, io, json, os, signal, sys
    import torch
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from accelerate import PartialState
    if os.environ.get("DI_STAR_TEST_FSDP_ON_CPU") == "1":
        # TEST-ONLY switch: accelerate turns FSDP on only for accelerator devices (with ACCELERATE_USE_CPU=1 an
        # FSDP config silently runs as DDP). Presenting the gloo group as MULTI_GPU, on the index-less "cpu" device
        # that ACCELERATE_TORCH_DEVICE sets, makes accelerate's own FSDP plugin shard for real on CPU.
        PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_GPU)
    # Several runs share this process group: end_training would destroy it (the process exit does that here).
    PartialState.destroy_process_group = AcceleratorState.destroy_process_group = lambda self, group=None: None
    from torch.distributed.tensor import DTensor
    sys.path.insert(0, {tests!r})
    from training_helpers import PatternReward
    spec = importlib.util.spec_from_file_location("train_di_star_sdxl", {script!r})
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.load_reward = lambda spec: PatternReward().freeze()
    from diffusers_di_star.training import checkpointing
    checkpointing.VISIBILITY_TIMEOUT = 1.0  # one machine: a file one rank wrote is visible to the others at once
    rank = int(os.environ["RANK"])  # (a PartialState made here would miss ACCELERATE_USE_CPU)
    captured, setup, prepare, export = {{}}, script.setup_networks, script.prepare_networks, script.export

    def layout(networks):
        params = [p for u in {{id(u): u for u in networks.prepared.values()}}.values() for p in u.parameters()]
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        return {{"dtensors": sum(isinstance(p, DTensor) for p in params), "params": len(params), "local": local,
                "global": sum(p.numel() for p in params)}}

    def recording_setup(*args, **kwargs):
        networks = captured["networks"] = setup(*args, **kwargs)
        initial = [p.detach().clone() for p in networks.trainable_parameters("generator")]
        torch.save(initial, os.path.join(captured["probe"], f"initial-rank{{rank}}.pt"))
        return networks

    def recording_prepare(accelerator, networks, *args, **kwargs):
        result = prepare(accelerator, networks, *args, **kwargs)
        captured["prepared"] = layout(networks)
        return result

    def recording_export(*args, **kwargs):
        open(os.path.join(captured["probe"], f"export-rank{{rank}}"), "w").close()
        return export(*args, **kwargs)

    loss_calls = {{"n": 0}}

    def signalling_generator_loss(*args, **kwargs):  # "sigterm" / "nan": at that rank's n-th generator-loss call
        loss_calls["n"] += 1
        if run.get("sigterm") == [rank, loss_calls["n"]]:
            os.kill(os.getpid(), signal.SIGTERM)
        loss, terms = generator_loss(*args, **kwargs)
        return (loss * float("nan"), terms) if run.get("nan") == [rank, loss_calls["n"]] else (loss, terms)

    save_calls = {{"n": 0}}

    def filling_save_state(self, folder, *args, **kwargs):  # "enospc": the disk fills as this rank writes its RNG file
        result = save_state(self, folder, *args, **kwargs)
        save_calls["n"] += 1
        if run.get("enospc") == [rank, save_calls["n"]]:
            path = os.path.join(folder, f"random_states_{{rank}}.pkl")
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return result

    save_state = script.Accelerator.save_state
    script.Accelerator.save_state = filling_save_state
    generator_loss = script.generator_loss
    script.setup_networks, script.prepare_networks = recording_setup, recording_prepare
    script.export, script.generator_loss = recording_export, signalling_generator_loss
    for run in json.loads(os.environ["DI_STAR_TEST_RUNS"]):
        AcceleratorState._reset_state(reset_partial_state=True)  # each run as a fresh launch
        probe = captured["probe"] = os.path.join({probe!r}, run["name"])
        os.makedirs(probe, exist_ok=True)
        if run.get("damage") and rank == 0:
            for path in glob.glob(run["damage"]):
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    f.write(bytes(64))
        args = script.parse_args(sys.argv[1:] + run["args"] + run.get("rank_args", {{}}).get(str(rank), []))
        if run.get("refused"):
            try:
                script.main(args)
            except ValueError as error:
                open(os.path.join(probe, f"refused-rank{{rank}}.txt"), "w").write(str(error))
            continue
        loss_calls["n"] = save_calls["n"] = 0
        if run.get("stopped"):
            printed = io.StringIO()
            with contextlib.redirect_stderr(printed):
                status = script.cli(sys.argv[1:] + run["args"])
            open(os.path.join(probe, f"status-rank{{rank}}"), "w").write(str(status))
            open(os.path.join(probe, f"stderr-rank{{rank}}.txt"), "w").write(printed.getvalue())
            with open(os.path.join(probe, f"listing-rank{{rank}}.json"), "w") as f:
                json.dump(sorted(os.listdir(args.output_dir)), f)
            continue
        status = script.main(args)
        open(os.path.join(probe, f"status-rank{{rank}}"), "w").write(str(status))
        open(os.path.join(probe, f"loss-calls-rank{{rank}}"), "w").write(str(loss_calls["n"]))
        if status != run.get("status", 0):
            sys.exit(1)
        networks = captured["networks"]
        with open(os.path.join(probe, f"layout-rank{{rank}}.json"), "w") as f:
            json.dump({{"prepared": captured["prepared"], "end": layout(networks)}}, f)
        if not networks.route_frozen_calls:
            params = [p.detach().cpu() for p in networks.trainable_parameters("generator")]
            torch.save(params, os.path.join(probe, f"generator-rank{{rank}}.pt"))
    """
)


def launch(tmp_path, tiny_sdxl_dir, runs, fsdp=False, config=FSDP_CONFIG, num_processes=2):
    """The ``runs`` in one launch (2 processes; FSDP through ``config``); returns the probe folder (outputs in it).

    A run is {"name", "args", "refused", "rank_args": {rank: extra args}, "damage": glob}; "damage" overwrites the
    middle of the files it matches (sizes kept) before the run.
    """
    probe = tmp_path / "probe"
    probe.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=HERE, script=SCRIPT, probe=str(probe)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DI_STAR_TEST_RUNS": json.dumps(runs)}
    if fsdp:
        engine = ["--config_file", config]
        env.pop("ACCELERATE_USE_CPU", None)
        env.update(DI_STAR_TEST_FSDP_ON_CPU="1", ACCELERATE_TORCH_DEVICE="cpu")
    else:
        # `--cpu` alone starts ONE process; `--multi_gpu` with ACCELERATE_USE_CPU=1 gives two gloo processes.
        engine = ["--multi_gpu", "--dynamo_backend", "no"]
        env["ACCELERATE_USE_CPU"] = "1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", "no", str(launcher), "--pretrained_model_name_or_path", tiny_sdxl_dir,
        "--train_data_file", str(prompts), "--resolution", "64", "--train_batch_size", "1", "--report_to", "none",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return probe


# Full finetuning, the same seed and data under both engines. AdamW's ε = 1e-4 keeps its update smooth in the
# gradient: with β1 = 0 (the default) and the usual ε = 1e-8 the update is lr·sign(g) wherever |g| ≫ ε, so an element
# whose gradient is near 0 could flip by 2·lr on a float32 reduction-order difference.
FULL = ["--learning_rate", "1e-3", "--adam_epsilon", "1e-4", "--max_train_steps", "2", "--seed", "3"]
LORA = ["--use_lora", "--generator_lora_rank", "4", "--assistant_lora_rank", "4", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def runs(tiny_sdxl_dir, tmp_path_factory):
    """Two launches: DDP (LoRA, full, full stopped by SIGTERM on rank 1 and resumed, full stopped by a full disk on
    rank 1 and resumed) and FSDP
    (full with validation, full resumed from checkpoint-1)."""
    ddp, fsdp = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("fsdp")
    ddp_probe = launch(
        ddp,
        tiny_sdxl_dir,
        [
            {"name": "lora", "args": [*LORA, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                      "--output_dir", str(ddp / "lora")]},
            {"name": "full", "args": [*FULL, "--checkpointing_steps", "2", "--output_dir", str(ddp / "full")]},
            {"name": "sigterm", "args": [*FULL, "--checkpointing_steps", "2", "--output_dir", str(ddp / "sigterm")],
             "sigterm": [1, 1], "status": 143},
            {"name": "nan", "args": [*LORA, "--max_train_steps", "2", "--output_dir", str(ddp / "nan")],
             "nan": [1, 1]},
            {"name": "after-sigterm",
             "args": [*FULL, "--checkpointing_steps", "2", "--output_dir", str(ddp / "sigterm"),
                      "--resume_from_checkpoint", "latest"]},
            # Rank 1's disk fills while it writes its part of checkpoint-2; then the same command resumes.
            {"name": "disk-full", "stopped": True, "enospc": [1, 2],
             "args": [*FULL, "--checkpointing_steps", "1", "--output_dir", str(ddp / "disk-full")]},
            {"name": "after-disk-full",
             "args": [*FULL, "--checkpointing_steps", "1", "--output_dir", str(ddp / "disk-full"),
                      "--resume_from_checkpoint", "latest"]},
        ],
    )  # fmt: skip
    fsdp_probe = launch(
        fsdp,
        tiny_sdxl_dir,
        [
            {"name": "full", "args": [*FULL, "--checkpointing_steps", "1", "--output_dir", str(fsdp / "full"),
                                      "--validation_prompts", "a cat", "--validation_steps", "1"]},
            {"name": "resumed", "args": [*FULL, "--output_dir", str(fsdp / "resumed"),
                                         "--resume_from_checkpoint", str(fsdp / "full" / "checkpoint-1")]},
            # checkpoint-2 passes the size check but its sharded model's metadata is damaged.
            {"name": "damaged", "refused": True,
             "damage": str(fsdp / "full" / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata"),
             "args": [*FULL, "--max_train_steps", "3", "--output_dir", str(fsdp / "full"),
                      "--resume_from_checkpoint", "latest"]},
            # Two "nodes" whose --output_dir are different folders (storage not shared).
            {"name": "not-shared", "refused": True, "rank_args": {"1": ["--output_dir", str(fsdp / "node1")]},
             "args": [*FULL, "--checkpointing_steps", "1", "--output_dir", str(fsdp / "node0")]},
        ],
        fsdp=True,
    )  # fmt: skip
    return {"ddp": (ddp, ddp_probe), "fsdp": (fsdp, fsdp_probe)}


@pytest.fixture(scope="module")
def other_launches(runs, tiny_sdxl_dir, tmp_path_factory):
    """FSDP1 through the shipped config (full; resumed from checkpoint-1), and FSDP2's 2-process checkpoint-1
    resumed on one process (model and optimiser states loaded; nothing left to train)."""
    fsdp1, single = tmp_path_factory.mktemp("fsdp1"), tmp_path_factory.mktemp("one-process")
    checkpoint = str(runs["fsdp"][0] / "full" / "checkpoint-1")
    fsdp1_probe = launch(
        fsdp1,
        tiny_sdxl_dir,
        [
            {"name": "full", "args": [*FULL, "--checkpointing_steps", "1", "--output_dir", str(fsdp1 / "full")]},
            {"name": "resumed", "args": [*FULL, "--output_dir", str(fsdp1 / "resumed"),
                                         "--resume_from_checkpoint", str(fsdp1 / "full" / "checkpoint-1")]},
        ],
        fsdp=True,
        config=FSDP1_CONFIG,
    )  # fmt: skip
    launch(
        single,
        tiny_sdxl_dir,
        [
            {"name": "loaded", "args": [*FULL, "--max_train_steps", "1", "--output_dir", str(single / "loaded"),
                                        "--resume_from_checkpoint", checkpoint]},
        ],
        fsdp=True,
        num_processes=1,
    )  # fmt: skip
    return {"fsdp1": (fsdp1, fsdp1_probe), "single": single}


def test_two_cpu_processes_stay_in_sync(runs):
    out, probe = runs["ddp"][0] / "lora", runs["ddp"][1] / "lora"
    # LoRA's random init is identical on every rank before DDP broadcasts anything (seeded before the adapters).
    initial0, initial1 = (torch.load(probe / f"initial-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(initial0, initial1, strict=True))
    rank0, rank1 = (torch.load(probe / f"generator-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    assert any(p.abs().max() > 0 for p in rank0[1::2]), "the generator did not train"
    assert os.path.exists(probe / "export-rank0") and not os.path.exists(probe / "export-rank1")
    assert sorted(os.listdir(out / "checkpoint-2" / "generator")) == ["pytorch_lora_weights.safetensors"]
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


def unet_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def test_fsdp_shards_the_networks_and_matches_ddp(runs, tiny_sdxl_dir):
    (ddp_out, ddp_probe), (fsdp_out, fsdp_probe) = ((d / "full", p / "full") for d, p in (runs["ddp"], runs["fsdp"]))
    for when in ("prepared", "end"):
        layouts = [json.loads((fsdp_probe / f"layout-rank{r}.json").read_text())[when] for r in (0, 1)]
        assert all(layout["dtensors"] == layout["params"] for layout in layouts), "FSDP2 did not shard every parameter"
        assert layouts[0]["local"] + layouts[1]["local"] == layouts[0]["global"]
        assert max(layout["local"] for layout in layouts) < 0.6 * layouts[0]["global"], "one rank holds too much"
        ddp_layout = json.loads((ddp_probe / "layout-rank0.json").read_text())[when]
        assert ddp_layout["dtensors"] == 0 and ddp_layout["local"] == ddp_layout["global"]
    assert os.path.exists(fsdp_probe / "export-rank0") and not os.path.exists(fsdp_probe / "export-rank1")
    # Validation mid-run gathers the generator on every rank and renders on rank 0 (no hang), as does the export.
    for image in ("validation/step-1/000.png", "validation/step-2/000.png", "images/000.png"):
        assert os.path.isfile(fsdp_out / image)

    # Same seed and data: the same training, up to float32 reduction order (all-reduce vs reduce-scatter).
    for folder in ("unet", "checkpoint-2/generator", "checkpoint-2/assistant"):
        expected, actual = unet_weights(ddp_out / folder), unet_weights(fsdp_out / folder)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    initial = unet_weights(os.path.join(tiny_sdxl_dir, "unet"))
    assert max((initial[k] - actual[k]).abs().max() for k in actual) > 1e-4, "the run did not train"


def test_fsdp_resume_equals_uninterrupted_run_and_export_loads(runs):
    ddp_out, fsdp_out, resumed_out = runs["ddp"][0] / "full", runs["fsdp"][0] / "full", runs["fsdp"][0] / "resumed"
    expected, actual = unet_weights(fsdp_out / "unet"), unet_weights(resumed_out / "unet")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    images = []
    for folder in (ddp_out, fsdp_out):
        pipe = DIStarSDXLPipeline.from_pretrained(str(folder))
        generator = torch.Generator().manual_seed(0)
        images.append(pipe(list(TINY_PROMPTS[:2]), height=64, width=64, generator=generator, output_type="np").images)
    np.testing.assert_allclose(images[1], images[0], atol=1e-4)


def test_lora_and_deepspeed_are_refused_with_one_line(runs):
    # (LoRA and EMA under FSDP2 run: tests/test_training_fsdp_ema_lora.py.)
    # DeepSpeed is refused from accelerate's distributed type alone (deepspeed itself need not be installed).
    with pytest.raises(ValueError, match=r"^DeepSpeed is not supported .* use FSDP for full finetuning"):
        check_engine(DistributedType.DEEPSPEED, use_lora=False, use_ema=False)
    fsdp1 = SimpleNamespace(fsdp_version=1, use_orig_params=False)
    with pytest.raises(ValueError, match="FSDP1 needs `fsdp_use_orig_params: true`"):
        check_engine(DistributedType.FSDP, use_lora=False, use_ema=False, fsdp_plugin=fsdp1)
    fsdp1.use_orig_params = True
    assert check_engine(DistributedType.FSDP, use_lora=False, use_ema=False, fsdp_plugin=fsdp1) is True
    assert check_engine(DistributedType.MULTI_GPU, use_lora=True, use_ema=True) is False


def test_fsdp1_shards_matches_ddp_and_resumes_exactly(runs, other_launches):
    (ddp_out, ddp_probe), (out, probe) = (runs["ddp"][0] / "full", runs["ddp"][1] / "full"), other_launches["fsdp1"]
    # FSDP1 with use_orig_params: outside forward every parameter is a view of this rank's part of a flat shard.
    ddp_size = json.loads((ddp_probe / "layout-rank0.json").read_text())["end"]["global"]
    local = [json.loads((probe / "full" / f"layout-rank{r}.json").read_text())["end"]["local"] for r in (0, 1)]
    assert sum(local) >= ddp_size and max(local) < 0.6 * ddp_size, "FSDP1 did not shard the networks"
    for folder in ("unet", "checkpoint-2/generator", "checkpoint-2/assistant"):
        expected, actual = unet_weights(ddp_out / folder), unet_weights(out / "full" / folder)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    # The resumed run restores the AdamW moments too (accelerate alone drops them under FSDP1: training/engine.py).
    expected, actual = unet_weights(out / "full" / "unet"), unet_weights(out / "resumed" / "unet")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_damaged_sharded_checkpoint_is_one_line_naming_the_previous_one(runs):
    fsdp, probe = runs["fsdp"]
    for rank in (0, 1):
        message = (probe / "damaged" / f"refused-rank{rank}.txt").read_text()
        assert "\n" not in message
        # torch's CheckpointException (a BaseException) carried the first rank's own error.
        assert message.startswith(f"{fsdp / 'full' / 'checkpoint-2'} cannot be loaded (") and " on rank " in message
        assert message.endswith(f"the previous intact checkpoint is checkpoint-1 (--resume_from_checkpoint "
                                f"{fsdp / 'full' / 'checkpoint-1'})")  # fmt: skip


def test_ranks_writing_to_different_folders_stop_at_the_first_save(runs):
    fsdp, probe = runs["fsdp"]
    for rank in (0, 1):
        message = (probe / "not-shared" / f"refused-rank{rank}.txt").read_text()
        assert message.startswith("rank 1 wrote ") and "of checkpoint-1.tmp where the main process does not" in message
        assert "--output_dir must be one folder that every node shares" in message and "\n" not in message
    assert os.listdir(fsdp / "node0") == ["checkpoint-1.tmp"], "marked complete without rank 1's files"


def test_two_process_fsdp_checkpoint_resumes_on_one_process(runs, other_launches):
    """torch.distributed.checkpoint reshards the 2-process model and optimiser states onto 1 process."""
    checkpoint, single = runs["fsdp"][0] / "full" / "checkpoint-1", other_launches["single"]
    expected, loaded = unet_weights(checkpoint / "generator"), unet_weights(single / "loaded" / "unet")
    assert sorted(os.listdir(checkpoint / "optimizer_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_docs_memory_table_is_the_computed_one():
    from diffusers_di_star.benchmarking.memory import fsdp_full_finetuning_memory_gb, sdxl_parameter_counts

    counts = sdxl_parameter_counts()
    assert counts == {"unet": 2_567_463_684, "text_encoders": 817_720_320, "vae": 83_653_863}
    docs = open(os.path.join(ROOT, "docs", "training.md")).read()
    for gpus in (1, 2, 4, 8):
        row = " | ".join(f"{value:.1f}" for value in fsdp_full_finetuning_memory_gb(gpus, counts).values())
        assert f"| {gpus} | {row} |" in docs


def test_sigterm_on_one_rank_saves_one_checkpoint_that_resumes_exactly(runs):
    out, probe = runs["ddp"][0], runs["ddp"][1]
    assert [(probe / "sigterm" / f"status-rank{r}").read_text() for r in (0, 1)] == ["143", "143"]
    # Rank 1 got the signal during step 1: both ranks finished the step, saved checkpoint-1 together and stopped; the
    # same command with `--resume_from_checkpoint latest` (resolved on rank 0, broadcast) went on to checkpoint-2.
    checkpoints = sorted(name for name in os.listdir(out / "sigterm") if name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    manifest = json.loads((out / "sigterm" / "checkpoint-1" / "di_star_checkpoint.json").read_text())
    assert manifest["step"] == 1
    expected, actual = unet_weights(out / "full" / "unet"), unet_weights(out / "sigterm" / "unet")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all_ranks(runs):
    probe = runs["ddp"][1] / "nan"
    # Rank 1's first generator loss was NaN: both ranks skipped that step and redid it (3 loss calls for 2 steps) ...
    assert [(probe / f"loss-calls-rank{r}").read_text() for r in (0, 1)] == ["3", "3"]
    # ... and stayed in sync, and the run trained.
    rank0, rank1 = (torch.load(probe / f"generator-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    assert all(torch.isfinite(p).all() for p in rank0) and any(p.abs().max() > 0 for p in rank0[1::2])


def test_a_full_disk_on_one_rank_stops_every_rank_with_one_line_and_keeps_the_last_checkpoint(runs):
    out, probe = runs["ddp"][0], runs["ddp"][1]
    failed = out / "disk-full" / "checkpoint-2.tmp" / "random_states_1.pkl"
    # Both ranks left the save together (none waited in a collective) with the same line, naming rank 1 and its file.
    assert [(probe / "disk-full" / f"status-rank{r}").read_text() for r in (0, 1)] == ["1", "1"]
    expected = (
        f"train_di_star_sdxl.py: error: disk full at {out / 'disk-full'} on rank 1: checkpoint-2 was not written "
        f"(OSError: [Errno 28] No space left on device: '{failed}'); the last checkpoint, checkpoint-1, is intact "
        "(--resume_from_checkpoint latest). Free some space (or use --checkpoints_total_limit)."
    )
    for rank in (0, 1):
        printed = (probe / "disk-full" / f"stderr-rank{rank}.txt").read_text()  # (among progress bars)
        assert printed[printed.index("train_di_star_sdxl.py: error:") :].splitlines()[0] == expected
        assert "Traceback" not in printed
    # Nothing of checkpoint-2 was kept, so `latest` is checkpoint-1; resuming from it redid step 2 exactly.
    listing = json.loads((probe / "disk-full" / "listing-rank0.json").read_text())
    assert [name for name in listing if name.startswith("checkpoint")] == ["checkpoint-1"]
    assert (probe / "after-disk-full" / "status-rank0").read_text() == "0"
    expected, actual = unet_weights(out / "full" / "unet"), unet_weights(out / "disk-full" / "unet")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
